"""Mean and std over seeds of the runs in out/ (OUT/TASK-sN, OUT/TASK-shallow-sN, ...): python tools/summarize.py [out]"""
import glob
import json
import os
import re
import sys

import numpy as np


def cell(v):  # mean ± std of one metric over seeds, x100 already
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


root = sys.argv[1] if len(sys.argv) > 1 else "out"
runs = {}
for path in sorted(glob.glob(os.path.join(root, "*-s[0-9]*", "results.json"))):
    name = re.sub(r"-s\d+$", "", os.path.basename(os.path.dirname(path)))
    with open(path) as f:
        runs.setdefault(name, []).append(json.load(f))
for name, rs in runs.items():
    for who in ("teacher", "moebert", "shallow"):  # shallow: the dense student of the same cost
        if who not in rs[0]:
            continue
        cells = []
        for metric in rs[0][who]:
            v = 100 * np.array([r[who][metric] for r in rs])
            cells.append(f"{metric} {cell(v)} ({', '.join(f'{x:.1f}' for x in v)})")
        print(f"{name:<16} {who:<8} n={len(rs)}  " + "  ".join(cells))
    secs = {k: np.mean([r["seconds"].get(k, 0) for r in rs]) for k in rs[0]["seconds"]}
    print(f"{'':<16} seconds  " + "  ".join(f"{k} {v:.0f}" for k, v in secs.items()))

# MoEBERT against the dense student of the same cost (the paper's claim), over the seeds that ran both
# (OUT/TASK-sN and OUT/TASK-shallow-sN share that seed's teacher): a Markdown table.
rows = []
for name, rs in runs.items():
    by_seed = {r["config"]["seed"]: r for r in rs}
    shallow = [r for r in runs.get(f"{name}-shallow", []) if r["config"]["seed"] in by_seed]
    if not shallow:
        continue
    paired = [by_seed[r["config"]["seed"]] for r in shallow]  # the MoEBERT run (and teacher) of each seed
    of = {"teacher": paired, "moebert": paired, "shallow": shallow}
    metrics = list(paired[0]["moebert"])
    score = {(who, m): 100 * np.array([r[who][m] for r in of[who]]) for who in of for m in metrics}
    col = {who: " / ".join(cell(score[who, m]) for m in metrics) for who in of}
    gap = " / ".join(f"{(score['moebert', m] - score['shallow', m]).mean():+.1f}" for m in metrics)
    seeds = ", ".join(str(r["config"]["seed"]) for r in paired)
    rows.append(f"| {name} ({' / '.join(metrics)}) | {seeds} | {col['teacher']} | {col['moebert']} | "
                f"{col['shallow']} | {gap} |")
if rows:
    print("\n| task (metrics) | seeds | teacher | MoEBERT | dense student, half the layers | MoEBERT − student |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
