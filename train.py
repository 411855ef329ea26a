"""The whole MoEBERT method on one GLUE task:  python train.py --task rte

  1. fine-tune the BERT teacher on the task (or take one with --teacher)
  2. importance of every FFN neuron on the training split (paper Eq. 4)
  3. MoEBERT from the teacher: FFNs split into experts by importance (paper section 3.2)
  4. layer-wise distillation from the frozen teacher (paper section 3.3)
  5. evaluation of teacher and MoEBERT on dev

Each stage writes its output into --out and is skipped when it is there and was made with the
same settings; --force redoes them. A stage's folder appears only when the stage has finished.
"""
import argparse
import ctypes
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
from safetensors.torch import load_file, save_file

import data
import moebert
from bert import BertForSequenceClassification, atomic_write_json, find_vocab, makedirs, resolve_pretrained
from moebert import MoEBertForSequenceClassification, MoEConfig

# Paper Table 7, the distillation stage: lr, batch size, epochs, weight decay, lambda, max length.
# STS-B and WNLI are not in the table; they borrow MRPC's and RTE's settings.
PAPER = {
    "rte": (1e-5, 8, 10, 0.01, 1.0, 512),
    "cola": (2e-5, 8, 10, 0.0, 3.0, 512),
    "mrpc": (3e-5, 8, 5, 0.0, 2.0, 512),
    "sst2": (2e-5, 16, 5, 0.0, 1.0, 512),
    "qnli": (2e-5, 32, 5, 0.0, 2.0, 512),
    "qqp": (3e-5, 64, 5, 0.0, 1.0, 128),
    "mnli": (5e-5, 64, 5, 0.0, 5.0, 128),
    "stsb": (3e-5, 8, 5, 0.0, 2.0, 512),
    "wnli": (1e-5, 8, 10, 0.01, 1.0, 512),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(data.TASKS), help="GLUE task")
    p.add_argument("--data-dir", help="folder with the task's TSV files (default: download into the cache)")
    p.add_argument("--bert", default="bert-base-uncased",
                   help="pretrained BERT: a release name (downloaded), a Google release folder or a Hugging Face folder")
    p.add_argument("--teacher", help="a fine-tuned teacher folder (skips stage 1), e.g. another run's OUT/teacher")
    p.add_argument("--out", help="output folder (default: out/<task>)")
    p.add_argument("--force", action="store_true", help="redo every stage even when its output exists")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the teacher and MoEBERT stored in --out")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, dropout, hash tables")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype: bf16 autocast (weights stay fp32) "
                   "or plain fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-seq-length", type=int, help="truncate pairs to this many tokens (default: the paper's, "
                   "512, or 128 for MNLI and QQP)")
    p.add_argument("--max-train-examples", type=int, help="use only the first N training examples (quick runs)")
    p.add_argument("--max-eval-examples", type=int, help="evaluate on only the first N dev examples")
    p.add_argument("--eval-batch-size", type=int, default=128, help="batch size for evaluation and importance")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N steps")
    t = p.add_argument_group("teacher fine-tuning (stage 1): the standard BERT GLUE recipe by default")
    t.add_argument("--epochs", type=float, help="epochs of both training stages unless a stage's own flag is "
                   "given (default: 3 for the teacher, the paper's for distillation)")
    t.add_argument("--teacher-epochs", type=float, help="teacher epochs (default: --epochs, else 3)")
    t.add_argument("--lr", type=float, default=2e-5, help="teacher learning rate")
    t.add_argument("--batch-size", type=int, default=32, help="teacher batch size")
    t.add_argument("--weight-decay", type=float, default=0.01, help="teacher AdamW weight decay")
    t.add_argument("--warmup", type=float, default=0.1, help="teacher warm-up, a fraction of the steps")
    m = p.add_argument_group("MoEBERT (stages 2-4); defaults: the paper's Table 7 for the task")
    m.add_argument("--num-experts", type=int, default=4, help="experts per layer")
    m.add_argument("--expert-dim", type=int, help="neurons per expert (default: intermediate size / 4)")
    m.add_argument("--shared-dim", type=int, help="most important neurons shared by all experts (default: 2/3 "
                   "of expert-dim; 768 and 512 for BERT-base)")
    m.add_argument("--route", default="hash-random", choices=moebert.ROUTES, help="routing")
    m.add_argument("--split", default="importance", choices=moebert.SPLITS, help="how neurons are ranked (ablation)")
    m.add_argument("--expert-dropout", type=float, default=0.1, help="dropout inside the experts")
    m.add_argument("--balance-weight", type=float, default=0.0, help="gate load-balance loss weight")
    m.add_argument("--distill-lambda", type=float, help="weight lambda of the distillation loss (0: CE alone)")
    m.add_argument("--distill-epochs", type=float, help="distillation epochs")
    m.add_argument("--distill-lr", type=float, help="distillation learning rate")
    m.add_argument("--distill-batch-size", type=int, help="distillation batch size")
    m.add_argument("--distill-weight-decay", type=float, help="distillation weight decay")
    args = p.parse_args(argv)
    lr, bs, epochs, wd, lam, max_len = PAPER[args.task]
    pick = lambda value, default: default if value is None else value
    args.out = pick(args.out, os.path.join("out", args.task))
    args.dtype = pick(args.dtype, "bf16" if args.device.startswith("cuda") else "fp32")
    args.max_seq_length = pick(args.max_seq_length, max_len)
    args.teacher_epochs = pick(args.teacher_epochs, pick(args.epochs, 3.0))
    args.distill_epochs = pick(args.distill_epochs, pick(args.epochs, epochs))
    args.distill_lr = pick(args.distill_lr, lr)
    args.distill_batch_size = pick(args.distill_batch_size, bs)
    args.distill_weight_decay = pick(args.distill_weight_decay, wd)
    args.distill_lambda = pick(args.distill_lambda, lam)
    return args


