"""MoEBERT's matmuls inside the whole model, by shape: BERT-base's quarter-FFN model (bench.py's cap),
hash-random's experts without routing ("unrouted", bench.UnroutedExperts) and hash-random, CPU, fp32,
random weights, sequence 128. For each model: the unprofiled ms a forward (median of alternating
repeats); each matmul shape's calls and ms a call (bench.profile_forward's torch.profiler self time,
the least of 3 profiled runs of 5 forwards); the other ops' self time a forward. The quarter-FFN
model's [n, 768] x [768, 768] products (attention's and its FFN's) against the experts' batched ones
of the same multiply-adds say what the expert matmuls cost as such; unrouted against hash-random
what the padding adds. Then the same two products timed alone, with the weights in cache (one
layer's, again and again) and from memory (twelve layers' W1 and W2 of four experts, 226 MB), as ms
a 128 x 768 x 768 product.

    python tools/matmul_shapes.py 1 8      # batch sizes
"""
import os
import statistics
import sys
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import bench  # noqa: E402
from ab_moebert import cpu_bert_base  # noqa: E402  (tools/ is this script's folder)

MATMULS = ("aten::addmm", "aten::baddbmm", "aten::bmm", "aten::mm")
REPEATS, PROFILED, FORWARDS = 5, 3, 5


def main():
    cpu, cfg = cpu_bert_base()
    models, _ = bench.inference_models(cfg, cpu, ["quarter-FFN", "unrouted", "hash-random"], 6)
    print(bench.machine(cpu))
    for B in [int(a) for a in sys.argv[1:]] or [1, 8]:
        batch = bench.random_batch(cfg, B, 128, cpu)
        runs = {name: bench.forward_fn(model, batch, nullcontext) for name, model in models.items()}  # fp32
        plain = {name: [] for name in runs}
        for _ in range(REPEATS):  # alternating, so the machine's drift hits all three alike
            for name, run in runs.items():
                plain[name].append(1e3 * bench.timeit(run, cpu, 1.0))
        print(f"batch {B}: ms a forward, median of {REPEATS}: "
              + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in plain.items()))
        for name, run in runs.items():
            profiled = [bench.profile_forward(run, cpu, FORWARDS, shapes=True) for _ in range(PROFILED)]
            per_call, others = by_shape([ops for ops, _ in profiled])
            print(f"  {name}: profiled {min(wall for _, wall in profiled):.1f} ms a forward")
            for (op, shapes), (calls, ms) in sorted(per_call.items(), key=lambda kv: -kv[1][0] * kv[1][1]):
                print(f"    {op:14s} {shapes:60s} {calls:5.1f} calls  {ms:7.3f} ms a call  {calls * ms:8.2f} ms")
            top = sorted(others.items(), key=lambda kv: -min(kv[1]))[:8]
            print("    other ops, ms a forward (least of the runs): "
                  + ", ".join(f"{op} {min(v):.2f}" for op, v in top))

    alone(cpu)


def by_shape(runs):
    """Profiled runs ({(op, shapes): {"ms", "calls"}} a forward) -> each matmul shape's (calls a forward,
    least ms a call over the runs), and every other op's ms a forward in each run, its shapes summed."""
    per_call, others = {}, {}
    for i, ops in enumerate(runs):
        for (op, shapes), v in ops.items():
            if op in MATMULS:
                best = per_call.get((op, shapes), (0, float("inf")))[1]
                per_call[(op, shapes)] = (v["calls"], min(best, v["ms"] / v["calls"]))
            else:
                others.setdefault(op, [0.0] * len(runs))[i] += v["ms"]
    return per_call, others


def alone(cpu):
    """One 128-row product against four experts' 32 rows in one batched matmul (the same multiply-adds),
    with the weights in cache and from memory: what reading four experts' weights costs as such."""
    b, x, xb = torch.zeros(768), torch.randn(128, 768), torch.randn(4, 32, 768)
    for stacks in (1, 24):
        experts = [torch.randn(4, 768, 768) for _ in range(stacks)]  # [N, in, out], as experts.Experts
        dense = [w.t() for e in experts for w in e]  # [out, in].t(), as nn.Linear; 4 per stack
        ms = {"128 rows": [], "4 x 32 rows, batched": []}
        for _ in range(REPEATS):
            ms["128 rows"].append(1e3 * bench.timeit(lambda: [torch.addmm(b, x, w) for w in dense], cpu, 0.5)
                                  / len(dense))
            ms["4 x 32 rows, batched"].append(1e3 * bench.timeit(lambda: [torch.baddbmm(b, xb, e) for e in experts],
                                                                 cpu, 0.5) / len(experts))
        where = "in cache" if stacks == 1 else f"from memory ({stacks * 4 * 768 * 768 * 4 / 1e6:.0f} MB)"
        print(f"alone, weights {where}: ms a 128 x 768 x 768 product, median of {REPEATS}: "
              + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
