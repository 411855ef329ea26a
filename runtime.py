"""What a long run needs around train.py's loop: several processes (torchrun), checkpoints that
resume bit for bit, signals that stop at a step boundary, and stages that are published atomically
and reused only when made with the same settings.
"""
import argparse
import ctypes
import errno
import fcntl
import importlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from common import (DISK_ERRORS, UserError, atomic_write_json, cache_root, check_access, makedirs, name_file,
                    save_safetensors, unreadable)

RANK, WORLD, MASTER = 0, 1, True  # this process, how many there are, whether it writes files and logs
PROGRESS_EVERY = 10.0  # seconds between progress lines
LOCK = None  # the open OUT/run.lock while a run holds it (claim)


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


def default_dtype(device):
    """--dtype's default: bf16 on GPUs that compute in it, CUDA compute capability 8.0 (Ampere) and up; fp32 on
    older ones (V100, T4: no bf16 tensor cores, their bf16 emulated) and on the CPU."""
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"


def autocast(device, dtype):
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def fused_adamw(device):
    """Whether AdamW runs fused, one kernel over all parameters (~5x faster steps on CPU too): on CUDA, and on
    the CPU from torch 2.4 (older releases refuse it there, and run the same update tensor by tensor)."""
    return device.type == "cuda" or torch.torch_version.TorchVersion(torch.__version__) >= (2, 4)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun): one per GPU, or gloo processes on the CPU


def setup_distributed(device):
    """The device of this process. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this
    is the one process, on `device` ("cuda" or "cpu")."""
    global RANK, WORLD, MASTER
    check_device(device)
    if "RANK" not in os.environ:
        return torch.device(device)
    cuda = device.startswith("cuda")
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


