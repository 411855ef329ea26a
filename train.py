"""The whole MoEBERT method on one GLUE task:  python train.py --task rte

  1. fine-tune the BERT teacher on the task (or take one with --teacher)
  2. importance of every FFN neuron on the training split (paper Eq. 4)
  3. MoEBERT from the teacher: FFNs split into experts by importance (paper section 3.2)
  4. layer-wise distillation from the frozen teacher (paper section 3.3)
  5. evaluation of teacher and MoEBERT on dev

Each stage writes its output into --out and is skipped when it is there and was made with the
same settings; --force redoes them. A stage's folder appears only when the stage has finished;
until then the training stages checkpoint into NAME.partial (every --save-every steps, each
epoch's end, and on Ctrl-C or SIGTERM), and running the same command again continues from there.

Several GPUs:  torchrun --nproc_per_node K train.py --task mnli   (each takes a share of every batch)

The baseline of the same inference cost:  --student shallow  replaces MoEBERT by a dense student of
half the teacher's depth (moebert.shallow_from_dense: student layer i is teacher layer 2i, 1-based,
i.e. teacher layers 1, 3, 5, ... 0-based), with the teacher's embeddings, pooler and head, distilled
by the same stage 4 (student hidden_states[i] matched to the teacher's [2i]); stage 2 is skipped, as
it needs no importance. Its results go to OUT/shallow and under "shallow" in OUT/results.json; one
--out holds one student (--teacher OTHER_OUT/teacher lets the two share a teacher).
"""
import argparse
import ctypes
import importlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import moebert
import squad
from bert import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification, UserError, atomic_write_json,
                  find_config, find_vocab, makedirs, resolve_pretrained)