# ----------------------------------------------------------------------------------------------
# Training and evaluation loops, shared by the teacher and the student


def autocast(device, dtype):
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def keep_freed_memory():
    """CPU: keep freed memory in the process. glibc hands each block over 32 MB out as a fresh
    mapping and unmaps it when freed, so every large activation page-faults anew; that made BERT-base
    inference at batch 32 ~25% slower here (README, Speed). Returns whether glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3): blocks up to 1 GB come from the heap; M_TRIM_THRESHOLD (-1): never trim it.
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return False


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict(model, features, args, device):
    """Predictions in the order of `features`: label indices, or scores for regression."""
    model.eval()
    preds = [None] * len(features)
    for batch in data.batches(features, args.eval_batch_size, sort_by_length=True):
        b = to_device(batch, device)
        with autocast(device, args.dtype):
            logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits.float()
        p = logits[:, 0] if logits.size(-1) == 1 else logits.argmax(-1)
        for i, v in zip(batch["index"].tolist(), p.tolist()):
            preds[i] = v
    return preds


def evaluate(model, dev_sets, args, device):
    """Metrics on every dev set; MNLI's mismatched ones get the suffix _mm."""
    metrics = {}
    for suffix, features in dev_sets.items():
        m = data.compute_metrics(args.task, predict(model, features, args, device), [f["label"] for f in features])
        metrics.update({k + suffix: v for k, v in m.items()})
    return metrics


def decays(name):
    """Weight decay for matrices and embeddings, none for biases and LayerNorm: BERT's rule, by
    name as in its optimization.py (so it also reads the experts' stacked [N, ...] tensors)."""
    return "bias" not in name and "LayerNorm" not in name


