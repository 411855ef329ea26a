"""Speed: MoEBERT vs dense BERT, the cap that attention leaves MoEBERT, a 6-layer student, where
MoEBERT's time above the cap goes, our importance vs the official algorithm, our training steps vs
Hugging Face, checkpoints. Random weights (speed does not depend on them). Prints tables, writes JSON.

    python bench.py                       # CPU, fp32, 2 threads (about half an hour for BERT-base)
    python bench.py --device cuda         # GPU, bf16 autocast
    python bench.py --quick               # a small config, a minute or two, to check the script runs
    python bench.py --only importance     # ours, the official algorithm (all 16 examples: minutes), fwd + bwd
    python bench.py --only importance --official-examples 4   # the official loop on 4 of 16, scaled by 4
    python bench.py --only profile --profile-batch 1 8   # where MoEBERT's time above the cap goes
    python bench.py --device cuda --only inference --cuda-graphs   # the GPU's own time, launching taken out

Inference times, side by side and alternating, so the machine's drift hits all alike: dense
BERT-base, MoEBERT (every route), a dense BERT-base with half the layers (a 6-layer student, as
DistilBERT's), and a dense BERT-base whose FFN is cut to one expert's size (intermediate 768, a quarter).
The last is MoEBERT with perfect experts: attention, embeddings and head are common to both, so
cap = dense time / quarter-FFN time is the most MoEBERT can gain on the machine at hand, and MoEBERT's
speedup is reported as a share of it. "unrouted" (hash-random's experts, each on an equal run of the
tokens, nothing sorted or gathered) splits what is missing into the experts' matmul sizes and the
routing; `--only profile` splits MoEBERT's time above the floor by op.

`transformers` is used here only as the peer to compare with; the project does not need it.
"""
import argparse
import dataclasses
import os
import platform
import statistics
import time
from contextlib import nullcontext
from functools import partial

import torch

import experts
import moebert
from bert import BertConfig, BertForSequenceClassification
from common import UserError, atomic_write_json
from fast import FastInference
from moebert import MoEConfig, moebert_from_dense
from runtime import COUNT, POSITIVE, check_device, fused_adamw, keep_freed_memory


def timeit(fn, device, min_seconds, warmup=1):
    """Seconds per call: warm-up calls, then as many calls as fit in min_seconds (at least 2)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def random_batch(cfg, B, T, device, num_labels=2):
    g = torch.Generator().manual_seed(B * 1000 + T)
    ids = torch.randint(999, cfg.vocab_size, (B, T), generator=g)  # past the special tokens
    return dict(input_ids=ids.to(device), token_type_ids=torch.zeros_like(ids).to(device),
                attention_mask=torch.ones_like(ids).to(device),
                labels=torch.randint(0, num_labels, (B,), generator=g).to(device))


def flop_ceiling(cfg, moe_cfg, T):
    """Dense over MoE multiply-adds per token and layer: attention projections 4d^2, attention 2Td,
    FFN 2 d I dense vs 2 d expert_dim for one expert (12d^2 + 2Td vs 6d^2 + 2Td for BERT-base)."""
    d = cfg.hidden_size
    dense = 4 * d * d + 2 * T * d + 2 * d * cfg.intermediate_size
    moe = 4 * d * d + 2 * T * d + 2 * d * moe_cfg.expert_dim
    return dense / moe


class UnroutedExperts(experts.Experts):
    """MoEBERT's experts with the routing taken out, to split its time above the cap: the n tokens,
    cut into N equal runs, go to the experts in order, so each expert runs MoEBERT's matmuls on n/N
    rows (batched or one each, as Experts.forward would), with nothing sorted, gathered, padded or
    scattered. What this model leaves of the cap is what the matmuls' sizes cost, not the routing."""

    def forward(self, x, expert):  # [n, H]; expert is ignored
        N = len(self.intermediate_weight)
        if len(x) <= experts.SMALL_BATCH * N and len(x) % N == 0:
            return self.ffn(x.view(N, -1, x.size(-1)), *self.weights(batched=True)).view_as(x)
        return torch.cat([self.ffn(run, *w) for run, w in zip(x.chunk(N), self.weights())])


class HostSizedExperts(experts.Experts):
    """MoEBERT's experts without the grouped path (CUDA's in bf16): the padded batched or the
    per-expert matmuls, whose sizes the host reads, a wait for the GPU in every layer. Timed beside
    hash-random on CUDA, as "host-sized", it is the before of the grouped path's before/after."""

    def grouped_dtype(self, x):
        return None