from moebert import MoEConfig

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
SQUAD = {"squad": "1.1", "squad2": "2.0"}  # --task -> SQuAD version
# The teacher's recipe: BERT's for GLUE (run_classifier.py), Google's run_squad.py's for SQuAD.
TEACHER = {"glue": dict(lr=2e-5, batch_size=32, epochs=3.0), "squad": dict(lr=3e-5, batch_size=12, epochs=2.0)}
# --student: MoEBERT, or the dense baseline of its cost per token, one teacher layer in SHALLOW_EVERY.
STUDENTS = ("moebert", "shallow")
SHALLOW_EVERY = 2


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(data.TASKS) + list(SQUAD),
                   help="a GLUE task, or squad (SQuAD v1.1) or squad2 (v2.0)")
    p.add_argument("--data-dir", help="folder with the task's TSV files, or SQuAD's JSON files (default: download "
                   "into the cache)")
    p.add_argument("--bert", default="bert-base-uncased",
                   help="pretrained BERT: a release name (downloaded), a Google release folder or a Hugging Face folder")
    p.add_argument("--teacher", help="a fine-tuned teacher folder (skips stage 1), e.g. another run's OUT/teacher")
    p.add_argument("--out", help="output folder (default: out/<task>)")
    p.add_argument("--force", action="store_true", help="redo every stage even when its output exists")
    p.add_argument("--student", default="moebert", choices=STUDENTS, help="moebert, or shallow: the dense "
                   "baseline of MoEBERT's cost per token, the teacher at half depth (one layer in 2), same distillation")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the teacher and the student stored in --out")
    p.add_argument("--predict", action="store_true", help="also write both models' GLUE test-set predictions, the "
                   "leaderboard's files: OUT/predictions/teacher/<Task>.tsv and OUT/predictions/<student>/<Task>.tsv")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, dropout, hash tables")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="compute dtype: bf16 autocast (weights stay fp32) "
                   "or plain fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-seq-length", type=int, help="truncate pairs to this many tokens (default: the paper's, "
                   "512, or 128 for MNLI and QQP, 384 for SQuAD)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD: tokens between the starts of a context's windows")
    p.add_argument("--max-query-length", type=int, default=64, help="SQuAD: question tokens kept")
    p.add_argument("--max-train-examples", type=int, help="use only the first N training examples (SQuAD: questions; quick runs)")
    p.add_argument("--max-eval-examples", type=int, help="evaluate on only the first N dev examples")
    p.add_argument("--eval-batch-size", type=int, default=128, help="batch size for evaluation and importance")
    p.add_argument("--log-every", type=int, default=50, help="print a progress line every N steps")
    p.add_argument("--save-every", type=int, default=2000, help="checkpoint every N optimizer steps (and at each "
                   "epoch's end); rerunning the same command continues from the last one")
    t = p.add_argument_group("teacher fine-tuning (stage 1): BERT's GLUE recipe, or run_squad.py's for SQuAD")
    t.add_argument("--epochs", type=float, help="epochs of both training stages unless a stage's own flag is "
                   "given (default: 3 for the teacher, the paper's for distillation)")
    t.add_argument("--teacher-epochs", type=float, help="teacher epochs (default: --epochs, else 3; SQuAD 2)")
    t.add_argument("--lr", type=float, help="teacher learning rate (default 2e-5; SQuAD 3e-5)")
    t.add_argument("--batch-size", type=int, help="teacher batch size (default 32; SQuAD 12)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="teacher AdamW weight decay")
    t.add_argument("--warmup", type=float, default=0.1, help="teacher warm-up, a fraction of the steps")
    m = p.add_argument_group("MoEBERT (stages 2-4; the --distill flags also train --student shallow); defaults: "
                             "the paper's Table 7 for the task")
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
    recipe = TEACHER["squad" if args.task in SQUAD else "glue"]
    args.teacher_epochs = pick(args.teacher_epochs, pick(args.epochs, recipe["epochs"]))
    args.lr = pick(args.lr, recipe["lr"])
    args.batch_size = pick(args.batch_size, recipe["batch_size"])
    args.distill_epochs = pick(args.distill_epochs, pick(args.epochs, epochs))
    args.distill_lr = pick(args.distill_lr, lr)
    args.distill_batch_size = pick(args.distill_batch_size, bs)
    args.distill_weight_decay = pick(args.distill_weight_decay, wd)
    args.distill_lambda = pick(args.distill_lambda, lam)
    return args


# ----------------------------------------------------------------------------------------------
# Evaluation and the parts of training that are not the loop


def autocast(device, dtype):
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def keep_freed_memory():
    """CPU: keep freed memory in the process. glibc hands each block over 32 MB out as a fresh
    mapping and unmaps it when freed, so every large activation page-faults anew; that made BERT-base
    inference at batch 32 ~25% slower here (SPEED.md). Returns whether glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3): blocks up to 1 GB come from the heap; M_TRIM_THRESHOLD (-1): never trim it.
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return False


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


PROGRESS_EVERY = 10.0  # seconds between progress lines of importance and evaluation


def progress(batches, total, what):
    """Yield `batches`, printing the examples done of `total`, the rate and the time left every
    PROGRESS_EVERY seconds (and a last line if it printed any): importance and evaluation of a
    large task take minutes, and a quick one stays quiet."""
    done, t0, last = 0, time.time(), time.time()
    for batch in batches:
        yield batch
        done += len(batch["index"])
        if MASTER and (time.time() - last >= PROGRESS_EVERY or (done == total and last > t0)):
            last, rate = time.time(), done / max(time.time() - t0, 1e-9)
            print(f"{what}: {done}/{total} examples, {rate:.0f}/s, {(total - done) / rate:.0f}s left", flush=True)


@torch.inference_mode()
def logits_of(model, features, args, device, what):
    """The model's logits for each feature, in order, as float32 numpy arrays: [num_labels], or for
    SQuAD [length, 2] (start, end) over the feature's own tokens, without the batch's padding."""
    model.eval()
    out = [None] * len(features)
    for batch in progress(data.batches(features, args.eval_batch_size, sort_by_length=True), len(features), what):
        b = to_device(batch, device)
        with autocast(device, args.dtype):
            logits = model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits.float().cpu()
        for i, row in zip(batch["index"].tolist(), logits.numpy()):
            out[i] = row[:len(features[i]["input_ids"])] if row.ndim == 2 else row
    return out


def predict(model, features, args, device, what="evaluation"):
    """Predictions in the order of `features`: label indices, or scores for regression."""
    return [float(l[0]) if len(l) == 1 else int(l.argmax()) for l in logits_of(model, features, args, device, what)]


def squad_dev(model, examples, features, dataset, args, device):
    """SQuAD dev metrics (the official scripts'), and the files to keep beside the model: the
    predictions {question id: answer, "" for none}, and for v2.0 each question's null score minus its
    best span's (null_odds.json, the official v2.0 script's --na-prob-file)."""
    logits = logits_of(model, features, args, device, "evaluation on dev")
    version = SQUAD[args.task]
    preds, diffs = squad.postprocess(examples, features, [l[:, 0] for l in logits], [l[:, 1] for l in logits],
                                     version)
    metrics = squad.score(version, dataset, preds, diffs)
    return metrics, {"predictions.json": preds, **({"null_odds.json": diffs} if diffs is not None else {})}


def evaluate(model, dev_sets, args, device):
    """Metrics on every dev set; MNLI's mismatched ones get the suffix _mm."""
    metrics = {}
    for suffix, features in dev_sets.items():
        preds = predict(model, features, args, device, f"evaluation on dev{suffix}")
        m = data.compute_metrics(args.task, preds, [f["label"] for f in features])
        metrics.update({k + suffix: v for k, v in m.items()})
    return metrics


def decays(name):
    """Weight decay for matrices and embeddings, none for biases and LayerNorm: BERT's rule, by
    name as in its optimization.py (so it also reads the experts' stacked [N, ...] tensors)."""
    return "bias" not in name and "LayerNorm" not in name


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): one per GPU, or gloo processes on the CPU

