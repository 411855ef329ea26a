"""The GPU check of fast.py, one command for a lent GPU (about 3-5 minutes with its set-up):

    python3 tools/gpu_fast.py                  # CUDA, BERT-base sizes, bf16; files in $OUT (default gpu_out)
    python3 tools/gpu_fast.py --dry-run        # CPU, a small config, fp32: the same steps in seconds

Parts, each adding to $OUT/gpu_fast.json as it ends (a part that fails is recorded with its error, and
the next one runs): the environment (torch, the GPU, its compute
capability); the models built (whether the grouped matmul runs on the device; if they fail to build,
only the tests run after); correctness (the fast path, eager and
graphed, against the readable model in fp32, a graph replayed on new inputs, no read-back to the host,
one sort a forward); then dense BERT, the quarter-FFN model (the cap: MoEBERT with free routing) and
MoEBERT hash-random, each eager and graphed, at batch 1, 32 and 128, sequence 128: CUDA-event timing,
the models alternating, the median of the repeats. Targets (graphed): MoEBERT >= 1.0x dense at batch
1, >= 1.35x at 32, >= 1.6x at 128; >= 90% of the cap from batch 32. Then the kernels one eager forward
of each launches at batch 32 (torch.profiler: how many, and which take the time). Last, the CUDA tests
of fast.py and the experts (pytest, its output in $OUT/pytest.txt).
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import torch  # noqa: E402

import bench  # noqa: E402
from bert import BertConfig  # noqa: E402
from fast import FastInference, Reads  # noqa: E402
from runtime import COUNT  # noqa: E402

TARGETS = {1: 1.0, 32: 1.35, 128: 1.6}  # MoEBERT's speed-up over dense, graphed, by batch
CAP_SHARE = 0.9  # of the quarter-FFN model's speed, from batch 32


def events_ms(fn, device, repeats):
    """Milliseconds a call, per repeat (CUDA events on a GPU, the wall clock on a CPU)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, a small config, fp32: check the script")
    p.add_argument("--repeats", type=COUNT, default=5, help="alternating repeats of every model (the median)")
    args = p.parse_args()
    out_dir = os.environ.get("OUT") or "gpu_out"  # the device machine sets OUT: what lands there comes back
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "gpu_fast.json")
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    cfg = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512) if dry \
        else BertConfig()
    batches, T, calls = ((1, 4), 32, 3) if dry else ((1, 32, 128), 128, 20)
    report = {"dry_run": dry}

    def save(part, value):
        report[part] = value
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(part, json.dumps(value), flush=True)

    def guarded(part, fn):
        """fn(), or its error recorded under `part`: one broken part must not cost the others."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (any failure is a finding to report)
            save(part, {"error": f"{type(e).__name__}: {e}"[:2000]})

    save("environment", {"torch": torch.__version__, "python": platform.python_version(),
                         "device": torch.cuda.get_device_name(device) if not dry else platform.processor(),
                         "capability": list(torch.cuda.get_device_capability(device)) if not dry else None,
                         "dtype": str(dtype)})
    built = guarded("models", lambda: build(cfg, device, dtype, save))
    if built:  # else the error is recorded, and the tests still run
        models, fast = built
        guarded("correctness", lambda: correctness(models["hash-random"], fast["hash-random"].grouped, cfg, T,
                                                   dtype, device, dry, save))
        speed = {}
        for B in batches:
            guarded("speed", lambda: timings(models, fast, cfg, B, T, calls, dtype, device, dry, args.repeats,
                                             speed, save))
        guarded("kernels", lambda: kernels(fast, cfg, batches[1], T, device, save))
    guarded("pytest", lambda: cuda_tests(out_dir, save))  # on a CPU they skip, but for the grouped ones
    print(f"results in {out}")


def build(cfg, device, dtype, save):
    """The readable models (dense, quarter-FFN, MoEBERT hash-random; random weights) and their fast paths,
    MoEBERT's every-expert fallback beside its grouped path where that runs on the device."""
    models, _ = bench.inference_models(cfg, device, ["dense", "quarter-FFN", "hash-random"], 6)
    fast = {name: FastInference(m, dtype=dtype, graphs=False) for name, m in models.items()}
    if fast["hash-random"].grouped:  # the fallback too, to compare: every expert on every token
        fast["hash-random every-expert"] = FastInference(models["hash-random"], dtype=dtype, grouped=False,
                                                         graphs=False)
    save("models", {"timed": list(fast), "grouped_on_device": fast["hash-random"].grouped})
    return models, fast