def inference_models(cfg, device, names, student_layers):
    """The models to time, by name: "dense" (BERT), "quarter-FFN" (the same with every FFN cut to one
    expert's size: MoEBERT with perfect experts), f"{n}-layer" (dense with n layers: the small
    student to beat), MoEBERT routes (moebert.ROUTES), "unrouted" (hash-random's experts on equal
    runs of tokens: UnroutedExperts) and "host-sized" (hash-random without the grouped path:
    HostSizedExperts). Random weights, eval mode."""
    moe_cfg = MoEConfig.scaled(cfg.intermediate_size)  # 4 x 768, 512 shared for BERT-base
    dense = BertForSequenceClassification(cfg, 2).to(device).eval()
    # Random importance: which neurons an expert holds does not change its cost.
    importance = torch.rand(cfg.num_hidden_layers, cfg.intermediate_size)
    counts = torch.randint(1, 1000, (cfg.vocab_size,)).float()  # token frequencies for hash-balance
    models = {}
    for name in names:
        if name == "dense":
            models[name] = dense
        elif name == "quarter-FFN":  # a token's FFN work in MoEBERT: one expert, expert_dim neurons
            small = dataclasses.replace(cfg, intermediate_size=moe_cfg.expert_dim)
            models[name] = BertForSequenceClassification(small, 2).to(device).eval()
        elif name == f"{student_layers}-layer":
            shallow = dataclasses.replace(cfg, num_hidden_layers=student_layers)
            models[name] = BertForSequenceClassification(shallow, 2).to(device).eval()
        elif name in ("unrouted", "host-sized"):
            models[name] = moebert_from_dense(dense, importance, moe_cfg).to(device).eval()
            for layer in models[name].bert.encoder.layer:  # same weights, no routing or no grouped path
                layer.moe.experts.__class__ = UnroutedExperts if name == "unrouted" else HostSizedExperts
        else:
            models[name] = moebert_from_dense(dense, importance, dataclasses.replace(moe_cfg, route=name),
                                              token_counts=counts).to(device).eval()
    return models, moe_cfg


