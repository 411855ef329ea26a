"""How a finished MoEBERT spreads a GLUE dev set's tokens over its experts, layer by layer:

    python tools/expert_load.py OUT/moebert --task stsb --data-dir /path/to/STS-B [--json FILE]

For each layer, the share of the real (unpadded) tokens that each expert takes, and the busiest
expert's share: 1/N is a perfect balance, 1.0 one expert taking everything (a collapsed gate).
Hash routes fix the spread at the surgery; gate routes learn it (paper section 3.4).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch  # noqa: E402

import data  # noqa: E402
import moebert  # noqa: E402
import weights  # noqa: E402
from common import UserError  # noqa: E402
from runtime import COUNT  # noqa: E402


def expert_shares(model, batches):
    """[layers, N]: the share of the real tokens of `batches` that each layer sends to each expert."""
    N = model.moe_config.num_experts
    layers = [layer.moe for layer in model.bert.encoder.layer]
    counts = torch.zeros(len(layers), N)

    def hook(l):
        def count(moe, inputs, output):  # the layer's own routing, on the inputs it was given
            x, input_ids, mask = inputs  # [B, T, H], [B, T], [B, T]
            if moe.cfg.route.startswith("hash"):
                expert = moe.hash_table[input_ids].reshape(-1)
            else:
                expert = moe.route_gate(x, mask, balance=False)[0]
            counts[l] += torch.bincount(expert[mask.reshape(-1) == 1], minlength=N).float()
        return count

    handles = [moe.register_forward_hook(hook(l)) for l, moe in enumerate(layers)]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return counts / counts.sum(1, keepdim=True)


def add_model_and_dev(p):
    """The flags of model_and_dev."""
    p.add_argument("model", help="a finished MoEBERT folder (OUT/moebert)")
    p.add_argument("--task", required=True, choices=sorted(data.TASKS), help="the GLUE task of the dev set")
    p.add_argument("--data-dir", required=True, help="the task's GLUE folder (dev.tsv)")
    p.add_argument("--max-seq-length", type=COUNT, default=512, help="as the run's (train.py's default)")


def model_and_dev(folder, task, data_dir, max_seq_length):
    """A finished MoEBERT (eval mode) and the task's dev set through its own vocabulary."""
    model = moebert.load(folder).eval()
    vocab = weights.find_vocab(folder)
    tokenizer = data.load_tokenizer(vocab, lowercase=data.is_uncased(vocab))
    return model, data.encode(data.read_glue(task, data_dir, "dev"), tokenizer, max_seq_length)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_dev(p)
    p.add_argument("--json", help="also write the shares here")
    args = p.parse_args()
    model, features = model_and_dev(args.model, args.task, args.data_dir, args.max_seq_length)
    shares = expert_shares(model, data.batches(features, 64, sort_by_length=True))
    print(f"{args.model}: route {model.moe_config.route}, {len(features)} dev examples; "
          f"share of the tokens per expert, by layer (balance: {1 / shares.size(1):.2f} each)")
    for l, row in enumerate(shares.tolist()):
        print(f"  layer {l}: " + " ".join(f"{s:.3f}" for s in row) + f"   busiest {max(row):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "route": model.moe_config.route, "shares": shares.tolist()}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a folder that is no finished MoEBERT, a missing dev.tsv: one line, as train.py
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
