"""Mean and std over seeds of the runs in out/ (OUT/TASK-sN, OUT/TASK-shallow-sN, ...): python tools/summarize.py [out]"""
import glob
import json
import os
import re
import sys

import numpy as np
from scipy import stats


def cell(v, sign=""):  # mean ± std of one metric over seeds, x100 already; sign "+" for differences
    return f"{v.mean():{sign}.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:{sign}.1f}"


def gap(a, b):  # a - b paired by seed: mean ± std, and the paired t-test's p from 3 seeds up
    p = f" (p {stats.ttest_rel(a, b).pvalue:.2f})" if len(a) > 2 else ""
    return cell(a - b, "+") + p


root = sys.argv[1] if len(sys.argv) > 1 else "out"
runs = {}
for path in sorted(glob.glob(os.path.join(root, "*-s[0-9]*", "results.json"))):
    name = re.sub(r"-s\d+$", "", os.path.basename(os.path.dirname(path)))
    with open(path) as f:
        runs.setdefault(name, []).append(json.load(f))
if not runs:
    print(f"error: no runs under {root}/ (TASK-sN/results.json); pass the folder train.py wrote them to", file=sys.stderr)
    sys.exit(2)
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


def versus(suffix, who, title):
    """MoEBERT (OUT/TASK-sN) against the model of OUT/TASK{suffix}-sN (its results' `who`), over the seeds
    that ran both (they share that seed's teacher): a Markdown table."""
    rows = []
    for name, rs in runs.items():
        by_seed = {r["config"]["seed"]: r for r in rs}
        other = [r for r in runs.get(name + suffix, []) if r["config"]["seed"] in by_seed]
        if not other:
            continue
        paired = [by_seed[r["config"]["seed"]] for r in other]  # the MoEBERT run (and teacher) of each seed
        of = {"teacher": (paired, "teacher"), "moebert": (paired, "moebert"), "other": (other, who)}
        metrics = list(paired[0]["moebert"])
        score = {(k, m): 100 * np.array([r[key][m] for r in group]) for k, (group, key) in of.items() for m in metrics}
        col = {k: " / ".join(cell(score[k, m]) for m in metrics) for k in of}
        gaps = " / ".join(gap(score["moebert", m], score["other", m]) for m in metrics)
        seeds = ", ".join(str(r["config"]["seed"]) for r in paired)
        rows.append(f"| {name} ({' / '.join(metrics)}) | {seeds} | {col['teacher']} | {col['moebert']} | "
                    f"{col['other']} | {gaps} |")
    if rows:
        print(f"\n| task (metrics) | seeds | teacher | MoEBERT | {title} | MoEBERT − it |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


versus("-shallow", "shallow", "dense student, half the layers")  # the paper's claim: its Table 1
versus("-n1-e384-sh384", "moebert", "the FFN pruned to one expert")  # TASK-pruned-sN (glue_minilm.sh)