def fit(model, loss_fn, train_features, dev_sets, stage_dir, hp, args, device, log):
    """AdamW with linear decay (and optional warm-up), clipping at 1.0, an evaluation on dev after
    each epoch, the best dev checkpoint saved to stage_dir. loss_fn(model, batch) -> (loss, parts)."""
    torch.manual_seed(args.seed)  # the same dropout masks for the same --seed, whatever ran before
    decay = [p for n, p in model.named_parameters() if decays(n)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=hp["lr"],
                            fused=True)  # one kernel over all parameters: ~5x faster steps on CPU too
    # Epochs may be fractional (quick runs): training stops after that many steps.
    steps_per_epoch = math.ceil(len(train_features) / hp["batch_size"])
    total = max(1, round(hp["epochs"] * steps_per_epoch))
    warmup = round(hp.get("warmup", 0.0) * total)  # the paper's distillation has none
    # Linear warm-up to lr, then linear decay to 0 at the last step.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    main = data.TASKS[args.task].metric  # the dev metric that picks the checkpoint
    best, step, t0, seen = None, 0, time.time(), 0
    for epoch in range(math.ceil(hp["epochs"])):
        model.train()
        # A new, reproducible order each epoch; batches of similar lengths, so little padding.
        for batch in data.batches(train_features, hp["batch_size"], shuffle=True, seed=args.seed * 1000 + epoch,
                                  group_by_length=True):
            if step == total:
                break
            batch = to_device(batch, device)
            with autocast(device, args.dtype):
                loss, parts = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as BERT and the paper
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, seen = step + 1, seen + len(batch["labels"])
            if step % args.log_every == 0 or step == total:
                rate = seen / (time.time() - t0)
                eta = (total - step) * hp["batch_size"] / rate
                parts = {k: round(v.item(), 4) for k, v in parts.items()}  # .item() waits for the GPU: log steps only
                log(dict(stage=hp["stage"], step=step, total=total, **parts, lr=sched.get_last_lr()[0],
                         examples_per_s=round(rate, 1), eta_s=round(eta)))
        metrics = evaluate(model, dev_sets, args, device)
        log(dict(stage=hp["stage"], epoch=epoch + 1, step=step, dev=metrics))
        # Keep the best dev epoch, as GLUE dev results (the paper's included) are usually reported.
        if best is None or metrics[main] > best[main]:
            best = dict(metrics, epoch=epoch + 1)
            model.save_pretrained(stage_dir)
    return best


# ----------------------------------------------------------------------------------------------
# Stages: their outputs, and whether a finished one fits the current settings


def finished(folder, settings, force):
    """True when `folder` holds a finished stage made with `settings`; refuse a mismatch."""
    if os.path.exists(folder + ".partial"):
        print(f"{folder}: an earlier run stopped during this stage; it is redone from the start")
        shutil.rmtree(folder + ".partial")
    done = os.path.join(folder, "settings.json")
    if force or not os.path.exists(done):
        return False
    with open(done) as f:
        old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise SystemExit(f"{folder} was made with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}).\n"
                         f"Use another --out, or --force to redo it.")
    print(f"{folder}: done already, reused")
    return True


