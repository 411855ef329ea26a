"""Does the CPU's matmul library move MoEBERT's share of the cap? On CPU, torch sends fp32 matmuls to
MKL, which on the AMD processor we measured ran at the speed of 256-bit (AVX2) arithmetic; oneDNN,
also inside torch, uses AVX-512 there. This times dense BERT-base, the quarter-FFN floor (bench.py's
cap), the 6-layer student and MoEBERT (hash-random) once with each library, all in one process,
alternating, so the machine's drift hits all alike. CPU, fp32, random weights, sequence 128, forward
only.

    python tools/onednn_cpu.py --batch-sizes 1 8 32 --repeats 4 --out onednn.json

oneDNN is reached through torch.ops.mkldnn._linear_pointwise (X @ W.T + b, the op Inductor's CPU
backend calls): every nn.Linear's F.linear is swapped for it while the oneDNN runs are timed, and
MoEBERT's experts take Experts.forward's per-expert loop, one such call per weight and expert (no
padding: oneDNN's few-row products are fast, and a batched matmul would stay with MKL). It is a
private op, so the model files do not use it.
Prints the GFLOP/s of one matmul with each library; then, per batch size, ms per forward (median of
repeats) with each library, each model's MKL / oneDNN time, MoEBERT's share of the cap within each
library and the largest logit difference between the libraries.
"""
import contextlib
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench  # noqa: E402
import experts  # noqa: E402
from ab_moebert import comparison_args, cpu_bert_base  # noqa: E402  (tools/ is this script's folder)


def onednn_linear(x, weight, bias=None):  # (X, W [out, in], b, post-op, its scalars, its algorithm)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_addmm(bias, x, weight):  # Experts.ffn's bias + x @ W for one expert, W stored [in, out]
    return onednn_linear(x, weight.t(), bias)


@contextlib.contextmanager
def onednn():
    """Every F.linear on oneDNN for the duration, and MoEBERT's experts on Experts.forward's own
    per-expert loop (SMALL_BATCH 0), whose one-expert matmuls (Experts.ffn's torch.addmm) go to oneDNN."""
    saved = F.linear, torch.addmm, experts.SMALL_BATCH
    F.linear, torch.addmm, experts.SMALL_BATCH = onednn_linear, onednn_addmm, 0
    try:
        yield
    finally:
        F.linear, torch.addmm, experts.SMALL_BATCH = saved


def main():
    args = comparison_args(__doc__, repeats=4, min_seconds=0.5)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch was built without oneDNN (torch.backends.mkldnn.is_available() is False)")
    cpu, cfg = cpu_bert_base()
    libraries = {"MKL": contextlib.nullcontext, "oneDNN": onednn}
    # One attention projection at batch 8: [1024, 768] x [768, 768].
    x, w = torch.randn(1024, cfg.hidden_size), torch.randn(cfg.hidden_size, cfg.hidden_size)
    gflops = {}
    with torch.inference_mode():
        for lib, context in libraries.items():
            with context():
                gflops[lib] = round(2 * x.numel() * len(w) / bench.timeit(lambda: F.linear(x, w), cpu, 1.0) / 1e9)
    print(f"one {tuple(x.shape)} x {tuple(w.shape)} matmul, GFLOP/s: {gflops}")
    models, _ = bench.inference_models(cfg, cpu, ["dense", "quarter-FFN", "6-layer", "hash-random"], 6)
    rows = []
    for B in args.batch_sizes:
        batch = bench.random_batch(cfg, B, 128, cpu)
        inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        diff = {}  # the largest logit difference between the libraries, per model
        with torch.inference_mode():
            for name, model in models.items():
                with onednn():
                    logits = model(*inputs).logits
                diff[name] = (logits - model(*inputs).logits).abs().max().item()
        ms = {(lib, name): [] for lib in libraries for name in models}
        for _ in range(args.repeats):
            for lib, context in libraries.items():
                for name, model in models.items():
                    with context():
                        t = bench.timeit(bench.forward_fn(model, batch, contextlib.nullcontext), cpu, args.min_seconds)
                    ms[lib, name].append(1e3 * t)
        med = lambda v: round(statistics.median(v), 1)
        row = {"batch": B, "logits_max_diff": diff,
               "ms_median": {lib: {name: med(ms[lib, name]) for name in models} for lib in libraries},
               "mkl_over_onednn_median": {name: round(statistics.median(
                   m / o for m, o in zip(ms["MKL", name], ms["oneDNN", name])), 2) for name in models},
               "percent_of_cap_median": {lib: med(100 * q / m for q, m in zip(ms[lib, "quarter-FFN"],
                                                                              ms[lib, "hash-random"]))
                                         for lib in libraries},
               "student_over_moebert_median": {lib: round(statistics.median(
                   m / s for m, s in zip(ms[lib, "hash-random"], ms[lib, "6-layer"])), 2) for lib in libraries},
               "ms_each_repeat": {f"{lib} {name}": [round(x, 1) for x in ms[lib, name]]
                                  for lib in libraries for name in models}}
        rows.append(row)
        print(f"batch {B}: ms per forward " + "; ".join(
            f"{lib} " + ", ".join(f"{n} {v}" for n, v in row["ms_median"][lib].items()) for lib in libraries))
        print(f"    MKL / oneDNN {row['mkl_over_onednn_median']}; MoEBERT % of cap {row['percent_of_cap_median']};"
              f" 6-layer's speed / MoEBERT's {row['student_over_moebert_median']};"
              f" logits differ by at most {max(diff.values()):.1g}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": bench.machine(cpu), "matmul_gflops": gflops, "repeats": args.repeats,
                       "min_seconds": args.min_seconds, "seq_len": 128, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