def checked(kind, ok, what):
    """An argparse type: a finite `kind` for which ok(value) holds, else argparse's error (exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


# What each flag takes, checked before any work (a row longer than the position table, zero epochs or a
# zero stride would fail, or hang, deep inside the run).
COUNT = checked(int, lambda v: v >= 1, "a whole number of at least 1")
COUNT_OR_0 = checked(int, lambda v: v >= 0, "a whole number of at least 0")
SEED = checked(int, lambda v: 0 <= v < 2**32, "a seed in 0 .. 2^32 - 1")
POSITIVE = checked(float, lambda v: v > 0, "a number above 0")
AT_LEAST_0 = checked(float, lambda v: v >= 0, "a number of at least 0")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
DROPOUT = checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def check_device(name):
    """--device names a device this machine has: cpu, cuda or cuda:N (else a UserError, before any work)."""
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's own message lists two dozen backends this code does not run on
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this code runs on cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "no GPU is visible" if torch.version.cuda else f"torch {torch.__version__} is built without CUDA"
        raise UserError(f"--device {name}: {why}; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")


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
    save_safetensors(tensors, path, metadata={k: json.dumps(v) for k, v in meta.items()})


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
    check_access(path)  # another user's: not "damaged" (safetensors says "No such file")
    try:
        with safe_open(path, "pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{path} is damaged ({e}). Delete it to redo this stage from its start.") from None
    state = meta["state"]
    check_best(os.path.dirname(path), state["best"])
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


def check_best(folder, best):
    """The stage's best model so far, saved beside its checkpoint (config.json, model.safetensors): the model
    the stage will publish unless a later epoch beats it, so a damaged one is refused before training goes on."""
    if best is None:
        return
    for name in ("config.json", "model.safetensors"):
        check_access(os.path.join(folder, name))
    try:
        json_object(os.path.join(folder, "config.json"))
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:  # its header, checked against its size
            f.keys()
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise UserError(f"{folder} holds the best model of this stage so far (epoch {best.get('epoch')}), damaged or "
                        f"gone ({e}): restore it, or delete {folder} to redo this stage from its start") from None


COPY_S = 1.0  # a signal again within this is the same one: Slurm signals every process, and torchrun passes its on
INTERRUPTED = None  # when a Ctrl-C (or a second signal) stopped this run at once, whatever error it surfaced as
STOPPING = False  # stop_here was called: the checkpoint is saved, this process is on its way out


def interrupt(signum=None, frame=None):
    """Stop at once, as Python's own Ctrl-C does (a KeyboardInterrupt), and remember it: a library may turn the
    KeyboardInterrupt raised inside it into its own error (safetensors: a ValueError), a stop all the same.
    Its copy (within COPY_S) changes nothing: raised again, it would break off the stop with a traceback."""
    global INTERRUPTED
    if STOPPING:  # a late copy of the stop's signal (torchrun's; one this process took in after the others had
        return  # agreed to stop) would raise into Python's exit, a traceback; SIGTERM still ends it
    if INTERRUPTED is None or time.monotonic() - INTERRUPTED > COPY_S:
        INTERRUPTED = time.monotonic()
        raise KeyboardInterrupt


def note_interrupts():
    """Ctrl-C calls interrupt from here on (deferred_signals takes it over while training)."""
    signal.signal(signal.SIGINT, interrupt)


def interrupted(e):
    """Whether the exception e that ends a run is a stop by Ctrl-C, not a bug (nor a SystemExit's status)."""
    return isinstance(e, KeyboardInterrupt) or (INTERRUPTED is not None and isinstance(e, Exception))


PEER_GONE = ("closed by peer", "reset by peer")  # gloo's words, in a collective, when another process has ended


def peer_gone(e):
    """Whether e is gloo's error in a collective of a run of several processes when another one has ended."""
    return WORLD > 1 and isinstance(e, Exception) and any(words in str(e) for words in PEER_GONE)


def closing_line(e):
    """Print the line a run that the exception e ends without a bug closes with, and return its exit status:
    Ctrl-C outside training (inside, fit saves a checkpoint and says so), or another process of the run gone
    (its own error line says why; gloo's traceback here would only say that it went). None for a bug."""
    if interrupted(e):
        last_word("interrupted; finished stages are kept: run the same command again to go on")
        return 130
    if peer_gone(e):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's, as it ends the rest: the line first
        last_word(f"error: another process of this run ended, and process {RANK} stops with it: torchrun's summary "
                  f"below says how each ended (an error line, a signal). Fix that, then run the same command again "
                  f"to go on")
        return 1
    return None


@contextmanager
def deferred_signals():
    """While training: Ctrl-C (SIGINT) and SIGTERM (preemption, kill, torchrun passing either on)
    only set a flag, which fit() reads after each step to save a checkpoint and stop there.
    A second signal, later than COPY_S, stops at once."""
    got, at = [], []

    def handler(signum, frame):  # the copy may come inside this handler: `at` first, and in one step
        now = time.monotonic()
        if not at:
            at.append(now)
            got.append(signum)
        elif now - at[0] > COPY_S:
            interrupt()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    except Exception as e:
        if peer_gone(e):  # torchrun's SIGTERM to the rest may come before closing_line: not the default's death
            old[signal.SIGTERM] = signal.SIG_IGN
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def last_word(message):
    """Print the line a run ends with to stderr. Under torchrun it also goes into this process's error file,
    which torchrun's closing summary shows as the root cause (else "To enable traceback see: ..."); there
    only process 0 prints it, the others' copies (mostly the same line) are left to the summary."""
    path, filed = os.environ.get("TORCHELASTIC_ERROR_FILE"), False  # torchrun sets it for each process
    if path:
        try:  # the format torchrun reads: a message shown as it is, and when (the first is the root cause)
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
            filed = True
        except OSError:
            pass
    if not filed or os.environ.get("RANK") == "0":  # torchrun's, as MASTER is not set before setup_distributed
        print(message, file=sys.stderr, flush=True)


def stop_here(stop, where, ckpt):
    """Exit after a signal, with the one line that says how to resume (status 128 + signal, as a shell's)."""
    global STOPPING
    STOPPING = True
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
# Stages: their outputs, and whether a finished one fits the current settings


def finished(folder, settings, force):
    """True when `folder` holds a finished stage made with `settings`. False when the stage is to
    run: from its checkpoint when an earlier run stopped in it with the same settings (fit resumes
    it), else from the start. Other settings are refused, so no result is silently replaced."""
    partial = folder + ".partial"
    done, stopped = stage_state(folder, settings) if not force else ("", False)
    if done is None:
        if MASTER:
            print(f"{folder}: done already, reused")
        return True
    if stopped is None:
        if MASTER:
            print(f"{folder}: an earlier run stopped during this stage; it continues from its checkpoint")
        return False
    barrier()  # every process has looked before the master changes the folders
    if MASTER:
        if os.path.exists(partial):
            print(f"{folder}: an earlier run stopped during this stage; it is redone from the start")
            shutil.rmtree(partial)
        # The settings go in first: a checkpoint written here later is known to match them.
        atomic_write_json(os.path.join(makedirs(partial), "settings.json"), settings)
    barrier()
    return False


def stage_state(folder, settings):
    """(done, stopped): differs() of a stage's folder (None: finished with these settings) and, where it is not,
    of the checkpoint of a run stopped in it (False: none). Either made with other settings is refused, so no
    result is silently replaced."""
    done = differs(folder, settings)
    stopped = done is not None and os.path.exists(os.path.join(folder + ".partial", CHECKPOINT)) and differs(
        folder + ".partial", settings)
    for diff in (done, stopped):
        if diff:
            raise UserError(f"{diff}.\nUse another --out, or --force to redo it.")
    return done, stopped


def differs(folder, settings):
    """None if `folder` was made with `settings`; else what differs, as a sentence ('' if no folder)."""
    path = os.path.join(folder, "settings.json")
    if not os.path.exists(path):
        if holds_work(folder):  # never redone over what was built from it, nor a checkpoint deleted
            raise UserError(f"{folder} holds a stage's work but no settings.json, so what it was made with is "
                            f"unknown: restore the file, or run with --force to redo this stage and the ones after it")
        return ""
    old, now = flat(read_json(path)), flat(settings)
    diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
    if not diff:
        return None
    return f"{folder} was made with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())})"


def flat(settings, prefix=""):
    """{"moe": {"route": ...}} -> {"moe.route": ...}: a difference is named down to its field."""
    out = {}
    for k, v in settings.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def publish(partial, folder):
    """Mark a stage finished: one atomic rename, then the checkpoint goes (the best model is beside it).
    In that order, a kill at any point leaves either the finished stage or the checkpoint to resume."""
    if MASTER:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        for name in (CHECKPOINT, CHECKPOINT + ".partial"):  # the latter if a kill came during a write
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    barrier()  # the others read the finished stage from here on


def holds_work(folder):
    """Whether `folder` holds a stage's output or checkpoint."""
    return any(os.path.exists(os.path.join(folder, f))
               for f in ("model.safetensors", "importance.safetensors", CHECKPOINT))


def same_copies(vocab, folders):
    """`vocab`, the vocabulary path, once each finished model of `folders` that keeps a copy of it (vocab.txt)
    holds the same: a copy cut short or edited still loads, and would silently tokenize into other ids."""
    for folder in folders:
        copy = os.path.join(folder, "vocab.txt")
        if os.path.isfile(copy) and os.path.isfile(os.path.join(folder, "model.safetensors")) \
                and not os.path.samefile(copy, vocab) and Path(copy).read_bytes() != Path(vocab).read_bytes():
            raise UserError(f"{vocab} and {copy} differ, where one was copied from the other: one is damaged. Restore "
                            f"it (the vocab.txt of the BERT the run started from), or use another --out")
    return vocab


def check_chain(stages, force):
    """`stages`: the (folder, settings) of each stage this run builds, in order, checked before anything is
    written. A finished stage, or a stopped one's checkpoint, made with other settings is refused (as
    `finished` would refuse it later, after run.json was rewritten). Each stage is built from the one
    before it: a finished stage whose source is gone would be reused beside a source made anew (unless
    `force` redoes them all). A file in a stage's place would fail its last step, the rename: said now."""
    gone = None
    for folder, settings in stages:
        for path in (folder, folder + ".partial"):
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"{path} is a file, where this run keeps a stage's folder: move it away, or use "
                                f"another --out")
        if force:
            continue
        stage_state(folder, settings)  # other settings: refused now, before run.json is written
        if not os.path.isdir(folder):
            gone = gone or folder
        elif gone:
            raise UserError(f"{folder} was built from {gone}, which is not there: restore it, or run with --force "
                            f"to redo every stage")


