"""Before/after of a speed change to moebert.py: MoEBERT-base (hash-random) as moebert.py is now and as
it was at an earlier commit, in one process, alternating with the quarter-FFN floor (bench.py's cap),
so the machine's drift hits all three alike. CPU, fp32, random weights, sequence 128.

    python tools/ab_moebert.py --base c3a3027 --batch-sizes 1 8 32 --repeats 8

Prints, per batch size, the median over repeats of ms per forward and of each version's share of the
cap (quarter-FFN time / MoEBERT time within a repeat), and the median of now / base.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import bench  # noqa: E402
from bert import BertConfig  # noqa: E402
from runtime import COUNT, POSITIVE, keep_freed_memory  # noqa: E402


def moebert_at(commit):
    """moebert.py as it was at `commit`, imported as its own module (it imports today's bert.py)."""
    src = subprocess.run(["git", "show", f"{commit}:moebert.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "moebert_base.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("moebert_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def comparison_args(doc, repeats, min_seconds, extra=lambda p: None):
    """The options of an alternating CPU comparison (this tool, onednn_cpu.py), parsed; extra(p) adds
    a tool's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    extra(p)
    p.add_argument("--batch-sizes", type=COUNT, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=COUNT, default=repeats, help="alternating repeats; medians are reported")
    p.add_argument("--min-seconds", type=POSITIVE, default=min_seconds, help="least time per model and repeat")
    p.add_argument("--out", help="also write the numbers here as JSON")
    return p.parse_args()


def cpu_bert_base():
    """The CPU and BERT-base's config (MoEBERT 4 experts x 768, 512 shared), freed memory kept for
    reuse as train.py does, seed 0."""
    keep_freed_memory()
    torch.manual_seed(0)
    return torch.device("cpu"), BertConfig()


def main():
    args = comparison_args(__doc__, repeats=8, min_seconds=1.0, extra=lambda p: p.add_argument(
        "--base", required=True, help="the commit whose moebert.py is 'before'"))
    cpu, cfg = cpu_bert_base()
    models, _ = bench.inference_models(cfg, cpu, ["dense", "quarter-FFN", "hash-random"], 6)
    dense = models.pop("dense")
    # The same dense weights and importance through the base commit's surgery: the same MoEBERT.
    base = moebert_at(args.base)
    importance = torch.stack([layer.moe.importance for layer in models["hash-random"].bert.encoder.layer])
    models["base"] = base.moebert_from_dense(dense, importance, base.MoEConfig.scaled(cfg.intermediate_size)).eval()
    models["now"] = models.pop("hash-random")
    rows = []
    for B in args.batch_sizes:
        batch = bench.random_batch(cfg, B, 128, cpu)
        inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        with torch.inference_mode():
            diff = (models["now"](*inputs).logits - models["base"](*inputs).logits).abs().max().item()
        ms = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                ms[name].append(1e3 * bench.timeit(bench.forward_fn(model, batch, nullcontext), cpu, args.min_seconds))
        row = {"batch": B, "logits_max_diff": diff,
               "ms_median": {k: round(statistics.median(v), 1) for k, v in ms.items()},
               "percent_of_cap_median": {k: round(100 * statistics.median(
                   q / m for q, m in zip(ms["quarter-FFN"], ms[k])), 1) for k in ("base", "now")},
               "now_over_base_median": round(statistics.median(n / b for n, b in zip(ms["now"], ms["base"])), 3),
               "ms_each_repeat": {k: [round(x, 1) for x in v] for k, v in ms.items()}}
        rows.append(row)
        m, c = row["ms_median"], row["percent_of_cap_median"]
        print(f"batch {B}: ms per forward quarter-FFN {m['quarter-FFN']}, base {m['base']}, now {m['now']}; "
              f"% of cap base {c['base']}, now {c['now']}; now / base {row['now_over_base_median']} "
              f"(logits differ by {diff:.1g})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"base": args.base, "machine": bench.machine(cpu), "repeats": args.repeats,
                       "min_seconds": args.min_seconds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
