"""runtime.py, through train.py's tiny runs: resume bit for bit after a kill or a signal at any step, checkpoints
and the damage they refuse, the output folder and its lock, a full disk, several processes under torchrun and the
process group's end, the allocator's settings."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

import common
import runtime
from helpers import (ROOT, TORCHRUN, TRAIN, assert_close, assert_same_weights, cut_in_half, deny, free_port,
                     random_batch, read_log, run_torchrun, snapshot, stop_midway, tiny_model, tiny_task, torchrun_env,
                     worker)


# ----------------------------------------------------------------------------------------------
# Stopped inside a stage, then the same command: bitwise a run never stopped


def stopped_in_distillation(sig):
    """The stop line's pattern: at a step, or at an epoch's end where the signal, sent once the first checkpoint is
    there, lands during that epoch's evaluation (under load the epoch's last steps can pass before it does)."""
    return rf"stopped by {signal.Signals(sig).name} at (distill step \d+|the end of distill epoch \d+); checkpoint saved"


@pytest.mark.parametrize("stage,sig", [("teacher", signal.SIGKILL), ("moebert", signal.SIGKILL),
                                       ("moebert", signal.SIGTERM), ("moebert", signal.SIGINT)])
def test_stopped_run_resumes_bitwise(never_stopped, tmp_path, stage, sig, capsys):
    """Killed (or asked to stop) inside a training stage, then run again with the same command: the
    result is bitwise the one of a run that was never stopped (the RNGs, the optimizer, the LR
    schedule and the position in the epoch all continue)."""
    import train
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    if stage == "moebert":  # the teacher is finished: the same one as the reference's
        shutil.copytree(never_stopped["ref"] / "teacher", out / "teacher")
        shutil.copytree(never_stopped["ref"] / "importance", out / "importance")
    code, text = stop_midway([sys.executable, TRAIN, *args], out / stage, sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # Ctrl-C and SIGTERM: a checkpoint at the current step, one line on how to resume
        assert code == 128 + sig, text
        line = [l for l in text.splitlines() if l.startswith("stopped by")]
        assert line and re.match(stopped_in_distillation(sig), line[0]), text
        assert "Run the same command again to resume" in line[0] and "Traceback" not in text
    capsys.readouterr()
    results = train.main(args)
    said = capsys.readouterr().out
    assert "resumed" in (out / "log.jsonl").read_text()
    assert "continues from its checkpoint" in said and "initialised fresh" not in said, said  # nothing alarming
    for s in ("teacher", "moebert"):
        assert_same_weights(out / s / "model.safetensors", never_stopped["ref"] / s / "model.safetensors")
        assert json.loads((out / s / "metrics.json").read_text()) == json.loads(
            (never_stopped["ref"] / s / "metrics.json").read_text())
    assert results["teacher"] == never_stopped["results"]["teacher"]
    assert results["moebert"] == never_stopped["results"]["moebert"]
    assert not (out / stage / "checkpoint.safetensors").exists()  # a finished stage keeps its best model only


def test_a_signal_and_its_copy_stop_once_a_later_one_at_once(monkeypatch):
    """runtime.deferred_signals: SIGTERM twice in a moment (Slurm's to every process, and torchrun's copy) asks
    for one stop at the step's end; a second signal later than COPY_S stops at once; the old handlers come back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(runtime, "INTERRUPTED", None)
    with runtime.deferred_signals() as stop:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handlers run in between
        except KeyboardInterrupt:
            pytest.fail("the copy counted as a second signal: stopped at once, no checkpoint")
        assert stop == [signal.SIGTERM]
        monkeypatch.setattr(runtime, "COPY_S", 0.0)  # what comes next is later than the copies' moment
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before
    assert runtime.INTERRUPTED is not None  # the stop at once is remembered: train.py says "interrupted" whatever surfaces