def publish(partial, folder, settings):
    """Mark a stage finished: its settings beside its output, then one atomic rename."""
    atomic_write_json(os.path.join(partial, "settings.json"), settings)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def check_teacher(path, task, num_labels):
    """A --teacher must be a fine-tuned classifier for this task's labels with its vocabulary."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise SystemExit(f"--teacher {path}: no config.json; pass a fine-tuned teacher folder, e.g. out/{task}/teacher")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("num_labels") != num_labels:
        raise SystemExit(f"--teacher {path} has {cfg.get('num_labels')} labels; {task} needs {num_labels}")
    vocab = find_vocab(path)
    with open(vocab, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    if n != cfg.get("vocab_size"):
        raise SystemExit(f"--teacher {path}: vocab.txt has {n} tokens but the model has {cfg.get('vocab_size')}")


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the classifier head and the gates are drawn from it too
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    task = data.TASKS[args.task]
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

    # One --out holds one task's run: refuse to mix another task into it.
    run_file = os.path.join(args.out, "run.json")
    if os.path.exists(run_file):
        with open(run_file) as f:
            if (prev := json.load(f)["task"]) != args.task:
                raise SystemExit(f"{args.out} holds a run of task {prev}; use another --out for {args.task}")
    if args.eval_only:  # nothing will be trained: both models must be there
        for d in (args.teacher or os.path.join(args.out, "teacher"), os.path.join(args.out, "moebert")):
            if not os.path.exists(os.path.join(d, "model.safetensors")):
                raise SystemExit(f"{d} holds no finished model; run without --eval-only first")
    atomic_write_json(run_file, {"task": args.task})
    times = {}

    # Data: tokenizer from the teacher's (or the pretrained model's) vocabulary.
    num_labels = 1 if task.labels is None else len(task.labels)
    if args.teacher:
        check_teacher(args.teacher, args.task, num_labels)
    source = args.teacher or resolve_pretrained(args.bert)
    vocab = find_vocab(source)
    tokenizer = data.load_tokenizer(vocab, lowercase=data.is_uncased(vocab))
    folder = data.glue_dir(args.task, args.data_dir)
    encode = lambda split, n: data.encode(data.read_glue(args.task, folder, split)[:n], tokenizer, args.max_seq_length)
    train_features = encode("train", args.max_train_examples)
    dev_sets = {"": encode("dev", args.max_eval_examples)}
    if args.task == "mnli":
        dev_sets["_mm"] = encode("dev_mismatched", args.max_eval_examples)
    # What every stage's output depends on; a stage reused with other settings would mix results.
    data_settings = dict(task=args.task, max_seq_length=args.max_seq_length, seed=args.seed,
                         train_examples=len(train_features), dev_examples=len(dev_sets[""]))

    # Stage 1: the teacher.
    teacher_dir = os.path.join(args.out, "teacher")
    teacher_settings = dict(data_settings, bert=args.bert, teacher=args.teacher, epochs=args.teacher_epochs,
                            lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                            warmup=args.warmup)
    if args.teacher:
        teacher_dir = args.teacher
    elif not (args.eval_only or finished(teacher_dir, teacher_settings, args.force)):
        t0 = time.time()
        teacher = BertForSequenceClassification.from_pretrained(source, num_labels=num_labels).to(device)
        hp = dict(stage="teacher", epochs=args.teacher_epochs, lr=args.lr, batch_size=args.batch_size,
                  weight_decay=args.weight_decay, warmup=args.warmup)

        def ce(model, b):  # the teacher's loss: cross-entropy, MSE for STS-B
            loss = moebert.task_loss(model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits,
                                     b["labels"])
            return loss, {"loss": loss}

        best = fit(teacher, ce, train_features, dev_sets, teacher_dir + ".partial", hp, args, device, log)
        shutil.copy(vocab, teacher_dir + ".partial")
        atomic_write_json(os.path.join(teacher_dir + ".partial", "metrics.json"), best)
        publish(teacher_dir + ".partial", teacher_dir, teacher_settings)
        times["teacher"] = time.time() - t0
    # From disk even when just trained: the best epoch, not the last. Frozen from here on.
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir, num_labels=num_labels).to(device).eval()
    teacher.requires_grad_(False)

    # Stage 2: importance on the training split, not the dev split that is reported.
    imp_dir = os.path.join(args.out, "importance")
    imp_settings = dict(data_settings, teacher=args.teacher)  # None: this run's own teacher, checked above
    if not (args.eval_only or finished(imp_dir, imp_settings, args.force)):
        t0 = time.time()
        scores = moebert.importance_scores(
            teacher, (to_device(b, device) for b in data.batches(train_features, 32, sort_by_length=True)))
        save_file({"importance": scores.float()}, os.path.join(makedirs(imp_dir + ".partial"), "importance.safetensors"))
        publish(imp_dir + ".partial", imp_dir, imp_settings)
        times["importance"] = time.time() - t0
        print(f"importance: {len(train_features)} training examples in {times['importance']:.1f}s")

    # Stage 3: MoEBERT from the teacher, the surgery in one call.
    cfg = teacher.config
    moe_cfg = MoEConfig.scaled(cfg.intermediate_size, args.num_experts, args.expert_dim, args.shared_dim,
                               route=args.route, split=args.split, expert_dropout=args.expert_dropout,
                               balance_weight=args.balance_weight, seed=args.seed)
    student_dir = os.path.join(args.out, "moebert")
    student_settings = dict(imp_settings, moe=asdict(moe_cfg), epochs=args.distill_epochs, lr=args.distill_lr,
                            batch_size=args.distill_batch_size, weight_decay=args.distill_weight_decay,
                            distill_lambda=args.distill_lambda)
    if not (args.eval_only or finished(student_dir, student_settings, args.force)):
        t0 = time.time()
        importance = load_file(os.path.join(imp_dir, "importance.safetensors"))["importance"]
        # hash-balance balances the training split's token frequencies across experts.
        counts = data.token_counts(train_features, cfg.vocab_size) if moe_cfg.route == "hash-balance" else None
        student = moebert.moebert_from_dense(teacher, importance, moe_cfg, token_counts=counts).to(device)

        # Stage 4: distillation. loss = CE + lambda * (hidden MSEs + symmetric KL) [+ balance loss]
        regression = task.labels is None

        def distill(model, b):
            inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
            out = model(*inputs, output_hidden_states=args.distill_lambda > 0)
            loss = ce = moebert.task_loss(out.logits, b["labels"])
            parts = {"ce": ce}
            if args.distill_lambda > 0:  # lambda 0: fine-tuning alone, the ablation; no teacher pass
                with torch.no_grad():
                    t_out = teacher(*inputs, output_hidden_states=True)
                parts["distill"] = moebert.distillation_loss(out, t_out, b["attention_mask"], regression)
                loss = loss + args.distill_lambda * parts["distill"]
            if out.balance_loss is not None and moe_cfg.balance_weight > 0:
                parts["balance"] = out.balance_loss
                loss = loss + moe_cfg.balance_weight * out.balance_loss
            return loss, parts

        hp = dict(stage="distill", epochs=args.distill_epochs, lr=args.distill_lr,
                  batch_size=args.distill_batch_size, weight_decay=args.distill_weight_decay)
        best = fit(student, distill, train_features, dev_sets, student_dir + ".partial", hp, args, device, log)
        shutil.copy(vocab, student_dir + ".partial")
        atomic_write_json(os.path.join(student_dir + ".partial", "metrics.json"), best)
        publish(student_dir + ".partial", student_dir, student_settings)
        times["distill"] = time.time() - t0

    # Stage 5: both models from disk, evaluated on dev: what is reported is what was saved.
    t0 = time.time()
    student = MoEBertForSequenceClassification.from_pretrained(student_dir).to(device)
    results = {"task": args.task,
               "teacher": evaluate(teacher, dev_sets, args, device),
               "moebert": evaluate(student, dev_sets, args, device)}
    times["eval"] = time.time() - t0
    total, active = moebert.param_counts(student)
    results["params"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                         "moebert_total": total, "moebert_active_per_token": active}
    results["config"] = dict(vars(args))
    results["moe"] = asdict(student.moe_config)
    results["seconds"] = times
    if os.path.exists(os.path.join(args.out, "results.json")):  # a rerun keeps the skipped stages' times
        with open(os.path.join(args.out, "results.json")) as f:
            results["seconds"] = {**json.load(f).get("seconds", {}), **times}
    atomic_write_json(os.path.join(args.out, "results.json"), results)

    names = sorted(results["teacher"])
    print(f"\n{args.task} dev       " + "  ".join(f"{n:>10}" for n in names))
    for who in ("teacher", "moebert"):
        print(f"{who:<15}" + "  ".join(f"{100 * results[who][n]:10.2f}" for n in names))
    print(f"parameters: teacher {results['params']['teacher'] / 1e6:.1f}M, MoEBERT {total / 1e6:.1f}M total, "
          f"{active / 1e6:.1f}M active per token;  results in {args.out}/results.json")
    return results


if __name__ == "__main__":
    main()