def jitter(model, seed=0):
    """Every bias and LayerNorm moved off its init (zeros, ones), each expert's its own way, in place:
    checks of a fast path on fresh models would not see a bias it dropped or gave to the wrong expert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.2)
    return model


def forward_fn(model, batch, autocast, mask=True):
    """One forward, as run(). mask=False: no attention_mask (the batches have no padding), so that
    BertModel does not read the mask back to see whether anything is padded (a CUDA graph cannot)."""
    def run():
        with torch.inference_mode(), autocast():
            model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"] if mask else None)
    return run


def graphed(run):
    """run captured in a CUDA graph, and its replay: all its kernels launched at once, so what is timed
    is the GPU's work without the host's launching (warm-up on a side stream, as CUDA graphs need)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def inference(args, cfg, device, autocast):
    """Examples per second of dense BERT, the quarter-FFN floor, the shallow student and MoEBERT
    (every route), forward only; the cap and each model's speedups. With --cuda-graphs, each forward
    is replayed from a CUDA graph."""
    student = f"{args.student_layers}-layer"
    moes = (*moebert.ROUTES, "unrouted")  # every route, and hash-random's experts without routing
    if experts.grouped_on(device) and not args.cuda_graphs:
        moes += ("host-sized",)  # hash-random as it ran before the grouped path (no graph: it syncs)
    models, moe_cfg = inference_models(cfg, device, ["dense", "quarter-FFN", student, *moes], args.student_layers)
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # fast.py's weights
    for B in args.batch_sizes:
        batch = random_batch(cfg, B, args.seq_len, device)
        inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        runs = {}
        for name, model in models.items():
            if args.fast and name not in ("unrouted", "host-sized"):  # fast.py, its own graphs
                runs[name] = partial(FastInference(model, dtype=dtype, graphs=args.cuda_graphs), *inputs)
            else:  # the readable model; with --cuda-graphs captured once for this batch, replayed in every repeat
                run = forward_fn(model, batch, autocast, mask=not args.cuda_graphs)
                runs[name] = graphed(run) if args.cuda_graphs else run
        each = {name: [] for name in models}  # examples/s of every repeat
        for _ in range(args.repeats):  # alternate the models: drift in the machine's speed hits all alike
            for name, run in runs.items():
                each[name].append(B / timeit(run, device, args.min_seconds))
        eps = {name: max(v) for name, v in each.items()}  # best of the repeats: the least disturbed
        cap = eps["quarter-FFN"] / eps["dense"]  # = dense time / quarter-FFN time
        speedup = {name: eps[name] / eps["dense"] for name in (*moes, student)}
        row = {"batch": B,
               "examples_per_s": {k: round(v, 2) for k, v in eps.items()},
               "cap": round(cap, 3),
               "flop_ceiling": round(flop_ceiling(cfg, moe_cfg, args.seq_len), 3),
               "speedup_over_dense": {k: round(v, 3) for k, v in speedup.items()},
               "percent_of_cap": {r: round(100 * speedup[r] / cap, 1) for r in moes},
               f"{student}_over_moebert": {r: round(eps[student] / eps[r], 3) for r in moebert.ROUTES},
               # Each repeat's numbers, and the cap within each (dense and quarter-FFN back to back): its noise.
               "examples_per_s_each_repeat": {k: [round(x, 2) for x in v] for k, v in each.items()},
               "cap_each_repeat": [round(q / d, 3) for q, d in zip(each["quarter-FFN"], each["dense"])],
               # MoEBERT's share of the cap within each repeat (the models back to back), then the median:
               # where the machine's speed swings between repeats (~20% at batch 1 here), steadier than the best.
               "percent_of_cap_median": {r: round(100 * statistics.median(
                   m / q for m, q in zip(each[r], each["quarter-FFN"])), 1) for r in moes}}
        rows.append(row)
        print(f"batch {B}: dense {eps['dense']:.2f}  quarter-FFN {eps['quarter-FFN']:.2f} (cap {cap:.2f}x, "
              f"FLOP ceiling {row['flop_ceiling']:.2f}x)  {student} {eps[student]:.2f} "
              f"({speedup[student]:.2f}x dense, {row[f'{student}_over_moebert']['hash-random']:.2f}x hash-random)",
              flush=True)
        for r in moes:
            print(f"    {r:14s} {eps[r]:7.2f}  {speedup[r]:.2f}x dense  {row['percent_of_cap'][r]:5.1f}% of cap "
                  f"(median of repeats {row['percent_of_cap_median'][r]:5.1f}%)"
                  + (f"  {student} is {row[f'{student}_over_moebert'][r]:.2f}x it" if r in moebert.ROUTES else ""),
                  flush=True)
    return rows