def test_a_copy_that_comes_inside_the_first_signals_handler_is_the_same_stop(monkeypatch):
    """Python may run a signal's handler between two steps of the first one's: the copy (torchrun's, Slurm's)
    then found the first signal noted but not its time, an IndexError traceback in a torchrun worker (CI,
    2026-12-08, a loaded machine). Here the copy comes while the first handler reads the clock."""
    import types
    calls = []

    def monotonic():
        calls.append(1)
        if len(calls) == 1:  # the first handler, reading the clock: the copy arrives
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # its handler runs here
        return time.monotonic()
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(monotonic=monotonic, time=time.time))
    monkeypatch.setattr(runtime, "INTERRUPTED", None)
    with runtime.deferred_signals() as stop:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        except (IndexError, KeyboardInterrupt) as e:
            pytest.fail(f"the copy inside the first handler: {e!r}")
        assert stop == [signal.SIGTERM] and len(calls) == 2


def test_ctrl_c_outside_training_and_its_copy_stop_once(monkeypatch):
    """runtime.interrupt, Ctrl-C outside training: the first stops at once; its copy (Slurm's signal to every
    process and torchrun's, within COPY_S) must not raise again, into the stop's own clean-up, as a traceback;
    a later Ctrl-C stops at once again."""
    monkeypatch.setattr(runtime, "INTERRUPTED", None)
    old = signal.getsignal(signal.SIGINT)
    runtime.note_interrupts()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # the copy
        time.sleep(0.01)  # the handler runs
        monkeypatch.setattr(runtime, "COPY_S", 0.0)  # what comes next is later than the copy's moment
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, old)

def test_a_signal_after_the_stop_is_part_of_it(monkeypatch):
    """After stop_here (the checkpoint saved, the process on its way out) a late copy of the signal (torchrun's,
    or one a process took in only after the others had agreed to stop) does nothing: it raised a KeyboardInterrupt
    into Python's exit, printed as a traceback (kill_anywhere --nproc 2: 1 of 48 stops)."""
    monkeypatch.setattr(runtime, "INTERRUPTED", None)
    monkeypatch.setattr(runtime, "STOPPING", False)
    old = signal.getsignal(signal.SIGINT)
    runtime.note_interrupts()
    try:
        with pytest.raises(SystemExit) as e:
            with runtime.deferred_signals() as stop:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs
                runtime.stop_here(stop, "distill step 3", "checkpoint.safetensors")
        assert e.value.code == 128 + signal.SIGINT
        monkeypatch.setattr(runtime, "COPY_S", 0.0)  # later than any copy's moment
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs
        except KeyboardInterrupt:
            pytest.fail("a signal after the stop raised into the process's exit")
    finally:
        signal.signal(signal.SIGINT, old)


# A stand-in for safetensors' load_file, loaded at start-up (sitecustomize): a Ctrl-C comes while it reads, and
# the KeyboardInterrupt raised inside it comes out as its own error, as the real one's did; or it has a bug.
LIBRARY = """
import os, signal, time
import safetensors.torch
real = safetensors.torch.load_file
def load_file(*args, **kwargs):
    if os.environ["WHAT"] == "a bug":
        raise ValueError("a bug in the library")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    except KeyboardInterrupt:
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    return real(*args, **kwargs)
safetensors.torch.load_file = load_file
"""


