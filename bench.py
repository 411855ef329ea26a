"""Speed: MoEBERT vs dense BERT, our importance vs the official algorithm, our training steps vs
Hugging Face. Random weights (speed does not depend on them). Prints tables, writes JSON.

    python bench.py                       # CPU, fp32, 2 threads (about 25 minutes for BERT-base)
    python bench.py --device cuda         # GPU, bf16 autocast
    python bench.py --quick               # a small config, a minute, to check the script runs

`transformers` is used here only as the peer to compare with; the project does not need it.
"""
import argparse
import dataclasses
import json
import os
import platform
import time
from contextlib import nullcontext

import torch

import moebert
from bert import BertConfig, BertForSequenceClassification
from moebert import MoEConfig, moebert_from_dense
from train import keep_freed_memory


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


def inference(args, cfg, device, autocast):
    """Examples per second of dense BERT and MoEBERT (every route), forward only."""
    dense = BertForSequenceClassification(cfg, 2).to(device).eval()
    # Random importance: which neurons an expert holds does not change its cost.
    importance = torch.rand(cfg.num_hidden_layers, cfg.intermediate_size)
    counts = torch.randint(1, 1000, (cfg.vocab_size,)).float()  # token frequencies for hash-balance
    moe_cfg = MoEConfig.scaled(cfg.intermediate_size)  # 4 x 768, 512 shared for BERT-base
    models = {"dense": dense}
    for route in moebert.ROUTES:
        models[route] = moebert_from_dense(dense, importance, dataclasses.replace(moe_cfg, route=route),
                                           token_counts=counts).to(device).eval()
    rows = []
    for B in args.batch_sizes:
        batch = random_batch(cfg, B, args.seq_len, device)
        row = {"batch": B, "ceiling": round(flop_ceiling(cfg, moe_cfg, args.seq_len), 3)}
        for _ in range(args.repeats):  # alternate the models, keep each one's best: less noise
            for name, model in models.items():
                def run():
                    with torch.inference_mode(), autocast():
                        model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
                row[name] = round(max(row.get(name, 0), B / timeit(run, device, args.min_seconds)), 2)
        for route in moebert.ROUTES:
            row[f"{route} speedup"] = round(row[route] / row["dense"], 3)
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def importance(args, cfg, device):
    """Seconds for one batch: importance_scores, the naive official loop, plain forward + backward."""
    model = BertForSequenceClassification(cfg, 2).to(device).eval()
    batch = random_batch(cfg, args.importance_batch, args.seq_len, device)

    def plain():
        logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
        moebert.task_loss(logits, batch["labels"], reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    # The floor: one forward and a full backward (weight gradients included) over the same batch.
    ours = timeit(lambda: moebert.importance_scores(model, [batch]), device, args.min_seconds)
    floor = timeit(plain, device, args.min_seconds)
    from test_moebert import naive_importance  # the official per-example, per-layer loop
    naive = timeit(lambda: naive_importance(model, batch), device, 0, warmup=0)  # slow: timed once
    row = {"batch": args.importance_batch, "layers": cfg.num_hidden_layers, "ours_s": round(ours, 3),
           "forward_backward_s": round(floor, 3), "naive_official_s": round(naive, 3),
           "speedup_vs_naive": round(naive / ours, 1), "ours_over_forward_backward": round(ours / floor, 3)}
    print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return row


def make_step(model, loss_fn, autocast):
    """One training step of `model` (loss_fn(model) -> loss) as train.py takes it; and its optimizer.
    Fused AdamW, as train.py uses and as transformers' Trainer does by default (adamw_torch_fused)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

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
    """A training checkpoint (train.save_checkpoint: weights, AdamW's moments, RNGs) of BERT-base
    and of MoEBERT-base: size, write and read seconds, and its share of a stage that writes one
    every --save-every steps. The step is a plain fine-tuning step, the fastest a stage takes
    (distillation adds a teacher forward), so the share is an upper bound."""
    import tempfile
    import train
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
            write = [timeit(lambda: train.save_checkpoint(path, model, opt, sched, state, device), device, 0,
                            warmup=0) for _ in range(3)]
            read = timeit(lambda: train.load_checkpoint(path, model, opt, sched, device), device, 0, warmup=0)
            rows[name] = {"size_mb": round(os.path.getsize(path) / 1e6, 1), "write_s": round(min(write), 2),
                          "write_s_each": [round(w, 2) for w in write], "read_s": round(read, 2),
                          "train_step_s": round(step_s, 4), "save_every": args.save_every,
                          "share_of_stage": round(min(write) / (min(write) + args.save_every * step_s), 5)}
            print(f"{name}: " + "  ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)
            os.remove(path)
    return rows


def machine(device):
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    # What the numbers depend on, stored with them.
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example, no padding")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128], help="inference batch sizes")
    p.add_argument("--importance-batch", type=int, default=16, help="examples in the importance batch")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the training steps")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of the inference measurements")
    p.add_argument("--train-repeats", type=int, default=4, help="alternating repeats of the training steps")
    p.add_argument("--only", nargs="+", choices=["inference", "importance", "training", "checkpoint"],
                   default=["inference", "importance", "training", "checkpoint"], help="run only these parts")
    p.add_argument("--save-every", type=int, default=2000, help="checkpoint interval (steps) for the share of a stage")
    p.add_argument("--quick", action="store_true", help="a small 4-layer config, to check the script")
    p.add_argument("--out", default="bench.json", help="where to write the results")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":  # as train.py does: large activations stop page-faulting, for every model alike
        args.keep_freed_memory = keep_freed_memory()
    torch.manual_seed(0)
    cfg = BertConfig()  # BERT-base: 12 layers, 768 wide, FFN 3072, MoE 4 x 768 with 512 shared
    if args.quick:
        cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        args.batch_sizes, args.min_seconds, args.repeats, args.train_repeats = [1, 8], 0.5, 1, 1
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    results = {"machine": machine(device), "settings": {**vars(args), "config": cfg.to_dict()}}
    print(f"{results['machine']}\nseq_len {args.seq_len}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    if "inference" in args.only:
        print("\n1. inference, examples/s")
        results["inference"] = inference(args, cfg, device, autocast)
    if "importance" in args.only:
        print(f"\n2. importance of one batch of {args.importance_batch}, seconds")
        results["importance"] = importance(args, cfg, device)
    if "training" in args.only:
        print("\n3. training steps, examples/s")
        results["training"] = training(args, cfg, device, autocast)
    if "checkpoint" in args.only:
        print(f"\n4. training checkpoint (batch {args.train_batch}, every {args.save_every} steps)")
        results["checkpoint"] = checkpoints(args, cfg, device, autocast)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