# Op groups of the profile, first match wins; what is left is "other ops". The embeddings' lookup
# (index_select) is in the first group for both models, so it cancels in the difference.
OP_GROUPS = (
    ("gathers/scatters (index*)", ("aten::index_select", "aten::index_copy_", "aten::index_copy", "aten::index",
                                   "aten::index_put_", "aten::_index_put_impl_")),
    ("argsort/bincount/cumsum", ("aten::argsort", "aten::sort", "aten::bincount", "aten::cumsum", "aten::min",
                                 "aten::max", "aten::arange", "aten::searchsorted")),
    ("tolist (sync)", ("tolist (sync)", "aten::item", "aten::_local_scalar_dense")),
    ("LayerNorm (+ affine addcmul)", ("aten::layer_norm", "aten::native_layer_norm", "aten::addcmul")),
    ("GEMM", ("aten::linear", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::_grouped_mm")),
    ("GELU", ("aten::gelu",)),
    ("attention (SDPA)", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                          "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
                          "aten::_scaled_dot_product_cudnn_attention", "aten::_efficient_attention_forward",
                          "aten::_flash_attention_forward")),
    ("copies, allocation", ("aten::copy_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros",
                            "aten::zero_", "aten::fill_", "aten::clone", "aten::contiguous", "aten::to",
                            "aten::_to_copy", "aten::resize_")),
)
OP_GROUP = {op: group for group, ops in OP_GROUPS for op in ops}
BETWEEN_OPS = "between ops (Python, dispatch)"


def profile_forward(run, device, iters, shapes=False):
    """Per forward: ms of self time of each op (torch.profiler, CPU side; on CUDA also the device's),
    calls, and the wall time. Tensor.tolist is labelled so its time shows (on CPU it runs no aten op).
    shapes: each op apart for each shape of its inputs, keyed (op, shapes)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tolist = torch.Tensor.tolist

    def labelled_tolist(self):
        with record_function("tolist (sync)"):
            return tolist(self)
    for _ in range(2):
        run()
    torch.Tensor.tolist = labelled_tolist
    try:
        with profile(activities=activities, record_shapes=shapes) as prof:
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                run()
            sync()
            wall = time.perf_counter() - t0
    finally:
        torch.Tensor.tolist = tolist
    ops = {}
    for e in prof.key_averages(group_by_input_shape=shapes):
        key = (e.key, str(e.input_shapes)) if shapes else e.key
        ops[key] = {"ms": e.self_cpu_time_total / 1e3 / iters, "calls": e.count / iters}
        if device.type == "cuda":
            ops[key]["device_ms"] = getattr(e, "self_device_time_total", 0) / 1e3 / iters
    return ops, wall * 1e3 / iters


def group_ops(ops, wall_ms):
    """ms and op calls per forward by op group (nested ops counted too: aten::linear and its addmm);
    what the ops' self times leave of the wall time is BETWEEN_OPS."""
    groups = {name: {"ms": 0.0, "calls": 0.0} for name, _ in OP_GROUPS}
    groups["other ops"] = {"ms": 0.0, "calls": 0.0}
    for op, v in ops.items():
        g = groups[OP_GROUP.get(op, "other ops")]
        g["ms"] += v["ms"]
        g["calls"] += v["calls"]
    groups[BETWEEN_OPS] = {"ms": wall_ms - sum(v["ms"] for v in ops.values()), "calls": 0.0}
    return groups


def profile(args, cfg, device, autocast):
    """Where MoEBERT's time above the cap goes: torch.profiler on MoEBERT (--profile-route) and on the
    quarter-FFN dense model (its floor), op by op, in ms per forward; the difference is what a faster
    MoE layer could win back. Unprofiled times of both, measured alternately, give the real gap."""
    route = args.profile_route
    models, _ = inference_models(cfg, device, ["quarter-FFN", route], args.student_layers)
    results = []
    for B in args.profile_batch:
        batch = random_batch(cfg, B, args.seq_len, device)
        runs = {name: forward_fn(model, batch, autocast) for name, model in models.items()}
        # Unprofiled, alternating: the profiler's own cost per op (a few us) inflates the profiled times.
        plain = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                plain[name].append(timeit(run, device, args.min_seconds) * 1e3)
        plain = {name: min(v) for name, v in plain.items()}
        prof = {name: profile_forward(run, device, args.profile_iters) for name, run in runs.items()}
        (moe_ops, moe_wall), (floor_ops, floor_wall) = prof[route], prof["quarter-FFN"]
        moe_groups, floor_groups = group_ops(moe_ops, moe_wall), group_ops(floor_ops, floor_wall)
        gap = moe_wall - floor_wall
        groups = [{"group": g, "moebert_ms": round(moe_groups[g]["ms"], 3),
                   "quarter_ffn_ms": round(floor_groups[g]["ms"], 3),
                   "extra_ms": round(moe_groups[g]["ms"] - floor_groups[g]["ms"], 3),
                   "share_of_gap": round((moe_groups[g]["ms"] - floor_groups[g]["ms"]) / gap, 3) if gap else None,
                   "moebert_calls": round(moe_groups[g]["calls"], 1),
                   "quarter_ffn_calls": round(floor_groups[g]["calls"], 1)}
                  for g in moe_groups]
        zero = {"ms": 0.0, "calls": 0.0}
        by_op = sorted(set(moe_ops) | set(floor_ops),
                       key=lambda op: -abs(moe_ops.get(op, zero)["ms"] - floor_ops.get(op, zero)["ms"]))
        top_ops = [{"op": op, "group": OP_GROUP.get(op, "other ops"),
                    "moebert_ms": round(moe_ops.get(op, zero)["ms"], 3),
                    "quarter_ffn_ms": round(floor_ops.get(op, zero)["ms"], 3),
                    "extra_ms": round(moe_ops.get(op, zero)["ms"] - floor_ops.get(op, zero)["ms"], 3),
                    "moebert_calls": round(moe_ops.get(op, zero)["calls"], 1),
                    "quarter_ffn_calls": round(floor_ops.get(op, zero)["calls"], 1)} for op in by_op[:args.profile_top]]
        row = {"batch": B, "route": route, "iterations": args.profile_iters,
               "unprofiled_ms": {"moebert": round(plain[route], 3), "quarter_ffn": round(plain["quarter-FFN"], 3),
                                 "gap": round(plain[route] - plain["quarter-FFN"], 3),
                                 "moebert_over_quarter_ffn": round(plain[route] / plain["quarter-FFN"], 3)},
               "profiled_ms": {"moebert": round(moe_wall, 3), "quarter_ffn": round(floor_wall, 3),
                               "gap": round(gap, 3)},
               "groups": groups, "top_ops": top_ops}
        if device.type == "cuda":  # the device's own kernel time per op group
            for g in groups:
                g["moebert_device_ms"] = round(sum(v["device_ms"] for op, v in moe_ops.items()
                                                   if OP_GROUP.get(op, "other ops") == g["group"]), 3)
                g["quarter_ffn_device_ms"] = round(sum(v["device_ms"] for op, v in floor_ops.items()
                                                       if OP_GROUP.get(op, "other ops") == g["group"]), 3)
        results.append(row)
        u = row["unprofiled_ms"]
        print(f"batch {B}, {route}: unprofiled {u['moebert']:.2f} ms vs quarter-FFN {u['quarter_ffn']:.2f} ms "
              f"(gap {u['gap']:.2f} ms, {100 * u['quarter_ffn'] / u['moebert']:.1f}% of cap); profiled "
              f"{moe_wall:.2f} vs {floor_wall:.2f} ms, {args.profile_iters} forwards each")
        print(f"    {'group':32s} {'MoEBERT':>9s} {'quarter':>9s} {'extra':>9s} {'of gap':>7s}  calls")
        for g in groups:
            share = "" if g["share_of_gap"] is None else f"{100 * g['share_of_gap']:6.1f}%"
            print(f"    {g['group']:32s} {g['moebert_ms']:9.3f} {g['quarter_ffn_ms']:9.3f} {g['extra_ms']:9.3f} "
                  f"{share:>7s}  {g['moebert_calls']:g} vs {g['quarter_ffn_calls']:g}")
        print("    top ops by extra ms: " + ", ".join(f"{o['op']} {o['extra_ms']:+.3f} "
                                                       f"({o['moebert_calls']:g} vs {o['quarter_ffn_calls']:g} calls)"
                                                       for o in top_ops[:6]), flush=True)
    return results


def official_importance(model, batch, examples=None):
    """The official MoEBERT importance preprocessing, as written (SimiaoZuo/MoEBERT at cd21f57):
    one *batched* forward with per-example losses; then, layer by layer and within a layer example by
    example, one autograd.grad for W1 and one for W2 (retain_graph=True), adding up
    |sum over a row of W1 * dW1 + sum over a column of W2 * dW2| over the examples. It follows
      src/transformers/models/bert/modeling_bert.py, BertForSequenceClassification:
        1505-1519 (forward_clean): CrossEntropyLoss / MSELoss with reduction="none" for the importance;
        1564-1581 (forward): the loops over layers and examples, the two grads, the sum;
      examples/text-classification/run_glue.py 411-414: the importance is taken in evaluation only;
      src/transformers/trainer.py 1853: model.eval(); 1976-1982: prediction_step's forward, outside
        torch.no_grad when preprocessing the importance; 1728-1733: the summed scores, pickled.
    Scores accumulate in the model's dtype, as there; returned as float64 on the CPU, [layers, I].
    Classification and regression heads (as the official BertForSequenceClassification).

    examples: only the first `examples` examples' losses (the forward is still the whole batch), to
    time a slice of the loop and scale it; 0 runs the forward and nothing else."""
    was_training = model.training
    model.eval()
    try:
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
        loss = moebert.task_loss(logits, batch["labels"], reduction="none")  # [B]: one loss per example
        n = len(loss) if examples is None else examples
        scores = []
        for layer in model.bert.encoder.layer:
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
            total = torch.zeros(w1.size(0), dtype=w1.dtype, device=w1.device)
            for i in range(n):
                g1 = torch.autograd.grad(loss[i], w1, retain_graph=True)[0]
                g2 = torch.autograd.grad(loss[i], w2, retain_graph=True)[0]
                total += ((w1 * g1).sum(1).detach() + (w2 * g2).sum(0).detach()).abs()
            scores.append(total)
        return torch.stack(scores).double().cpu()
    finally:
        model.train(was_training)


def naive_importance(model, batch):
    """The official algorithm: per example, per layer autograd.grad of W1 and W2."""
    L, I = model.config.num_hidden_layers, model.config.intermediate_size
    scores = torch.zeros(L, I, dtype=torch.float64)
    for b in range(batch["input_ids"].size(0)):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        logits = model(one["input_ids"], one["token_type_ids"], one["attention_mask"]).logits
        loss = moebert.task_loss(logits, one["labels"])
        for l, layer in enumerate(model.bert.encoder.layer):
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
            g1, g2 = torch.autograd.grad(loss, [w1, w2], retain_graph=True)
            scores[l] += ((w1 * g1).sum(1) + (w2 * g2).sum(0)).abs().double().cpu()
    return scores


def importance(args, cfg, device, autocast=None):
    """Seconds for one batch: importance_scores, the official algorithm, a plain forward + backward,
    and naive_importance (a cheaper per-example variant: a forward per example, both
    weights in one grad). In fp32 on every device, as train.py computes importance (autocast unused)."""
    model = BertForSequenceClassification(cfg, 2).to(device).eval()
    batch = random_batch(cfg, args.importance_batch, args.seq_len, device)
    B, n = args.importance_batch, min(args.official_examples or args.importance_batch, args.importance_batch)

    def plain():
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
        moebert.task_loss(logits, batch["labels"], reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    # The floor: one forward and a full backward (weight gradients included) over the same batch.
    ours = timeit(lambda: moebert.importance_scores(model, [batch]), device, args.min_seconds)
    floor = timeit(plain, device, args.min_seconds)
    # The official loop is slow (2 x layers x examples backward passes over the whole batch): timed once.
    # With fewer examples than the batch, its loop scales linearly in them (each example's grads cost
    # the same); the batched forward is timed on its own (examples=0) and counted once.
    forward = timeit(lambda: official_importance(model, batch, examples=0), device, args.min_seconds)
    official_n = timeit(lambda: official_importance(model, batch, examples=n), device, 0, warmup=0)
    official = forward + (official_n - forward) * B / n
    naive = timeit(lambda: naive_importance(model, batch), device, 0, warmup=0)
    row = {"batch": B, "layers": cfg.num_hidden_layers, "ours_s": round(ours, 3),
           "forward_backward_s": round(floor, 3), "ours_over_forward_backward": round(ours / floor, 3),
           "official_s": round(official, 3), "official_timed_examples": n,
           "official_scaled": n < B, "official_forward_s": round(forward, 3),
           "official_timed_s": round(official_n, 3), "official_over_ours": round(official / ours, 1),
           "naive_variant_s": round(naive, 3), "naive_variant_over_ours": round(naive / ours, 1)}
    note = (f" (timed on {n} of {B} examples: the forward {forward:.3f} s once, the grad loop "
            f"{official_n - forward:.3f} s scaled by {B}/{n})") if n < B else ""
    print(f"ours {ours:.3f} s  forward+backward {floor:.3f} s (ours {row['ours_over_forward_backward']:.2f}x it)\n"
          f"official (batched forward, per example and layer a grad for W1 and one for W2) {official:.3f} s, "
          f"{row['official_over_ours']:.1f}x ours{note}\n"
          f"naive variant (a forward per example, W1 and W2 in one grad) {naive:.3f} s, "
          f"{row['naive_variant_over_ours']:.1f}x ours", flush=True)
    return row


def make_step(model, loss_fn, autocast):
    """One training step of `model` (loss_fn(model) -> loss) as train.py takes it; and its optimizer.
    AdamW fused where torch has it, as in train.py and transformers' Trainer's default (adamw_torch_fused)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_adamw(next(model.parameters()).device))

    def step():
        with autocast():
            loss = loss_fn(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


def training(args, cfg, device, autocast):
    """Examples per second of a fine-tuning step (ours vs transformers) and a distillation step."""
    import transformers
    B = args.train_batch
    batch = random_batch(cfg, B, args.seq_len, device)
    ours = BertForSequenceClassification(cfg, 2).to(device).train()
    hf_cfg = transformers.BertConfig(**cfg.to_dict(), num_labels=2)
    hf = transformers.BertForSequenceClassification(hf_cfg).to(device).train()  # its default attention: SDPA
    hf.load_state_dict(ours.state_dict(), strict=False)  # same names, same weights: the same work
    moe = moebert_from_dense(ours, torch.rand(cfg.num_hidden_layers, cfg.intermediate_size),
                             MoEConfig.scaled(cfg.intermediate_size)).to(device).train()
    # The distillation step: a frozen teacher's forward + the student's forward and backward.
    teacher = BertForSequenceClassification(cfg, 2).to(device).eval().requires_grad_(False)
    inputs = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]

    def distill(model):
        out = model(*inputs, output_hidden_states=True)
        with torch.no_grad():
            t = teacher(*inputs, output_hidden_states=True)
        return moebert.task_loss(out.logits, batch["labels"]) + moebert.distillation_loss(out, t)

    steps = {
        "teacher step (ours)": make_step(ours, lambda m: moebert.task_loss(m(*inputs).logits, batch["labels"]),
                                         autocast)[0],
        "teacher step (transformers)": make_step(hf, lambda m: m(input_ids=inputs[0], token_type_ids=inputs[1],
                                                                attention_mask=inputs[2], labels=batch["labels"]).loss,
                                                 autocast)[0],
        "distillation step (ours)": make_step(moe, distill, autocast)[0],
    }
    seconds = {name: [] for name in steps}
    for _ in range(args.train_repeats):  # alternate, so that drift in the machine's speed hits all alike
        for name, step in steps.items():
            seconds[name].append(timeit(step, device, args.min_seconds))
    row = {"batch": B, **{name: round(B / min(s), 2) for name, s in seconds.items()}}  # best of repeats
    row["ours / transformers"] = round(row["teacher step (ours)"] / row["teacher step (transformers)"], 3)
    # The same ratio within each repeat (back-to-back measurements): its spread is the noise.
    row["ours / transformers, each repeat"] = [
        round(hf / ours, 3) for ours, hf in zip(seconds["teacher step (ours)"], seconds["teacher step (transformers)"])]
    print("  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    return row


def checkpoints(args, cfg, device, autocast):
    """A training checkpoint (runtime.save_checkpoint: weights, AdamW's moments, RNGs) of BERT-base
    and of MoEBERT-base: size, write and read seconds, and its share of a stage that writes one
    every --save-every steps. The step is a plain fine-tuning step, the fastest a stage takes
    (distillation adds a teacher forward), so the share is an upper bound."""
    import tempfile
    import runtime
    batch = random_batch(cfg, args.train_batch, args.seq_len, device)
    dense = BertForSequenceClassification(cfg, 2).to(device)
    moe = moebert_from_dense(dense, torch.rand(cfg.num_hidden_layers, cfg.intermediate_size),
                             MoEConfig.scaled(cfg.intermediate_size)).to(device)
    rows = {}
    # On the disk the results go to, as a run's checkpoints go beside its outputs.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as tmp:
        for name, model in (("dense", dense), ("moebert", moe)):
            model.train()
            step, opt = make_step(model, lambda m: moebert.task_loss(
                m(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits, batch["labels"]),
                autocast)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            step_s = timeit(step, device, args.min_seconds)  # also fills AdamW's moments
            path = os.path.join(tmp, "checkpoint.safetensors")
            state = dict(step=1, epoch=0, batch=1, best=None)
            write = [timeit(lambda: runtime.save_checkpoint(path, model, opt, sched, state, device), device, 0,
                            warmup=0) for _ in range(3)]
            read = timeit(lambda: runtime.load_checkpoint(path, model, opt, sched, device), device, 0, warmup=0)
            rows[name] = {"size_mb": round(os.path.getsize(path) / 1e6, 1), "write_s": round(min(write), 2),
                          "write_s_each": [round(w, 2) for w in write], "read_s": round(read, 2),
                          "train_step_s": round(step_s, 4), "save_every": args.save_every,
                          "share_of_stage": round(min(write) / (min(write) + args.save_every * step_s), 5)}
            print(f"{name}: " + "  ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)
            os.remove(path)
    return rows


def machine(device):
    fields = {}  # "key: value" lines of the first CPU's block of /proc/cpuinfo, where there is one
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    # What the numbers depend on, stored with them. Virtual machines often name only the vendor ("AMD
    # EPYC"): family and model tell its generation, and torch's capability which vector kernels ran.
    info = {"cpu": fields.get("model name", platform.processor()), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "cpu family" in fields:
        info["cpu_family_model"] = f"{fields['cpu family']}/{fields.get('model', '?')}"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    p.add_argument("--threads", type=COUNT, default=2, help="CPU threads")
    p.add_argument("--seq-len", type=COUNT, default=128, help="tokens per example, no padding")
    p.add_argument("--batch-sizes", type=COUNT, nargs="+", default=[1, 8, 32, 128], help="inference batch sizes")
    p.add_argument("--importance-batch", type=COUNT, default=16, help="examples in the importance batch")
    p.add_argument("--train-batch", type=COUNT, default=32, help="batch of the training steps")
    p.add_argument("--min-seconds", type=POSITIVE, default=3.0, help="time each measurement at least this long")
    p.add_argument("--repeats", type=COUNT, default=2, help="alternating repeats of the inference measurements")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time inference as CUDA graph replays: the GPU's work without the host's launching")
    p.add_argument("--fast", action="store_true", help="inference through fast.py (bf16 weights on CUDA, fp32 on "
                   "CPU; its own graphs with --cuda-graphs) for dense BERT and every route")
    p.add_argument("--train-repeats", type=COUNT, default=4, help="alternating repeats of the training steps")
    p.add_argument("--student-layers", type=COUNT, help="layers of the shallow dense student (default: half, 6)")
    p.add_argument("--profile-batch", type=COUNT, nargs="+", default=[1, 8], help="batch sizes of the profile")
    p.add_argument("--profile-route", default="hash-random", choices=moebert.ROUTES, help="MoEBERT route profiled")
    p.add_argument("--profile-iters", type=COUNT, default=10, help="profiled forwards of each model")
    p.add_argument("--profile-top", type=COUNT, default=12, help="ops listed (in the JSON) by extra time")
    p.add_argument("--official-examples", type=COUNT,
                   help="time the official importance loop on this many examples of the batch and scale "
                        "linearly (default: all, no scaling)")
    parts = ["inference", "profile", "importance", "training", "checkpoint"]
    p.add_argument("--only", nargs="+", choices=parts, default=parts, help="run only these parts")
    p.add_argument("--save-every", type=COUNT, default=2000, help="checkpoint interval (steps) for the share of a stage")
    p.add_argument("--quick", action="store_true", help="a small 4-layer config, to check the script")
    p.add_argument("--out", default="bench.json", help="where to write the results")
    args = p.parse_args()
    if os.path.isdir(args.out):  # found now, not after the run
        p.error(f"--out {args.out} is a folder; pass a file path, e.g. {os.path.join(args.out, 'bench.json')}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its folder does not exist; make it or pass another path")
    if args.cuda_graphs and args.device != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    try:
        check_device(args.device)  # one error line for a device this machine lacks, not a traceback
    except UserError as e:
        p.error(str(e))
    if args.cuda_graphs and not args.fast and not experts.grouped_on(args.device):
        p.error("--cuda-graphs: on this GPU (no grouped-matmul kernel in torch: compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(args.device)))}) the readable MoEBERT "
                "reads its experts' sizes back, which a CUDA graph cannot capture; add --fast")
    cfg = BertConfig()  # BERT-base: 12 layers, 768 wide, FFN 3072, MoE 4 x 768 with 512 shared
    if args.quick:
        cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        args.batch_sizes, args.min_seconds, args.repeats, args.train_repeats = [1, 8], 0.5, 1, 1
        args.profile_iters = min(args.profile_iters, 5)
        args.official_examples = args.official_examples or 4  # exercises the scaled timing; BERT-base: all
    args.student_layers = args.student_layers or cfg.num_hidden_layers // 2
    if args.seq_len > cfg.max_position_embeddings:
        p.error(f"--seq-len {args.seq_len}: BERT has {cfg.max_position_embeddings} positions; give at most that")
    if args.student_layers > cfg.num_hidden_layers:
        p.error(f"--student-layers {args.student_layers}: the model has {cfg.num_hidden_layers} layers")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":  # as train.py does: large activations stop page-faulting, for every model alike
        args.keep_freed_memory = keep_freed_memory()
    torch.manual_seed(0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    results = {"machine": machine(device), "settings": {
        **vars(args), "config": cfg.to_dict(),
        "statistic": "best of the alternating repeats (highest examples/s, lowest ms); every repeat kept too"}}
    print(f"{results['machine']}\nseq_len {args.seq_len}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    stages = [("inference", "1. inference, examples/s", inference),
              ("profile", f"2. where {args.profile_route}'s time above the quarter-FFN floor goes, ms per forward",
               profile),
              ("importance", f"3. importance of one batch of {args.importance_batch}, seconds", importance),
              ("training", "4. training steps, examples/s", training),
              ("checkpoint", f"5. training checkpoint (batch {args.train_batch}, every {args.save_every} steps)",
               checkpoints)]
    for name, title, run in stages:
        if name in args.only:
            print(f"\n{title}")
            results[name] = run(args, cfg, device, autocast)
            atomic_write_json(args.out, results)  # after each part: a run cut short keeps what it measured
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