@pytest.mark.parametrize("what", ["Ctrl-C", "a bug"])
def test_a_ctrl_c_that_a_library_turns_into_its_own_error_is_still_a_stop(tmp_path, what):
    """tools/kill_anywhere.py sent Ctrl-C while safetensors read the BERT at start-up: the stop ended in a
    ValueError's traceback. It must end as any Ctrl-C outside training (status 130, one line, nothing left
    behind), while a library's own error keeps its traceback."""
    args = tiny_task(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(LIBRARY)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), WHAT=what)
    p = subprocess.run([sys.executable, TRAIN, *args, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    if what == "Ctrl-C":
        assert (p.returncode, p.stderr.strip()) == (130, "interrupted; finished stages are kept: run the same "
                                                         "command again to go on"), p.stderr
    else:
        assert p.returncode == 1 and "Traceback" in p.stderr and "ValueError: a bug in the library" in p.stderr
    assert not (tmp_path / "out").exists()  # a failed start leaves nothing behind


def test_a_kill_while_a_stage_is_published_loses_none_of_its_work(never_stopped, tmp_path, monkeypatch, capsys):
    """Killed at the rename that publishes the teacher (the last checkpoint still beside its best
    model): the same command finishes the stage from that checkpoint, training nothing again."""
    import train
    out = tmp_path / "out"
    replace = os.replace

    def killed_at_publish(src, dst):
        if str(src).endswith("teacher.partial"):
            raise KeyboardInterrupt  # what a kill at this moment leaves on disk
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_publish)
    with pytest.raises(KeyboardInterrupt):
        train.main(never_stopped["args"] + ["--out", str(out)])
    monkeypatch.setattr(os, "replace", replace)
    assert (out / "teacher.partial" / "checkpoint.safetensors").exists() and not (out / "teacher").exists()
    steps = len([r for r in read_log(out) if r.get("stage") == "teacher" and "loss" in r])
    capsys.readouterr()
    results = train.main(never_stopped["args"] + ["--out", str(out)])
    assert "teacher.partial" not in os.listdir(out) and "continues from its checkpoint" in capsys.readouterr().out
    assert len([r for r in read_log(out) if r.get("stage") == "teacher" and "loss" in r]) == steps  # none again
    assert_same_weights(out / "teacher" / "model.safetensors", never_stopped["ref"] / "teacher" / "model.safetensors")
    assert not (out / "teacher" / "checkpoint.safetensors").exists()
    assert results["moebert"] == never_stopped["results"]["moebert"]


# ----------------------------------------------------------------------------------------------
# Checkpoints: what they hold, and a damaged one, a damaged best model beside, a full disk


def test_checkpoint_holds_everything_and_a_damaged_one_is_refused(never_stopped, tmp_path):
    import train
    from safetensors import safe_open
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    code, _ = stop_midway([sys.executable, TRAIN, *args], out / "teacher", signal.SIGKILL)
    ckpt = out / "teacher.partial" / "checkpoint.safetensors"
    with safe_open(ckpt, "pt") as f:
        keys, meta = set(f.keys()), {k: json.loads(v) for k, v in f.metadata().items()}
    assert {"model.classifier.weight", "rng.cpu.0", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq"} <= keys
    assert meta["state"]["step"] % 4 == 0 and meta["state"]["processes"] == 1
    assert meta["scheduler"]["last_epoch"] == meta["state"]["step"]
    # Other settings are refused, not mixed into the stopped stage.
    with pytest.raises(common.UserError, match="lr: 0.002 there, 0.003 now"):
        train.main(args + ["--lr", "3e-3"])
    ckpt.write_bytes(b"\x10" + ckpt.read_bytes()[1:100])  # damaged
    with pytest.raises(common.UserError, match="checkpoint.safetensors is damaged"):
        train.main(args)
    assert ckpt.exists()  # never deleted behind the user's back


@pytest.mark.parametrize("damage", ["model cut in half", "config gone"])
def test_a_damaged_best_model_beside_a_checkpoint_is_refused_before_training_goes_on(never_stopped, tmp_path, damage):
    """A stage stopped after its first epoch keeps its best model so far beside its checkpoint; the stage
    publishes it unless a later epoch beats it. Damaged, it is refused at the resume, before any step and
    with the checkpoint kept (it was published, and the checkpoint removed, then the report failed on it)."""
    import train
    out = tmp_path / "out"
    args = never_stopped["args"] + ["--out", str(out)]
    partial = out / "moebert.partial"

    def best_saved():  # a checkpoint that records a best model: its header, read through one open file, as the
        try:  # run renames the next checkpoint over it (safe_open opens the path twice: header and tensors)
            with open(partial / "checkpoint.safetensors", "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except FileNotFoundError:
            return False
        return json.loads(header["__metadata__"]["state"])["best"] is not None
    p = subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not best_saved():
        assert p.poll() is None, "the run ended before distillation's first epoch"
        time.sleep(0.001)
    p.kill()
    p.wait()
    assert not (out / "moebert").exists(), "distillation finished before the kill"
    if damage == "model cut in half":
        cut_in_half(partial / "model.safetensors")
    else:
        os.remove(partial / "config.json")
    before = snapshot(out)
    with pytest.raises(common.UserError, match="moebert.partial holds the best model of this stage so far"):
        train.main(args)
    assert snapshot(out) == before


@pytest.mark.parametrize("reader", ["checkpoint", "best model", "importance"])
def test_a_run_file_of_another_user_is_said_unreadable_not_damaged(tmp_path, monkeypatch, reader):
    """A checkpoint, the best model beside it or the importance scores, left by a run as another user (root in
    a container, say) and unreadable to this one: safetensors said "No such file or directory", so the run
    said "damaged", "damaged or gone", "missing or damaged". Now it is the PermissionError that train.py turns
    into "cannot read X". (The tests run as root, who reads everything: os.access is what says no here.)"""
    import torch
    common.save_safetensors({"importance": torch.ones(2, 3)}, str(tmp_path / "importance.safetensors"))
    common.save_safetensors({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    common.atomic_write_json(str(tmp_path / "config.json"), {})
    target, read = {
        "checkpoint": (tmp_path / "model.safetensors", lambda: runtime.load_checkpoint(
            str(tmp_path / "model.safetensors"), None, None, None, torch.device("cpu"))),
        "best model": (tmp_path / "model.safetensors", lambda: runtime.check_best(str(tmp_path), {"epoch": 1})),
        "importance": (tmp_path / "importance.safetensors", lambda: runtime.read_importance(
            str(tmp_path / "importance.safetensors"), (2, 3))),
    }[reader]
    deny(monkeypatch, target)
    with pytest.raises(PermissionError) as e:
        read()
    assert e.value.filename == str(target)
    assert runtime.disk_error(e.value) == (f"cannot read {target}: no permission; give this user access to it, then "
                                           f"run the same command again")


def test_a_full_disk_keeps_the_last_checkpoint_and_says_the_command_resumes(never_stopped, tmp_path, monkeypatch):
    """A full disk as safetensors meets it: the file comes out short, and nothing is raised. The short
    checkpoint is caught before it replaces the last one; the run stops with an error that says what
    was kept; with space again the same command resumes and ends as a run never stopped."""
    import train
    out, save_file, kept = tmp_path / "out", safetensors.torch.save_file, []

    def disk_fills(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        if path.endswith("checkpoint.safetensors.partial") and os.path.exists(path[:-len(".partial")]):
            kept.append(open(path[:-len(".partial")], "rb").read())  # the last checkpoint, whole
            os.truncate(path, os.path.getsize(path) // 2)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills)
    with pytest.raises(common.UserError, match="cannot write .*checkpoint.safetensors: the disk is full; the finished "
                                               "stages and the last checkpoint are kept") as e:
        train.main(never_stopped["args"] + ["--out", str(out)])
    assert "renamed). Free some space, then run the same command again" in str(e.value)
    assert (out / "teacher.partial" / "checkpoint.safetensors").read_bytes() == kept[0]
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    results = train.main(never_stopped["args"] + ["--out", str(out)])
    assert_same_weights(out / "teacher" / "model.safetensors", never_stopped["ref"] / "teacher" / "model.safetensors")
    assert results["moebert"] == never_stopped["results"]["moebert"]


# ----------------------------------------------------------------------------------------------
# The output folder: a failed start, one that cannot be written, two runs into one


def test_a_failed_start_leaves_nothing_behind(never_stopped, tmp_path):
    """A run that fails before any stage has finished or checkpointed removes the --out it made (here:
    the teacher stage had begun, its settings written, when the BERT turned out not to fit its config);
    an --out that was there before keeps everything it held."""
    import train
    bad = tmp_path / "bert"
    shutil.copytree(never_stopped["root"] / "bert", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, intermediate_size=38)))
    args = never_stopped["args"] + ["--bert", str(bad)]
    with pytest.raises(common.UserError, match="does not fit the model"):
        train.main(args + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(common.UserError, match="does not fit the model"):
        train.main(args + ["--out", str(tmp_path / "kept")])
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_out_folder_that_cannot_be_written(tmp_path, where, monkeypatch):
    import train
    (tmp_path / "file").write_text("mine")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # as root every permission bit is ignored: what a read-only folder answers
        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "ro")))
    phrase = "cannot write in" if where == "read-only" else "is a file, not a folder"
    with pytest.raises(common.UserError, match=phrase):
        train.main(["--task", "rte", "--out", str(out), "--device", "cpu"])
    assert (tmp_path / "file").read_text() == "mine"


def test_a_second_run_into_the_same_out_refuses_at_once(never_stopped, tmp_path):
    """A run holds OUT/run.lock while it lasts; the second stops with an error at once. The lock is the
    kernel's (flock): a run killed with SIGKILL leaves none behind."""
    import train
    out = tmp_path / "out"
    shutil.copytree(never_stopped["ref"], out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runtime; runtime.claim(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    before = snapshot(out)
    t0 = time.time()
    with pytest.raises(common.UserError, match="another run is writing into"):
        train.main(never_stopped["args"] + ["--out", str(out)])
    assert time.time() - t0 < 5 and snapshot(out) == before
    holder.kill()
    holder.wait()
    results = train.main(never_stopped["args"] + ["--out", str(out)])  # the killed holder left no lock
    assert results["moebert"] == never_stopped["results"]["moebert"]


def test_a_folder_where_the_lock_goes_is_a_user_error(tmp_path):
    """A folder named run.lock in --out: the error line, not open()'s IsADirectoryError traceback."""
    (tmp_path / "out" / "run.lock").mkdir(parents=True)
    with pytest.raises(common.UserError, match="run.lock is a folder, where this run reads or writes a file: move it"):
        runtime.claim(str(tmp_path / "out"))
    assert runtime.LOCK is None


def test_a_lock_file_of_another_user_still_locks(tmp_path, monkeypatch):
    """OUT/run.lock left by a run as another user (root in a container, say), readable, not writable: the
    next run ended in open()'s PermissionError traceback. flock needs only the file open: the run takes it
    read-only, and it still keeps a second run out. One it cannot even read is "cannot read X: no permission".
    (Run as root: os.access, and open for the last case, are what say no.)"""
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "run.lock"
    lock.write_text("")
    real_open = open
    deny(monkeypatch, lock, write_only=True)
    try:
        assert runtime.claim(str(out)) is None and runtime.LOCK.mode == "r"
        other = subprocess.run([sys.executable, "-c", "import sys, runtime\ntry:\n runtime.claim(sys.argv[1])\n"
                                "except runtime.UserError as e:\n print(e)", str(out)], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
        assert other.stdout.startswith(f"another run is writing into {out}"), other.stdout + other.stderr
    finally:
        runtime.release()

    def no_read(path, *args, **kwargs):
        if os.fspath(path) == str(lock):
            raise PermissionError(13, "Permission denied", str(lock))
        return real_open(path, *args, **kwargs)
    deny(monkeypatch, lock)
    monkeypatch.setattr(runtime, "open", no_read, raising=False)
    with pytest.raises(common.UserError, match=f"cannot read {re.escape(str(lock))}: no permission; give this user "):
        runtime.claim(str(out))
    assert runtime.LOCK is None


# ----------------------------------------------------------------------------------------------
# Several processes under torchrun (gloo on the CPU), and the process group's end


def test_two_processes_equal_one(never_stopped, tmp_path):
    """torchrun with 2 gloo processes on the CPU: every stage completes, and with dropout off the
    weights equal a one-process run of the same global batches (uneven shards included: 89
    examples leave a last teacher batch of 1, so one process gets a weight-0 row)."""
    import train
    args = tiny_task(tmp_path, dropout=0.0) + ["--expert-dropout", "0", "--max-train-examples", "89", "--epochs", "3"]
    one = train.main(args + ["--out", str(tmp_path / "one")])
    t0 = time.time()
    run_torchrun(args, tmp_path / "two")
    print(f"two processes: {time.time() - t0:.1f}s")
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["processes"] == 2
    for s in ("teacher", "moebert"):
        assert_same_weights(tmp_path / "two" / s / "model.safetensors", tmp_path / "one" / s / "model.safetensors",
                            atol=1e-5)
    imp = [load_file(tmp_path / r / "importance" / "importance.safetensors")["importance"] for r in ("one", "two")]
    assert_close(imp[1], imp[0], 1e-6 * imp[0].abs().max().item(), "importance summed over processes")
    # Written once: one log line per step, not two.
    steps = [r["step"] for r in read_log(tmp_path / "two") if r.get("stage") == "teacher" and "loss" in r]
    assert steps == sorted(set(steps))
    for m in ("teacher", "moebert"):
        assert abs(two[m]["accuracy"] - one[m]["accuracy"]) <= 1 / 32


@pytest.fixture(scope="module")
def two_never_stopped(tmp_path_factory):
    """The reference of the stopped 2-process runs: a tiny one, dropout on, that nothing interrupts."""
    root = tmp_path_factory.mktemp("two")
    args = tiny_task(root) + ["--epochs", "6"]
    run_torchrun(args, root / "ref")
    return dict(args=args, ref=root / "ref")


@pytest.mark.parametrize("every", [False, True], ids=["to torchrun", "to every process"])
def test_two_processes_stopped_and_resumed_bitwise(two_never_stopped, tmp_path, every):
    """torchrun with 2 gloo processes, dropout on: SIGTERM inside distillation, to torchrun, which passes it on,
    or to every process, as Slurm at a time limit or preemption (each worker then gets it twice, from there and
    from torchrun: still one stop, not the second signal's stop at once); both processes stop at the same step
    and the master writes every process's RNG state. Then the same command again: bitwise the weights of a
    2-process run never stopped."""
    args, out = two_never_stopped["args"], tmp_path / "out"
    code, text = stop_midway(TORCHRUN + [*args, "--out", str(out)], out / "moebert", signal.SIGTERM,
                             env=torchrun_env(), every=every)
    assert len([l for l in text.splitlines() if re.match(stopped_in_distillation(signal.SIGTERM), l)]) == 1, text
    run_torchrun(args, out)
    assert '"resumed"' in (out / "log.jsonl").read_text()
    for s in ("teacher", "moebert"):
        assert_same_weights(out / s / "model.safetensors", two_never_stopped["ref"] / s / "model.safetensors")


def test_last_word_is_what_torchrun_reads_from_the_error_file(tmp_path, monkeypatch, capsys):
    """runtime.last_word prints the line, and under torchrun also writes it where torchrun's own reader
    (ProcessFailure, the independent reference) takes it as the failure's message, in place of "To enable
    traceback see: ...". Outside torchrun it writes nothing; an error file it cannot write costs only that copy.
    A process other than the master leaves the line to the error file, and prints it where there is none."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
    line = "error: --data-dir /x holds no train.tsv: pass the folder of the task's GLUE files"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    runtime.last_word(line)
    assert capsys.readouterr().err == line + "\n" and not list(tmp_path.iterdir())
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "0")
    runtime.last_word(line)
    assert capsys.readouterr().err == line + "\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(tmp_path / "error.json"))
    assert failure.message == line and abs(failure.timestamp - time.time()) < 5
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "no such folder" / "error.json"))
    runtime.last_word(line)
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("RANK", "1")
    runtime.last_word(line)
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "other.json"))
    runtime.last_word(line)
    assert capsys.readouterr().err == ""
    assert ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(tmp_path / "other.json")).message == line


def test_torchruns_summary_names_the_error(tmp_path):
    """A run that stops on an error a user can fix, under torchrun: the master prints the one error line, and
    torchrun's closing summary (after a traceback of its own) gives it for each process, not "To enable
    traceback see: ..."."""
    for bad, words in ((["--data-dir", str(tmp_path / "nowhere")], "nowhere"),
                       (["--device", "meta"], "--device meta")):  # the second before the process group is set up
        p = subprocess.run(TORCHRUN + [*tiny_task(tmp_path), *bad, "--out", str(tmp_path / "out")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=torchrun_env())
        assert p.returncode != 0
        said = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
        assert len(said) == 1 and words in said[0], p.stderr  # whole: a process's own traceback comes before torchrun's
        summary = p.stderr.split("Failures:")[1]
        each = 1 if "<NO_OTHER_FAILURES>" in summary else 2  # torch 2.4's torchrun lists the first failure alone
        assert summary.count(f"traceback : {said[0]}") == each and "To enable traceback" not in p.stderr, p.stderr[-3000:]
        assert f"traceback : {said[0]}" in summary.split("Root Cause (first observed failure):")[1]
        assert not (tmp_path / "out").exists()


def test_only_a_lost_peer_under_torchrun_closes_with_the_line(monkeypatch, capsys):
    """closing_line: gloo's error when another process is gone ends a run of several processes with one line
    (exit 1); the same words with one process, or another error, are a bug and keep their traceback (None)."""
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:44977: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging or bugs in the application.")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert runtime.closing_line(gone) is None and capsys.readouterr().err == ""
    monkeypatch.setattr(runtime, "WORLD", 2)
    monkeypatch.setattr(runtime, "RANK", 1)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the SIGTERM it ignores, left to this test's process
    assert runtime.closing_line(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert runtime.closing_line(gone) == 1
    assert capsys.readouterr().err.startswith("error: another process of this run ended, and process 1 stops with it")


def test_a_lost_peer_in_training_leaves_torchruns_sigterm_ignored(monkeypatch):
    """Leaving training on gloo's error when another process is gone, SIGTERM stays ignored, not the default's
    death: torchrun's, sent to the rest as it notices the loss, came at times (under load) before closing_line
    could ignore it, and the process died by it without its line. Any other error restores it."""
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:44977: Connection reset by peer.")
    monkeypatch.setattr(runtime, "WORLD", 2)
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)  # SIGINT: ignored under nohup
    try:
        for error, after in ((RuntimeError("mat1 and mat2 shapes cannot be multiplied"), before), (gone, signal.SIG_IGN)):
            with pytest.raises(RuntimeError):
                with runtime.deferred_signals():
                    raise error
            assert signal.getsignal(signal.SIGTERM) == after and signal.getsignal(signal.SIGINT) == before_int
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers in Linux's /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_killed_the_other_ends_with_one_line(two_never_stopped, tmp_path, rank):
    """One of 2 torchrun processes killed inside distillation (a crash, the out-of-memory killer): the other ended in
    gloo's traceback of 40 lines ("Connection reset by peer"). Now it ends with one error line: in torchrun's
    summary, and printed where it is the master. (`tools/kill_anywhere.py --worker` shows the run then resumes.)"""
    args, out = two_never_stopped["args"], tmp_path / "out"
    p = subprocess.Popen(TORCHRUN + [*args, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=torchrun_env())
    t0 = time.time()
    while not (out / "moebert.partial" / "checkpoint.safetensors").exists():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.001)
    os.kill(worker(p.pid, rank), signal.SIGKILL)
    said, err = p.communicate(timeout=120)
    assert p.returncode != 0 and not (out / "moebert").exists()
    assert f'File "{ROOT}' not in said + err, err[-3000:]  # no traceback through this project's files
    line = f"error: another process of this run ended, and process {1 - rank} stops with it: torchrun's summary"
    summary = err.split("Failures:")[1]
    # torchrun lists how each process ended; torch 2.4's stopped the others at the first failure and lists it alone.
    assert summary.count(f"traceback : {line}") == (0 if "<NO_OTHER_FAILURES>" in summary else 1), err[-3000:]
    assert "Signal 9 (SIGKILL) received by PID" in summary, err[-3000:]
    printed = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(printed) == rank and all(l.startswith(line) for l in printed), err[-3000:]  # by the master alone


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process's threads from Linux's /proc")
def test_process_group_ends_with_destroy_after_ddp():
    """After DDP, destroy_process_group stops gloo's threads. A process group that outlived it kept them
    running into Python's shutdown, where one freeing a finished collective aborted the process (SIGABRT,
    "terminate called without an active exception": 2 torchrun runs in ~50 on the loaded 2-core CPU,
    2026-12-03). What held it: DDP imports torch.distributed.nn.functional, whose default arguments took
    the group when imported after init; setup_distributed now imports it first. A fresh process, so the
    import is not already done."""
    code = """if True:
        import json, os, torch, torch.distributed as dist, runtime
        from torch.nn.parallel import DistributedDataParallel as DDP
        threads = lambda: sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        torch.set_num_threads(1)  # no OpenMP team: every thread that comes and goes is the group's
        before = threads()
        runtime.setup_distributed("cpu")
        ddp = DDP(torch.nn.Linear(3, 5))
        ddp(torch.randn(2, 3)).sum().backward()  # its gradients all-reduced by gloo's threads
        del ddp
        during = threads()
        dist.destroy_process_group()
        print(json.dumps([before, during, threads()]))"""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    before, during, after = json.loads(p.stdout.splitlines()[-1])
    assert len(during) > len(before), (before, during)  # the group's threads ran
    assert after == before, f"threads left running after destroy_process_group: {after} (before init: {before})"


# ----------------------------------------------------------------------------------------------
# The allocator's settings


def test_keep_freed_memory_takes_on_glibc():
    """The allocator settings train.py and bench.py apply on CPU; a no-op without glibc."""
    import platform
    assert runtime.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_adamw_is_fused_on_cuda_and_on_the_cpu_from_torch_2_4(monkeypatch):
    """runtime.fused_adamw: torch 2.1-2.3 refuse AdamW's fused kernel on the CPU; they run it tensor by tensor."""
    for version, on_cpu in (("2.1.2+cu121", False), ("2.3.1", False), ("2.4.0", True), ("2.13.0+cpu", True)):
        monkeypatch.setattr(torch, "__version__", version)
        assert runtime.fused_adamw(torch.device("cpu")) == on_cpu and runtime.fused_adamw(torch.device("cuda"))


@pytest.mark.skipif(not runtime.fused_adamw(torch.device("cpu")), reason=f"torch {torch.__version__}: no fused CPU AdamW")
def test_adamw_tensor_by_tensor_steps_as_the_fused_one():
    """What older torch runs in place of the fused kernel takes the same steps."""
    batch = random_batch()
    trained = []
    for fused in (True, False):
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
        for _ in range(3):
            model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits.square().sum().backward()
            opt.step()
            opt.zero_grad()
        trained.append(model.state_dict())
    for name, fused_value in trained[0].items():
        assert_close(trained[1][name], fused_value, 1e-6, name)
