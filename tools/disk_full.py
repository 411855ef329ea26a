"""A disk that fills at any moment of a run, for real: train.py's --out on a tmpfs of its own, which a file fills
to the last byte at a moment spread evenly over the run (from the moment --out appears to its last write), so
that the next write of the run, whichever it is, meets a full disk. Each run must finish as the run never
stopped, or stop with one `error:` line that names the file and says the disk is full (exit 2, no traceback);
then, with the space back, the same command must end as a run never stopped: the same dev scores, every model,
importance and prediction file bitwise, and log.jsonl one JSON record a line. The tests fill the disk by
stand-ins; here every write meets it.

    python tools/disk_full.py                           # RTE with --predict and SQuAD v2.0, 24 moments each, ~8 min
    python tools/disk_full.py --tasks rte --points 8 --flags "--student shallow" --out disk.json
    python tools/disk_full.py --nproc 2                 # under torchrun: the master's write meets it, the other
                                                        # process ends with it (a traceback of torchrun's own is none)

Linux, as root (it mounts the tmpfs).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]

from kill_anywhere import add_run_flags, launcher, outputs, tiny_run  # noqa: E402
from sweep_inputs import workspace  # noqa: E402

FULL = re.compile(r"error: cannot write /\S+: the disk is full")  # the one line a run stopped by it ends with


def train(cmd, out, fill_at=None, disk=None, nproc=1):
    """train.py with cmd into out (under torchrun with nproc > 1), from an empty working folder; with fill_at, the
    disk filled that many seconds after --out appears. (exit code, stderr, seconds from --out's appearance to its
    last write)."""
    p = subprocess.Popen([*launcher(nproc), str(ROOT / "train.py"), *cmd, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
    while not out.exists() and p.poll() is None:
        time.sleep(0.001)
    t0 = time.time()
    if fill_at is not None:
        try:
            p.wait(timeout=fill_at)
        except subprocess.TimeoutExpired:
            fill(disk)
    err = p.communicate(timeout=1800)[1]
    last = max((f.stat().st_mtime for f in out.rglob("*") if f.is_file()), default=t0)  # its last write
    return p.returncode, err, last - t0


def fill(disk):
    """Take every free byte of the disk (again, if the run took some meanwhile)."""
    for k in range(10):
        st = os.statvfs(disk)
        room = st.f_bavail * st.f_frsize
        if room == 0 or subprocess.run(["fallocate", "-l", str(room), str(disk / f"filler{k}")],
                                       capture_output=True).returncode == 0:
            return


def whole_lines(path):
    """Whether every line of the file (if there is one) is a JSON object."""
    try:
        return all(isinstance(json.loads(line), dict) for line in path.read_text().splitlines())
    except FileNotFoundError:
        return True
    except ValueError:
        return False


def main():
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(a)
    a.add_argument("--points", type=int, default=24, help="moments per task at which the disk fills, spread evenly")
    a.add_argument("--out", default="disk.json", help="the results, JSON")
    args = a.parse_args()
    if os.geteuid() != 0:
        sys.exit("disk_full.py mounts a tmpfs: run it as root")
    w, report, bad = workspace(args.work, "disk-"), [], 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the tmpfs unmounted then too
    disk = Path(tempfile.mkdtemp(prefix="disk-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    try:
        for task in args.tasks.split(","):
            cmd = tiny_run(w, task, args.flags)
            code, said, whole = train(cmd, disk / "ref", nproc=args.nproc)  # there: the time a run takes on it
            assert code == 0, f"the reference run failed:\n{said}"
            want = outputs(disk / "ref")
            for k in range(args.points):
                at = whole * k / (args.points - 1)  # the first as --out appears, the last at the run's end
                for p in disk.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                out = disk / "out"
                stopped, said, _ = train(cmd, out, at, disk, args.nproc)
                errors = [line for line in said.splitlines() if line.startswith("error: ")]
                ours = f'File "{ROOT}/' in said if args.nproc > 1 else "Traceback" in said  # torchrun has its own
                refused = 2 if args.nproc == 1 else 1  # torchrun's status when a process failed
                stop_ok = not ours and ((stopped == 0 and outputs(out) == want) or (
                    stopped == refused and len(errors) == 1 and FULL.match(errors[0]) is not None))
                for p in disk.glob("filler*"):  # the space back, then the same command
                    p.unlink()
                resumed, again, _ = train(cmd, out, nproc=args.nproc)
                same = resumed == 0 and outputs(out) == want and "Traceback" not in again and \
                    whole_lines(out / "log.jsonl")
                row = dict(task=task, at_s=round(at, 2), stopped_exit=stopped, said=(errors or [""])[-1][:300],
                           stop_ok=stop_ok, resumed_exit=resumed, same=same)
                bad += not (stop_ok and same)
                report.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    finally:
        subprocess.run(["umount", str(disk)])
        disk.rmdir()
    print(f"{len(report)} runs on a disk that filled, {bad} findings (a traceback, another error, a rerun that failed "
          f"or other results); {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
