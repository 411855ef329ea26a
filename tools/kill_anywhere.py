"""Resume after a kill at any moment, not only inside a training stage: tiny runs of train.py (a checkpoint every
step) stopped at evenly spread times over a whole run (start-up, teacher, importance, distillation, the
evaluations, the files written at the end) by SIGKILL, SIGTERM or SIGINT, then the same command run to its end.
Each must end as the run never stopped: the same dev scores, every model, importance and prediction file
bitwise; the stopped run must exit by the signal or with its resume line, and the rerun with 0 and no traceback.

    python tools/kill_anywhere.py                       # RTE with --predict and SQuAD v2.0, 24 kills each, ~15 min
    python tools/kill_anywhere.py --tasks rte --kills 8 --flags "--route gate-token" --out kills.json
    python tools/kill_anywhere.py --nproc 2             # under torchrun, the signal to every process as Slurm's
    python tools/kill_anywhere.py --nproc 2 --tasks rte --kills 20 --signal SIGINT --between 2.6 4.5  # its start-up
    python tools/kill_anywhere.py --nproc 2 --worker 0  # one process alone, as a crash or the out-of-memory killer

Under torchrun (--nproc) the signal goes to torchrun and its workers, as Slurm's at a time limit or preemption
(torchrun passes its copy on too), or with --worker to one worker alone, as a crash or the out-of-memory killer
takes one (the others must end without a traceback); torchrun's own report of its stopped workers is not a
finding, a traceback through this project's files is.
"""
import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]

from helpers import send, worker  # noqa: E402
from sweep_inputs import base, workspace, files as sweep_files  # noqa: E402

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
KEPT = (".safetensors", ".tsv", "predictions.json", "null_odds.json")  # what must come out bitwise equal


def outputs(out):
    """The run's models, importance and prediction files (path -> hash) and its dev scores."""
    files = {k: v for k, v in sweep_files(out).items() if k.endswith(KEPT) and ".partial" not in k}
    results = json.loads((Path(out) / "results.json").read_text())
    return files, {k: results[k] for k in ("teacher", "moebert", "shallow") if k in results}


def launcher(nproc):
    """How train.py is started: plain python, or torchrun with nproc processes (gloo on the CPU)."""
    return [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def tiny_run(w, task, flags):
    """train.py's flags for a tiny run of the task (a checkpoint every step; RTE with --predict), `flags` last."""
    return base(w, task) + ["--epochs", "3", "--save-every", "1"] + (["--predict"] if task == "rte" else []) \
        + shlex.split(flags)


def add_run_flags(a):
    """The flags of kill_anywhere.py and disk_full.py that say which runs."""
    a.add_argument("--tasks", default="rte,squad2", help="comma-separated: rte (with --predict), squad2")
    a.add_argument("--flags", default="", help='more train.py flags for every run, e.g. "--route gate-token"')
    a.add_argument("--work", help="folder for the fixtures and runs (default: a new temporary one)")
    a.add_argument("--nproc", type=int, default=1, help="processes under torchrun (gloo on the CPU); 1: plain python")


def run(cmd, out, log, stop_at=None, sig=None, nproc=1, rank=None):
    """train.py (under torchrun with nproc > 1); with stop_at, `sig` that many seconds after its start (under
    torchrun to torchrun and its workers, as Slurm signals a job's every process; to the worker of `rank` alone
    where one is given). (exit code, seconds)."""
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.Popen([*launcher(nproc), str(ROOT / "train.py"), *cmd, "--out", str(out)], stdout=f,
                             stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        workers = []
        if stop_at is not None:
            try:
                p.wait(timeout=stop_at)
            except subprocess.TimeoutExpired:
                if rank is None:
                    workers = send(p, sig, every=nproc > 1)[1:]
                else:  # to that worker alone (torchrun then ends the others), if it is running
                    with contextlib.suppress(LookupError, OSError):
                        os.kill(worker(p.pid, rank), sig)
        code = p.wait(timeout=600)
        for pid in workers:  # nothing of a stopped run may outlive it (torchrun killed by SIGKILL leaves them)
            for _ in range(600):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
    return code, time.time() - t0


def main():
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(a)
    a.add_argument("--kills", type=int, default=24, help="stopped runs per task, spread evenly over a whole run")
    a.add_argument("--signal", choices=[s.name for s in SIGNALS], help="only this signal (default: each in turn)")
    a.add_argument("--between", type=float, nargs=2, metavar=("FROM_S", "TO_S"),
                   help="spread the stops over these seconds of a run instead of the whole run (e.g. its start-up)")
    a.add_argument("--worker", type=int, metavar="RANK", help="under torchrun, the signal to this worker alone")
    a.add_argument("--out", default="kills.json", help="the results, JSON")
    args = a.parse_args()
    w, report, bad = workspace(args.work, "kills-"), [], 0
    for task in args.tasks.split(","):
        cmd = tiny_run(w, task, args.flags)
        ref = w / f"{task}-ref"
        shutil.rmtree(ref, ignore_errors=True)
        code, whole = run(cmd, ref, w / f"{task}-ref.log", nproc=args.nproc)
        assert code == 0, f"the reference run failed: {w}/{task}-ref.log"
        want = outputs(ref)
        for k in range(args.kills):
            start, end = args.between or (0.0, whole)
            at = start + (end - start) * (k + 0.5) / args.kills  # the middle of each k-th of the span
            sig = SIGNALS[k % len(SIGNALS)] if not args.signal else signal.Signals[args.signal]
            out, log = w / f"{task}-kill{k}", w / f"{task}-kill{k}.log"
            shutil.rmtree(out, ignore_errors=True)
            log.unlink(missing_ok=True)
            stopped, _ = run(cmd, out, log, at, sig, args.nproc, args.worker)
            said = log.read_text()
            # Stopped by the signal itself (SIGKILL, or SIGTERM/SIGINT before train.py's handler is set), by its
            # handler (130: "run the same command again"), or finished before the signal came (0). Ctrl-C while
            # Python imports torch, or runs torch's exit callbacks after the run, shows Python's own KeyboardInterrupt
            # traceback: no frame of it in a function of this project's files.
            python_own = sig == signal.SIGINT and "KeyboardInterrupt" in said and not re.search(
                rf'File "{re.escape(str(ROOT))}/[^"]+", line \d+, in (?!<module>)', said)
            ours = "Traceback" in said if args.nproc == 1 else f'File "{ROOT}/' in said  # torchrun has its own
            stop_ok = (stopped in (0, -sig, 130, 128 + sig) or args.nproc > 1) and (not ours or python_own)
            stopped_by = "stopped by SIG" in said  # inside training: a checkpoint saved at the stop, and said so
            resumed, _ = run(cmd, out, log, nproc=args.nproc)
            said = log.read_text()[len(said):]  # the rerun's own output: the row's traceback is there
            same = resumed == 0 and outputs(out) == want
            row = dict(task=task, at_s=round(at, 2), signal=sig.name, stopped_exit=stopped, resumed_exit=resumed,
                       stop_ok=stop_ok, checkpoint_at_stop=stopped_by, same=same, traceback="Traceback" in said)
            bad += not (stop_ok and same and not row["traceback"])
            report.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print(f"{len(report)} stopped runs, {bad} findings (a stop or rerun that failed, or other results); {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