# ----------------------------------------------------------------------------------------------
# The run's files


class Log:
    """One JSON record per line in OUT/log.jsonl, and a readable line; the master only."""

    def __init__(self, path):
        self.path, self.file = path, open(path, "ab", buffering=0) if MASTER else None

    def __call__(self, record):
        if MASTER:
            line, end = (json.dumps(record) + "\n").encode(), self.file.seek(0, os.SEEK_END)
            try:  # a full disk may take part of a line: whole lines only, or a reader's JSON breaks there
                if self.file.write(line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
            except OSError as e:
                self.file.truncate(end)
                name_file(e, self.path)
                raise
            print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)


def json_object(path):
    """The JSON object in `path`; ValueError where it holds none (another JSON value is not what this code writes)."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError("it holds no JSON object")
    return d


def read_json(path):
    """A JSON object the run wrote; a damaged one is an error that names it."""
    try:
        return json_object(path)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is damaged ({e}): restore it or delete it (a finished stage without its settings.json "
                        f"is then redone with --force), or use another --out") from None


def read_importance(path, shape):
    """The importance scores stage 2 wrote, of `shape` (the teacher's [num_layers, intermediate_size]);
    a file missing, damaged, of another teacher or not finite is an error that names it."""
    check_access(path)
    try:
        scores = load_file(path)["importance"]
    except (OSError, SafetensorError, KeyError) as e:
        raise UserError(f"{path} is missing or damaged ({e}); restore it, or run with --force to redo the stages") from None
    finite = bool(torch.isfinite(scores).all())
    if tuple(scores.shape) != shape or not finite:
        raise UserError(f"{path} holds {'' if finite else 'non-finite '}scores of shape {tuple(scores.shape)}, the "
                        f"teacher has {shape} neurons: restore it, or run with --force to redo the stages")
    return scores


def read_run(args, given, keep, free, flags):
    """OUT/run.json records a run's task, student and settings. One --out holds one run, of one task
    and one student: refuse to mix another into it. --eval-only takes the recorded settings, each checked
    as `flags` (the argparse parser) would, but those in `keep`; of the flags given again, those in `free`
    (they shape the evaluation alone) win, the others must be what trained the models."""
    path = os.path.join(args.out, "run.json")
    run = read_json(path) if os.path.exists(path) else None
    if os.path.exists(os.path.join(args.out, "results.json")):  # damaged: said now, not after the run
        read_json(os.path.join(args.out, "results.json"))
    if run is not None and not (isinstance(run.get("task"), str) and isinstance(run.get("args", {}), dict)):
        raise UserError(f"{path} is damaged (no task, or args that are not an object): restore it, or use another --out")
    recorded = run.get("args", {}) if run and args.eval_only else {}
    for action in flags._actions:  # flags this code does not have (any more) are passed over
        k, flag = action.dest, (action.option_strings or [action.dest])[0]
        if k not in recorded or k in keep or (k in free and k in given):
            continue
        try:
            value = recorded_flag(path, action, recorded[k])
        except UserError:
            if k in given:  # a damaged record: the flag given again stands in for it
                continue
            raise
        if k not in given:
            setattr(args, k, value)
        elif getattr(args, k) != value and not same_path(getattr(args, k), value):
            raise UserError(f"--eval-only evaluates the models in {args.out} as they were trained, with {flag} "
                            f"{'(its default)' if value is None else value} (run.json), not {getattr(args, k)}: drop "
                            f"{flag}, or train with it into another --out")
    if run and run["task"] != args.task:
        raise UserError(f"{args.out} holds a run of task {run['task']}; use another --out for {args.task}")
    if run and run.get("student", "moebert") != args.student:  # run.json of older runs: MoEBERT's
        raise UserError(f"{args.out} holds a run with --student {run.get('student', 'moebert')}; use another "
                        f"--out for --student {args.student} (--teacher {args.out}/teacher reuses its teacher)")


def same_path(a, b):
    """Whether a and b spell one file or folder (relative and absolute, through a link)."""
    try:
        return isinstance(a, str) and isinstance(b, str) and os.path.samefile(a, b)
    except OSError:  # one of them is not there
        return False


def recorded_flag(path, action, value):
    """A setting run.json recorded, checked as if it were typed again: the flag's type and choices."""
    if value is None and action.default is None:  # the flag was not given: its default
        return value
    try:
        if action.type is not None:
            value = action.type(str(value))  # recorded as parsed: a number reads back as itself
        elif not isinstance(value, str):
            raise ValueError
        if action.choices is not None and value not in action.choices:
            raise ValueError
        return value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise UserError(f"{path} records {value!r} for {action.option_strings[0]}, which it does not take: restore "
                        f"the file, or give {action.option_strings[0]} again") from None


def write_run(args):
    if MASTER and not args.eval_only:  # the record of what trained the models: an evaluation changes none
        atomic_write_json(os.path.join(args.out, "run.json"), {"task": args.task, "student": args.student,
                                                               "args": vars(args)})


def claim(out):
    """Make --out (a folder you can write to) and lock it for this run: a second run into the same
    folder stops at once. The lock goes with the process, so a killed run leaves none behind.
    Returns the first folder this made (None if --out was there): a failed start removes it."""
    path, made = os.path.abspath(out), None
    while not os.path.exists(path):  # the nearest part of the path that is there
        path, made = os.path.dirname(path), path
    if not os.path.isdir(path):
        raise UserError(f"--out {out}: {path} is a file, not a folder; pass a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {path}; pass a folder you can write to")
    if MASTER:  # the others write nothing here; a second maker could remake it after a failed start removed it
        global LOCK
        lock = os.path.join(out, "run.lock")
        try:  # flock needs the file open, not writable: another user's lock (a run as root, say) serves as well
            os.makedirs(out, exist_ok=True)
            LOCK = open(lock, "a") if not os.path.exists(lock) or os.access(lock, os.W_OK) else open(lock)
        except OSError as e:
            raise UserError(disk_error(e)) from None
        try:
            fcntl.flock(LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            release()
            raise UserError(f"another run is writing into {out}; wait for it to end, or use another --out") from None
    return made


def release():
    """Drop this run's lock on --out (at its end; a killed run's goes with its process)."""
    global LOCK
    if LOCK is not None:
        LOCK.close()  # closing the file drops the lock
        LOCK = None


def disk_error(e):
    """A write that failed for want of space or permission, or a folder where a file goes: what was kept, and
    what to do."""
    path = e.filename2 or e.filename or "a file"  # os.replace(written, path): path is the one that failed
    if e.errno == errno.EISDIR:
        return f"{path} is a folder, {DISK_ERRORS[e.errno]}: move it away, then run the same command again"
    if e.errno in (errno.EACCES, errno.EPERM) and unreadable(path):
        return f"cannot read {path}: no permission; give this user access to it, then run the same command again"
    kept = "the finished stages and the last checkpoint are kept (files are written beside, then renamed)"
    in_cache = os.path.abspath(path).startswith(os.path.join(os.path.abspath(cache_root()), ""))  # a download
    elsewhere = "set MOEBERT_CACHE to a folder you can write to (the download cache)" if in_cache else "use another --out"
    fix = "Free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"Make it writable, or {elsewhere}"
    return f"cannot write {path}: {DISK_ERRORS[e.errno]}; {kept}. {fix}, then run the same command again to go on"


def discard_if_empty(out):
    """After a failed start: remove `out` (which this run made) unless it holds a stage's output or checkpoint."""
    if not any(holds_work(folder) for folder, _, _ in os.walk(out)):
        shutil.rmtree(out, ignore_errors=True)
