"""fast.py on a real finished MoEBERT and a GLUE dev set, against the readable model (CPU):

    python tools/fast_real.py OUT/moebert --task stsb --data-dir /path/to/STS-B

The dev set's logits from the readable model (fp32), from the fast path with grouped matmuls (fp32)
and with every expert on every token (fp64); for each, the largest difference from the readable
model and the task's metrics on them. Trained weights, real text, any route.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # expert_load's loading

import torch  # noqa: E402

import data  # noqa: E402
from common import UserError  # noqa: E402
from expert_load import add_model_and_dev, model_and_dev  # noqa: E402
from fast import FastInference  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_dev(p)
    args = p.parse_args()
    try:
        model, features = model_and_dev(args.model, args.task, args.data_dir, args.max_seq_length)
    except UserError as e:  # a folder that is no finished MoEBERT, a missing dev.tsv: one line, exit 2
        p.error(str(e))
    runs = {"readable, fp32": lambda *a: model(*a).logits,
            "fast, grouped, fp32": FastInference(model, torch.float32, grouped=True, graphs=False),
            "fast, every expert, fp64": FastInference(model, torch.float64, grouped=False, graphs=False)}
    logits = {k: [] for k in runs}
    with torch.inference_mode():
        for b in data.batches(features, 64):  # in order: the labels line up
            for k, run in runs.items():
                logits[k].append(run(b["input_ids"], b["token_type_ids"], b["attention_mask"]).double())
    labels = [f["label"] for f in features]
    ref = torch.cat(logits["readable, fp32"])
    print(f"{args.model}: route {model.moe_config.route}, {len(features)} dev examples")
    for k, v in logits.items():
        v = torch.cat(v)
        preds = v[:, 0].tolist() if v.size(1) == 1 else v.argmax(1).tolist()
        metrics = data.compute_metrics(args.task, preds, labels)
        print(f"  {k:26s} max |logit diff| {float((v - ref).abs().max()):.2e}   "
              + "  ".join(f"{m} {x:.8f}" for m, x in metrics.items()))


if __name__ == "__main__":
    main()