RANK, WORLD, MASTER = 0, 1, True  # this process, how many there are, whether it writes files and logs


def setup_distributed(args):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is the one process."""
    global RANK, WORLD, MASTER
    if "RANK" not in os.environ:
        return torch.device(args.device)
    cuda = args.device.startswith("cuda")
    # DDP imports torch.distributed.nn.functional on first use; imported after init, its default
    # arguments (group=group.WORLD) keep the process group for good, so destroy_process_group leaves
    # gloo's threads running, and one that frees a finished collective while Python shuts down aborts
    # the process (SIGABRT, "terminate called without an active exception"). Imported first, they hold None.
    importlib.import_module("torch.distributed.nn.functional")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    MASTER = RANK == 0
    if not cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def barrier():
    """Wait until every process is here (after the master wrote files the others read)."""
    if WORLD > 1:
        dist.barrier()


def shard(batch, device):
    """This process's rows of a global batch, and the share of the global batch's loss they carry.

    DDP averages the processes' gradients. For that average to be the gradient of the global
    batch's mean loss, each process scales its mean by WORLD * (its examples / all examples), and
    the token-averaged MSEs of distillation by WORLD * (its tokens / all tokens). With one process
    both shares are exactly 1. Padding stays as in the global batch, so one process computes the same.
    """
    rows = torch.tensor_split(torch.arange(len(batch["index"])), WORLD)[RANK]
    mask = batch["attention_mask"]
    share = dict(examples=WORLD * len(rows) / len(mask), tokens=WORLD * mask[rows].sum().item() / mask.sum().item())
    if len(rows) == 0:  # fewer examples than processes: run one with weight 0, as DDP needs every backward
        rows = torch.tensor([0])
    return to_device({k: v[rows] for k, v in batch.items()}, device), share


# ----------------------------------------------------------------------------------------------
# Checkpoints inside a stage: one safetensors file, replaced atomically

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(path, model, opt, sched, state, device):
    """Everything needed to continue a stage exactly: weights, AdamW's moments, the LR schedule,
    the position (state: step, epoch, batches done in the epoch, best dev result) and the random
    number generators of every process (dropout draws from them). Tensors in safetensors, the rest
    as JSON in its metadata; written beside and renamed, so a kill leaves the previous one intact."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rng = {k: gather(v, device) for k, v in rng.items()}  # every process's generators, on the master
    if not MASTER:
        return
    tensors = {"model." + k: v for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    tensors.update({f"optimizer.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()})
    tensors.update({f"rng.{k}.{r}": t for k, ts in rng.items() for r, t in enumerate(ts)})
    meta = {"state": dict(state, processes=WORLD), "param_groups": sd["param_groups"], "scheduler": sched.state_dict()}
    tmp = path + ".partial"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
              metadata={k: json.dumps(v) for k, v in meta.items()})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before the rename, so a crash of the machine cannot half-write it
    os.replace(tmp, path)


def gather(t, device):
    """[tensor of every process] (the master's list; one process: [t])."""
    if WORLD == 1:
        return [t]
    t = t.to(device)  # NCCL gathers GPU tensors only
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def load_checkpoint(path, model, opt, sched, device):
    """Restore what save_checkpoint wrote into model, opt, sched and the generators; returns state."""
    try:
        with safe_open(path, "pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{path} is damaged ({e}). Delete it to redo this stage from its start.") from None
    state = meta["state"]
    if state["processes"] != WORLD:  # each process's dropout stream continues only in the same layout
        raise UserError(f"{path} was written by {state['processes']} processes, this run has {WORLD}: resume "
                        f"with the same number (torchrun --nproc_per_node), or --force to start over")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    moments = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            moments.setdefault(int(i), {})[name] = v
    # JSON made AdamW's betas a list; the optimizer expects a tuple
    groups = [dict(g, betas=tuple(g["betas"])) for g in meta["param_groups"]]
    opt.load_state_dict({"state": moments, "param_groups": groups})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors[f"rng.cpu.{RANK}"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{RANK}"], device)
    return state


@contextmanager
def deferred_signals():
    """While training: Ctrl-C (SIGINT) and SIGTERM (preemption, kill, torchrun passing either on)
    only set a flag, which fit() reads after each step to save a checkpoint and stop there.
    A second signal stops at once."""
    got = []

    def handler(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_here(stop, where, ckpt):
    """Exit after a signal, with the one line that says how to resume (status 128 + signal, as a shell's)."""
    signum = stop[0] if stop else signal.SIGTERM  # with several processes, another may have got it
    if MASTER:
        print(f"stopped by {signal.Signals(signum).name} at {where}; checkpoint saved in {ckpt}. "
              f"Run the same command again to resume.", flush=True)
    raise SystemExit(128 + signum)


def agree(*flags, device):
    """The flags, each true if it is on any process (with one process, as they are): [int, ...]."""
    t = torch.stack([torch.as_tensor(f, device=device) for f in flags]).int()
    if WORLD > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# The training loop, shared by the teacher and the student


def fit(model, loss_fn, train_features, dev, stage_dir, hp, args, device, log):
    """AdamW with linear decay (and optional warm-up), clipping at 1.0, an evaluation on dev after
    each epoch, the best dev checkpoint saved to stage_dir. loss_fn(model, batch, share) -> (loss, parts);
    dev(model) -> (metrics, {file name: JSON to write beside the best model}); hp["metric"] picks it.

    Every args.save_every steps and at each epoch's end, a checkpoint goes to stage_dir; when one is
    there, training continues from it, and ends exactly as if it had never stopped.
    """
    torch.manual_seed(args.seed + RANK)  # the same dropout masks for the same --seed, whatever ran before
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
    ckpt = os.path.join(stage_dir, CHECKPOINT)
    state = dict(step=0, epoch=0, batch=0, best=None)  # batch: batches of the epoch done
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt, model, opt, sched, device)
        log(dict(stage=hp["stage"], step=state["step"], resumed=ckpt))
    # Several processes: DDP all-reduces the gradients during backward. Every expert is always in
    # the graph, since each layer's experts are one stacked tensor per weight (moebert.Experts): an
    # expert with no token in a step gets a zero gradient, so find_unused_parameters (an extra pass
    # over the graph each step) is not needed. DDP copies the weights and buffers (hash tables) of
    # process 0 to the others, so all start and route alike (the buffers at each forward: 3 MB at BERT-base).
    trained = model if WORLD == 1 else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    t0, seen = time.time(), 0
    with deferred_signals() as stop:
        for epoch in range(state["epoch"], math.ceil(hp["epochs"])):
            model.train()
            # A new, reproducible order each epoch; batches of similar lengths, so little padding.
            # After a resume, the batches this epoch has done are skipped.
            order = data.batches(train_features, hp["batch_size"], shuffle=True, seed=args.seed * 1000 + epoch,
                                 group_by_length=True)
            for batch in itertools.islice(order, state["batch"], None):
                if state["step"] == total:
                    break
                b, share = shard(batch, device)
                with autocast(device, args.dtype):
                    loss, parts = loss_fn(trained, b, share)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as BERT and the paper
                # One wait for the device per step: a non-finite loss or gradient stops training
                # before the update, and every process learns of a signal at the same step.
                bad, stopping = agree(~(torch.isfinite(loss) & torch.isfinite(norm)), bool(stop), device=device)
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
                step = state["step"]
                if step % args.log_every == 0 or step == total:
                    rate = seen / (time.time() - t0)
                    eta = (total - step) * hp["batch_size"] / rate
                    values = torch.stack([v.detach().float() for v in parts.values()])  # .item() waits: log steps only
                    if WORLD > 1:  # each process's parts are its share of the global batch's: average them
                        dist.all_reduce(values)
                        values /= WORLD
                    log(dict(stage=hp["stage"], step=step, total=total,
                             **{k: round(v, 4) for k, v in zip(parts, values.tolist())},
                             lr=sched.get_last_lr()[0], examples_per_s=round(rate, 1), eta_s=round(eta)))
                # The epoch's last step is saved after its evaluation (below), not twice.
                epoch_ends = state["batch"] == steps_per_epoch or step == total
                if stopping or (step % args.save_every == 0 and not epoch_ends):
                    save_checkpoint(ckpt, model, opt, sched, state, device)
                if stopping:
                    stop_here(stop, f"{hp['stage']} step {step}", ckpt)
            metrics, files = dev(model)
            log(dict(stage=hp["stage"], epoch=epoch + 1, step=state["step"], dev=metrics))
            # Keep the best dev epoch, as GLUE dev results (the paper's included) are usually reported.
            if state["best"] is None or metrics[hp["metric"]] > state["best"][hp["metric"]]:
                state["best"] = dict(metrics, epoch=epoch + 1)
                if MASTER:
                    model.save_pretrained(stage_dir)
                    for name, content in files.items():  # SQuAD: the predictions of that model
                        atomic_write_json(os.path.join(stage_dir, name), content)
            state["epoch"], state["batch"] = epoch + 1, 0
            save_checkpoint(ckpt, model, opt, sched, state, device)
            if agree(bool(stop), device=device)[0]:  # a signal during the evaluation
                stop_here(stop, f"the end of {hp['stage']} epoch {epoch + 1}", ckpt)
    return state["best"]


# ----------------------------------------------------------------------------------------------
# Stages: their outputs, and whether a finished one fits the current settings


def finished(folder, settings, force):
    """True when `folder` holds a finished stage made with `settings`. False when the stage is to
    run: from its checkpoint when an earlier run stopped in it with the same settings (fit resumes
    it), else from the start. Other settings are refused, so no result is silently replaced."""
    partial = folder + ".partial"
    done = not force and differs(folder, settings)  # None: finished with these settings
    if done is None:
        if MASTER:
            print(f"{folder}: done already, reused")
        return True
    stopped = not force and os.path.exists(os.path.join(partial, CHECKPOINT)) and differs(partial, settings)
    if stopped is None:
        if MASTER:
            print(f"{folder}: an earlier run stopped during this stage; it continues from its checkpoint")
        return False
    for diff in (done, stopped):
        if diff:
            raise UserError(f"{diff}.\nUse another --out, or --force to redo it.")
    barrier()  # every process has looked before the master changes the folders
    if MASTER:
        if os.path.exists(partial):
            print(f"{folder}: an earlier run stopped during this stage; it is redone from the start")
            shutil.rmtree(partial)
        # The settings go in first: a checkpoint written here later is known to match them.
        atomic_write_json(os.path.join(makedirs(partial), "settings.json"), settings)
    barrier()
    return False


def differs(folder, settings):
    """None if `folder` was made with `settings`; else what differs, as a sentence ('' if no folder)."""
    path = os.path.join(folder, "settings.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if not diff:
        return None
    return f"{folder} was made with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())})"


def publish(partial, folder):
    """Mark a stage finished: the checkpoint goes (the best model is beside it), then one atomic rename."""
    if MASTER:
        for name in (CHECKPOINT, CHECKPOINT + ".partial"):  # the latter if a kill came during a write
            if os.path.exists(os.path.join(partial, name)):
                os.remove(os.path.join(partial, name))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    barrier()  # the others read the finished stage from here on


def check_teacher(path, task, num_labels):
    """A --teacher must be a fine-tuned model for this task (its labels, or SQuAD's span head when
    num_labels is None) with its vocabulary."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"--teacher {path}: no config.json; pass a fine-tuned teacher folder, e.g. out/{task}/teacher")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if num_labels is None and cfg.get("head") != "qa":
        raise UserError(f"--teacher {path} is not a question-answering model (config.json's head: "
                        f"{cfg.get('head', 'classification')!r}); {task} needs one, e.g. out/{task}/teacher")
    if num_labels is not None and cfg.get("num_labels") != num_labels:
        raise UserError(f"--teacher {path} has {cfg.get('num_labels')} labels; {task} needs {num_labels}")
    vocab = find_vocab(path)
    with open(vocab, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    if n != cfg.get("vocab_size"):
        raise UserError(f"--teacher {path}: vocab.txt has {n} tokens but the model has {cfg.get('vocab_size')}")


def glue_data(args, tokenizer, device):
    """A GLUE task's training features, dev(model) -> (metrics, {}), the metric that picks the best
    epoch, the number of dev examples, and (with --predict) the test sets by leaderboard file name."""
    folder = data.glue_dir(args.task, args.data_dir)
    encode = lambda examples, n=None: data.encode(examples[:n], tokenizer, args.max_seq_length)
    if MASTER:
        print(f"data: reading and tokenizing {data.TASKS[args.task].folder} from {folder}", flush=True)
    train_features = encode(data.read_glue(args.task, folder, "train"), args.max_train_examples)
    dev_sets = {"": encode(data.read_glue(args.task, folder, "dev"), args.max_eval_examples)}
    if args.task == "mnli":
        dev_sets["_mm"] = encode(data.read_glue(args.task, folder, "dev_mismatched"), args.max_eval_examples)
    # Read now, so a missing test file stops the run before training, not after it.
    test_sets = {name: encode(examples) for name, examples in data.test_sets(args.task, folder).items()} \
        if args.predict else {}
    dev = lambda model: (evaluate(model, dev_sets, args, device), {})
    return train_features, dev, data.TASKS[args.task].metric, len(dev_sets[""]), test_sets


def squad_data(args, tokenizer, device):
    """SQuAD as glue_data gives GLUE: features are context windows (squad.make_features); dev runs
    the official metrics on the postprocessed answers; F1 picks the best epoch; no test sets."""
    version = SQUAD[args.task]
    if MASTER:
        print(f"data: reading and tokenizing SQuAD {version}", flush=True)
    featurize = lambda examples: squad.make_features(examples, tokenizer, args.max_seq_length, args.doc_stride,
                                                     args.max_query_length)
    train_examples, _ = squad.load_squad(version, "train", args.data_dir, args.max_train_examples)
    examples, dataset = squad.load_squad(version, "dev", args.data_dir, args.max_eval_examples)
    features = featurize(examples)
    dev = lambda model: squad_dev(model, examples, features, dataset, args, device)
    return featurize(train_examples), dev, "f1", len(examples), {}


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the classifier head and the gates are drawn from it too
    device = setup_distributed(args)
    if device.type == "cpu":
        keep_freed_memory()
    qa = args.task in SQUAD  # question answering: a start and an end over the tokens, not a class
    if qa and args.predict:
        raise UserError("--predict writes GLUE's test-set files; SQuAD's test sets are not public (the dev "
                        "predictions are in OUT/teacher/predictions.json and OUT/moebert/predictions.json)")
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "log.jsonl"), "a") if MASTER else None

    def log(record):  # one JSON record per line in OUT/log.jsonl, and a readable line; the master only
        if MASTER:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)

    # One --out holds one run, of one task and one student: refuse to mix another into it.
    run_file = os.path.join(args.out, "run.json")
    if os.path.exists(run_file):
        with open(run_file) as f:
            prev = json.load(f)
        if prev["task"] != args.task:
            raise UserError(f"{args.out} holds a run of task {prev['task']}; use another --out for {args.task}")
        if prev.get("student", "moebert") != args.student:  # run.json of older runs: MoEBERT's
            raise UserError(f"{args.out} holds a run with --student {prev.get('student', 'moebert')}; use another "
                            f"--out for --student {args.student} (--teacher {args.out}/teacher reuses its teacher)")
    if args.eval_only:  # nothing will be trained: both models must be there
        for d in (args.teacher or os.path.join(args.out, "teacher"), os.path.join(args.out, args.student)):
            if not os.path.exists(os.path.join(d, "model.safetensors")):
                raise UserError(f"{d} holds no finished model; run without --eval-only first")
    if MASTER:
        atomic_write_json(run_file, {"task": args.task, "student": args.student})
    times = {}

    # Data: tokenizer from the teacher's (or the pretrained model's) vocabulary.
    # The teacher's class: a classifier (num_labels outputs; 1 is STS-B's regression) or SQuAD's span head.
    if qa:
        Teacher, head = BertForQuestionAnswering, {}
    else:
        labels = data.TASKS[args.task].labels
        Teacher, head = BertForSequenceClassification, {"num_labels": 1 if labels is None else len(labels)}
    if args.teacher:
        check_teacher(args.teacher, args.task, head.get("num_labels"))
    source = args.teacher or resolve_pretrained(args.bert)
    if args.student == "shallow":  # checked now, not after the teacher's training
        layers = BertConfig.from_json(find_config(source)).num_hidden_layers
        if layers % SHALLOW_EVERY:
            raise UserError(f"--student shallow keeps one teacher layer in {SHALLOW_EVERY}, so the last is the "
                            f"teacher's last; {source} has {layers} layers: use a BERT with an even number")
    vocab = find_vocab(source)
    tokenizer = data.load_tokenizer(vocab, lowercase=data.is_uncased(vocab))
    t0 = time.time()
    train_features, dev, metric, n_dev, test_sets = (squad_data if qa else glue_data)(args, tokenizer, device)
    if MASTER:
        print(f"data: {len(train_features)} training features (SQuAD: windows) and {n_dev} dev examples, tokenized "
              f"in {time.time() - t0:.1f}s")
    # What every stage's output depends on; a stage reused with other settings would mix results.
    data_settings = dict(task=args.task, max_seq_length=args.max_seq_length, seed=args.seed,
                         train_examples=len(train_features), dev_examples=n_dev, dtype=args.dtype)
    if qa:
        data_settings.update(doc_stride=args.doc_stride, max_query_length=args.max_query_length)

    # Stage 1: the teacher.
    teacher_dir = os.path.join(args.out, "teacher")
    teacher_settings = dict(data_settings, bert=args.bert, teacher=args.teacher, epochs=args.teacher_epochs,
                            lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay,
                            warmup=args.warmup)
    if args.teacher:
        teacher_dir = args.teacher
    elif not (args.eval_only or finished(teacher_dir, teacher_settings, args.force)):
        t0 = time.time()
        teacher = Teacher.from_pretrained(source, **head).to(device)
        hp = dict(stage="teacher", metric=metric, epochs=args.teacher_epochs, lr=args.lr, batch_size=args.batch_size,
                  weight_decay=args.weight_decay, warmup=args.warmup)

        def ce(model, b, share):  # the teacher's loss: cross-entropy, MSE for STS-B, SQuAD's (CE start + CE end) / 2
            loss = moebert.task_loss(model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits,
                                     b["labels"]) * share["examples"]
            return loss, {"loss": loss}

        best = fit(teacher, ce, train_features, dev, teacher_dir + ".partial", hp, args, device, log)
        if MASTER:
            shutil.copy(vocab, teacher_dir + ".partial")
            atomic_write_json(os.path.join(teacher_dir + ".partial", "metrics.json"), best)
        publish(teacher_dir + ".partial", teacher_dir)
        times["teacher"] = time.time() - t0
    # From disk even when just trained: the best epoch, not the last. Frozen from here on.
    teacher = Teacher.from_pretrained(teacher_dir, **head).to(device).eval()
    teacher.requires_grad_(False)

    # Stage 2: importance on the training split, not the dev split that is reported.
    imp_dir = os.path.join(args.out, "importance")
    imp_settings = dict(data_settings, teacher=args.teacher)  # None: this run's own teacher, checked above
    # The shallow student keeps whole layers: it needs no importance, so the stage is skipped.
    if args.student == "moebert" and not (args.eval_only or finished(imp_dir, imp_settings, args.force)):
        t0 = time.time()
        mine = train_features[RANK::WORLD]  # each process scores its share of the examples; the sum is Eq. 4's
        batches = data.batches(mine, 32, sort_by_length=True)
        scores = moebert.importance_scores(teacher, (to_device(b, device) for b in progress(
            batches, len(mine), "importance" if WORLD == 1 else f"importance, process {RANK}'s share")))
        if WORLD > 1:
            scores = scores.to(device)
            dist.all_reduce(scores)
        if MASTER:
            save_file({"importance": scores.float().cpu()}, os.path.join(imp_dir + ".partial", "importance.safetensors"))
        publish(imp_dir + ".partial", imp_dir)
        times["importance"] = time.time() - t0
        if MASTER:
            print(f"importance: {len(train_features)} training examples in {times['importance']:.1f}s")

    # Stage 3: MoEBERT from the teacher, the surgery in one call (the same on every process: the
    # split comes from the importance file, the hash tables from --seed). Or the shallow student.
    cfg = teacher.config
    moe_cfg = MoEConfig.scaled(cfg.intermediate_size, args.num_experts, args.expert_dim, args.shared_dim,
                               route=args.route, split=args.split, expert_dropout=args.expert_dropout,
                               balance_weight=args.balance_weight, seed=args.seed)
    student_dir = os.path.join(args.out, args.student)  # OUT/moebert or OUT/shallow
    distill_settings = dict(epochs=args.distill_epochs, lr=args.distill_lr, batch_size=args.distill_batch_size,
                            weight_decay=args.distill_weight_decay, distill_lambda=args.distill_lambda)
    if args.student == "moebert":  # as before --student existed, so finished runs are still reused
        student_settings = dict(imp_settings, moe=asdict(moe_cfg), **distill_settings)
    else:  # the student's kind and depth are settings too
        student_settings = dict(imp_settings, student=args.student, every=SHALLOW_EVERY, **distill_settings)
    # Which teacher hidden state each student hidden state learns: one to one, or [0, 2, 4, ...].
    layers = None if args.student == "moebert" else moebert.shallow_hidden_states(cfg.num_hidden_layers,
                                                                                  SHALLOW_EVERY)
    stage = "distill" if args.student == "moebert" else f"distill-{args.student}"  # its name in logs and times
    if not (args.eval_only or finished(student_dir, student_settings, args.force)):
        t0 = time.time()
        if args.student == "moebert":
            importance = load_file(os.path.join(imp_dir, "importance.safetensors"))["importance"]
            # hash-balance balances the training split's token frequencies across experts.
            counts = data.token_counts(train_features, cfg.vocab_size) if moe_cfg.route == "hash-balance" else None
            student = moebert.moebert_from_dense(teacher, importance, moe_cfg, token_counts=counts).to(device)
        else:  # one teacher layer in SHALLOW_EVERY, with its embeddings, pooler and head
            student = moebert.shallow_from_dense(teacher, SHALLOW_EVERY).to(device)

        # Stage 4: distillation. loss = CE + lambda * (hidden MSEs + symmetric KL) [+ balance loss]
        regression = head.get("num_labels") == 1

        def distill(model, b, share):
            inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
            out = model(*inputs, output_hidden_states=args.distill_lambda > 0)
            loss = ce = moebert.task_loss(out.logits, b["labels"]) * share["examples"]
            parts = {"ce": ce}
            if args.distill_lambda > 0:  # lambda 0: fine-tuning alone, the ablation; no teacher pass
                with torch.no_grad():
                    t_out = teacher(*inputs, output_hidden_states=True)
                hidden, pred = moebert.distillation_terms(out, t_out, b["attention_mask"], regression, layers)
                parts["distill"] = hidden * share["tokens"] + pred * share["examples"]
                loss = loss + args.distill_lambda * parts["distill"]
            if out.balance_loss is not None and moe_cfg.balance_weight > 0 and share["examples"] > 0:
                # Each process balances its own tokens (as the Switch Transformer does per device).
                parts["balance"] = out.balance_loss
                loss = loss + moe_cfg.balance_weight * out.balance_loss
            return loss, parts

        hp = dict(stage=stage, metric=metric, epochs=args.distill_epochs, lr=args.distill_lr,
                  batch_size=args.distill_batch_size, weight_decay=args.distill_weight_decay)
        best = fit(student, distill, train_features, dev, student_dir + ".partial", hp, args, device, log)
        if MASTER:
            shutil.copy(vocab, student_dir + ".partial")
            atomic_write_json(os.path.join(student_dir + ".partial", "metrics.json"), best)
        publish(student_dir + ".partial", student_dir)
        times[stage] = time.time() - t0
    if not MASTER:  # training is done; evaluation and the files are the master's
        return None

    # Stage 5: both models from disk, evaluated on dev: what is reported is what was saved.
    t0 = time.time()
    if args.student == "moebert":
        student = moebert.load(student_dir).to(device)  # the head its config.json names
    else:  # the teacher's class; its config.json has the student's depth
        student = Teacher.from_pretrained(student_dir, **head).to(device)
    results = {"task": args.task}
    for who, model in (("teacher", teacher), (args.student, student)):
        results[who], files = dev(model)
        for name, content in files.items():  # SQuAD: predictions.json beside the stage's metrics.json
            atomic_write_json(os.path.join(makedirs(os.path.join(args.out, who)), name), content)
    times["eval"] = time.time() - t0
    total, active = moebert.param_counts(student)  # a dense student uses all of its parameters
    results["params"] = {"teacher": sum(p.numel() for p in teacher.parameters()),
                         f"{args.student}_total": total, f"{args.student}_active_per_token": active}
    # Multiply-adds per token (moebert.macs_per_token), attention at the run's --max-seq-length, its bound.
    results["macs_per_token"] = {"seq_len": args.max_seq_length, **{
        who: moebert.macs_per_token(m.config, args.max_seq_length, getattr(m, "moe_config", None))
        for who, m in (("teacher", teacher), (args.student, student))}}
    results["config"] = dict(vars(args), processes=WORLD)
    if args.student == "moebert":
        results["moe"] = asdict(student.moe_config)
    results["seconds"] = times
    results_file = os.path.join(args.out, "results.json")
    if os.path.exists(results_file):  # a rerun keeps the skipped stages' times
        with open(results_file) as f:
            results["seconds"] = {**json.load(f).get("seconds", {}), **times}
    atomic_write_json(results_file, results)

    # GLUE metrics are fractions, SQuAD's percentages (as the official scripts print them); counts are left out.
    names = [n for n in sorted(results["teacher"]) if not n.endswith("total")]
    scale = 1 if qa else 100
    print(f"\n{args.task} dev       " + "  ".join(f"{n:>10}" for n in names))
    for who in ("teacher", args.student):
        print(f"{who:<15}" + "  ".join(f"{scale * results[who][n]:10.2f}" for n in names))
    macs = results["macs_per_token"]
    print(f"parameters: teacher {results['params']['teacher'] / 1e6:.1f}M, {args.student} {total / 1e6:.1f}M total, "
          f"{active / 1e6:.1f}M active per token; multiply-adds per token, weights + attention at "
          f"{args.max_seq_length} tokens: " + ", ".join(f"{who} {macs[who]['weights'] / 1e6:.1f}M + "
                                                       f"{macs[who]['attention'] / 1e6:.1f}M" for who in ("teacher", args.student)))
    print(f"results in {results_file}")
    for who, model in (("teacher", teacher), (args.student, student)):  # --predict: the leaderboard's files
        for name, features in test_sets.items():
            path = os.path.join(args.out, "predictions", who, name)
            data.write_predictions(args.task, predict(model, features, args, device, f"{who} on {name}"), path)
            print(f"{who}: {len(features)} test predictions in {path}")
    return results


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # something the user can fix: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside training (inside, fit saves a checkpoint and says so)
        print("interrupted; finished stages are kept: run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    finally:  # every process, errors too: gloo's threads stop before Python shuts down (setup_distributed)
        if dist.is_initialized():
            dist.destroy_process_group()
