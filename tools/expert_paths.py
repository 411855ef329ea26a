"""What MoEBERT's routing costs, one FFN block at a time: twelve BERT-base FFN blocks in a row (so the
weights come from memory, as in the model), CPU, fp32, random weights and hash-random tables, n tokens.
Times, alternating, in ms a layer above the quarter-FFN block (the cap's FFN, one expert's size):

    padded          Experts.forward forced onto its padded batched matmul (every expert padded to the fullest)
    loop            Experts.forward forced onto one matmul per expert
    rule            Experts.forward as it chooses (experts.SMALL_BATCH, experts.PADDING)
    unrouted        bench.UnroutedExperts: equal runs of tokens, one batched matmul, no sort, gather or padding
    unrouted-loop   the same with one matmul per expert

unrouted-loop minus unrouted is what splitting the matmul by expert costs, loop minus unrouted-loop what
the sort, gathers and scatters cost, padded minus unrouted what the padding costs.

    python tools/expert_paths.py 128 1024 4096      # tokens: batch 1, 8, 32 at sequence 128
"""
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import bench  # noqa: E402
import experts  # noqa: E402
import moebert  # noqa: E402
from ab_moebert import cpu_bert_base  # noqa: E402  (tools/ is this script's folder)
from bert import BertConfig, BertIntermediate, BertOutput  # noqa: E402

LAYERS, REPEATS, MIN_SECONDS = 12, 9, 0.5


def main():
    cpu, cfg = cpu_bert_base()
    moe_cfg = moebert.MoEConfig.scaled(cfg.intermediate_size)
    quarter_cfg = BertConfig(intermediate_size=moe_cfg.expert_dim)
    quarter = [(BertIntermediate(quarter_cfg).eval(), BertOutput(quarter_cfg).eval()) for _ in range(LAYERS)]
    experts = [experts.Experts(cfg, moe_cfg).eval() for _ in range(LAYERS)]
    unrouted = [bench.UnroutedExperts(cfg, moe_cfg).eval() for _ in range(LAYERS)]
    for u, e in zip(unrouted, experts):
        u.load_state_dict(e.state_dict())
    tables = [moebert.hash_random_table(cfg.vocab_size, moe_cfg.num_experts, None) for _ in range(LAYERS)]

    def quarter_ffn(x, ids):
        for intermediate, output in quarter:
            x = output(intermediate(x), x)
        return x

    def moe(layers, **limits):  # limits: moebert's SMALL_BATCH / PADDING for this run
        def run(x, ids):
            saved = {k: getattr(moebert, k) for k in limits}
            for k, v in limits.items():
                setattr(moebert, k, v)
            try:
                for ex, table in zip(layers, tables):
                    x = ex(x, table[ids])
            finally:  # the other runs get moebert's own limits back
                for k, v in saved.items():
                    setattr(moebert, k, v)
            return x
        return run

    runs = {"quarter-FFN": quarter_ffn, "padded": moe(experts, SMALL_BATCH=float("inf"), PADDING=float("inf")),
            "loop": moe(experts, PADDING=-1), "rule": moe(experts), "unrouted": moe(unrouted),
            "unrouted-loop": moe(unrouted, SMALL_BATCH=0)}
    print(bench.machine(cpu))
    for n in [int(a) for a in sys.argv[1:]] or [128, 1024]:
        x, ids = torch.randn(n, cfg.hidden_size), torch.randint(999, cfg.vocab_size, (n,))
        counts = [torch.bincount(t[ids], minlength=moe_cfg.num_experts) for t in tables]
        padding = [int(moe_cfg.num_experts * c.max()) - n for c in counts]  # rows the padded path adds
        ms = {k: [] for k in runs}
        with torch.inference_mode():
            for _ in range(REPEATS):
                for k, run in runs.items():
                    ms[k].append(1e3 * bench.timeit(lambda: run(x, ids), cpu, MIN_SECONDS))
        q = statistics.median(ms["quarter-FFN"])
        print(f"{n} tokens, padding rows in the {LAYERS} layers {padding}; quarter-FFN {q / LAYERS:.3f} ms a layer;"
              f" above it, ms a layer (median of {REPEATS}):")
        print("   " + "  ".join(f"{k} {(statistics.median(v) - q) / LAYERS:+.3f}" for k, v in ms.items()
                                if k != "quarter-FFN"), flush=True)


if __name__ == "__main__":
    main()
