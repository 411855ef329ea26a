"""Resume on real data: MiniLM on real RTE (its first 512 examples, 2 teacher and 2 distillation
epochs, a checkpoint every 5 steps), killed with SIGKILL inside the teacher stage, then inside
distillation, then run to its end; its weights and dev metrics against a run never stopped.

    GLUE=/path/to/glue python tools/resume_real.py     (from the repo root; about 4 minutes on 2 cores)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

MINILM = os.environ.get("MINILM", os.path.expanduser("~/.cache/moebert/all-minilm-l6-v2"))
GLUE = os.environ["GLUE"]  # the folder that holds GLUE's RTE/
ARGS = ["--task", "rte", "--bert", MINILM, "--data-dir", f"{GLUE}/RTE", "--device", "cpu", "--lr", "1e-4",
        "--teacher-epochs", "2", "--distill-epochs", "2", "--max-train-examples", "512", "--max-seq-length", "128",
        "--save-every", "5", "--log-every", "10"]


def run(out, kill_in=None):
    """train.py into `out`; with kill_in, SIGKILL it 3 s after that stage's first checkpoint."""
    p = subprocess.Popen([sys.executable, "train.py", *ARGS, "--out", out], stdout=open(out + ".log", "a"),
                         stderr=subprocess.STDOUT)
    if kill_in is None:
        assert p.wait() == 0, f"see {out}.log"
        return
    ckpt = os.path.join(out, kill_in + ".partial", "checkpoint.safetensors")
    while not os.path.exists(ckpt):
        assert p.poll() is None, f"ended before a checkpoint of {kill_in}; see {out}.log"
        time.sleep(0.01)
    time.sleep(3)  # some steps past that checkpoint
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(out, kill_in)), f"{kill_in} finished before the kill"
    print(f"killed {out} inside {kill_in}", flush=True)


for old in ("out/real-ref", "out/real-kill"):  # fresh runs: nothing reused from an earlier check
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(old + ".log"):
        os.remove(old + ".log")
t0 = time.time()
run("out/real-ref")
t_ref, t0 = time.time() - t0, time.time()
run("out/real-kill", "teacher")
run("out/real-kill", "moebert")
run("out/real-kill")
t_kill = time.time() - t0
for stage in ("teacher", "moebert"):
    a, b = (load_file(f"out/{r}/{stage}/model.safetensors") for r in ("real-ref", "real-kill"))
    print(stage, "weights bitwise equal:", set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a))
ref, kill = (json.load(open(f"out/{r}/results.json")) for r in ("real-ref", "real-kill"))
print(f"dev, never stopped: teacher {ref['teacher']} moebert {ref['moebert']} ({t_ref:.0f}s)")
print(f"dev, killed twice:  teacher {kill['teacher']} moebert {kill['moebert']} ({t_kill:.0f}s in all)")