def correctness(moe, grouped, cfg, T, dtype, device, dry, save):
    """The fast path (eager, then graphed on inputs it was not captured with) against the readable
    model in fp32, its biases and LayerNorms jittered; no read-back and one sort in a forward."""
    checks = {}
    moe = bench.jitter(copy.deepcopy(moe))
    fast = FastInference(moe, dtype=dtype, grouped=grouped, graphs=False)
    graphed = FastInference(moe, dtype=dtype, grouped=grouped, graphs=not dry)
    for seed in range(3):
        b = bench.random_batch(cfg, 8, T - 7 * seed, device)
        b["attention_mask"][1:, T - 7 * seed - 5:] = 0  # padding in all but the first row
        inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
        with torch.no_grad():
            ref = moe(*inputs).logits.float()
        scale = ref.abs().max().item()
        for name, run in (("eager", fast), ("graphed", graphed)):
            diff = (run(*inputs).float() - ref).abs().max().item() / scale
            checks.setdefault(f"{name}_max_diff_relative", []).append(round(diff, 5))
    with Reads() as r:
        fast(*inputs)
    checks.update(reads_in_a_forward=r.reads, sorts_in_a_forward=r.sorts,
                  ok=max(checks["eager_max_diff_relative"] + checks["graphed_max_diff_relative"]) < 0.05
                  and not r.reads and r.sorts == int(fast.grouped))
    save("correctness", checks)


def timings(models, fast, cfg, B, T, calls, dtype, device, dry, repeats, speed, save):
    """Every model eager and graphed at batch B, alternating, the median of the repeats."""
    b = bench.random_batch(cfg, B, T, device)
    inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
    runs = {}
    for name, run in fast.items():
        runs[f"{name} eager"] = run
        if not dry:
            runs[f"{name} graphed"] = FastInference(models[name.split()[0]], dtype=dtype, graphs=True,
                                                    grouped=run.grouped)
    row = {"ms": {}, "ms_each": {}}
    for k, run in list(runs.items()):
        try:
            run(*inputs)  # warm-up, and the graph's capture
        except Exception as e:  # noqa: BLE001 (the others are still timed)
            row.setdefault("errors", {})[k] = f"{type(e).__name__}: {e}"[:1000]
            del runs[k]
    ms = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            ms[k].append(events_ms(lambda: run(*inputs), device, calls))
    row["ms"] = med = {k: round(statistics.median(v), 3) for k, v in ms.items()}
    row["ms_each"] = ms
    for mode in ("eager",) if dry else ("eager", "graphed"):
        if all(f"{m} {mode}" in med for m in ("dense", "quarter-FFN", "hash-random")):
            row[f"moebert_over_dense_{mode}"] = round(med[f"dense {mode}"] / med[f"hash-random {mode}"], 3)
            row[f"share_of_cap_{mode}"] = round(med[f"quarter-FFN {mode}"] / med[f"hash-random {mode}"], 3)
    if "moebert_over_dense_graphed" in row:
        row["target_met"] = row["moebert_over_dense_graphed"] >= TARGETS[B] and (
            B < 32 or row["share_of_cap_graphed"] >= CAP_SHARE)
    speed[f"batch {B}"] = row
    save("speed", speed)


def kernels(fast, cfg, B, T, device, save):
    """What one eager forward of each model launches at batch B: the GPU's kernels (torch.profiler; on
    a CPU, the ops that write memory, fast.Reads), their number, and the 10 that take the most time
    (on a CPU: the most frequent), with launches and microseconds."""
    from torch.profiler import ProfilerActivity, profile
    b = bench.random_batch(cfg, B, T, device)
    inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
    found = {}
    for name, run in fast.items():
        run(*inputs)  # warm-up
        by_name = {}
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(*inputs)
                torch.cuda.synchronize()
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    n_us = by_name.setdefault(e.name[:120], [0, 0.0])
                    n_us[0] += 1
                    n_us[1] += e.time_range.elapsed_us()
        else:
            with Reads() as r:
                run(*inputs)
            by_name = {k: [n, 0.0] for k, n in r.writes.items()}
        top = sorted(by_name.items(), key=lambda kv: (-kv[1][1], -kv[1][0]))[:10]
        found[name] = {"launches": sum(v[0] for v in by_name.values()),
                       "us": round(sum(v[1] for v in by_name.values()), 1),
                       "top": [[k, v[0], round(v[1], 1)] for k, v in top]}
    save("kernels", {"batch": B, "length": T, "models": found})


def cuda_tests(out_dir, save):
    """The CUDA tests of fast.py and the experts (graph replay against eager, the grouped path)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fast.py",
           "tests/test_moebert.py", "-k", "cuda or grouped"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    with open(os.path.join(out_dir, "pytest.txt"), "w") as f:
        f.write(done.stdout + done.stderr)
    lines = (done.stdout.strip() or done.stderr.strip() or "(no output)").splitlines()
    save("pytest", {"returncode": done.returncode, "summary": lines[-1], "seconds": round(time.perf_counter() - t0)})


if __name__ == "__main__":
    main()
