"""The real SQuAD sample as a train/dev pair: its first two articles to train, the third to evaluate.

    python tools/squad_sample.py $SQUAD_SAMPLES out/squad-sample   # the folder of the SQuAD 2.0 sample
writes out/squad-sample/{train,dev}-v1.1.json and {train,dev}-v2.0.json, the official files' names,
so train.py reads them with --data-dir out/squad-sample (tools/squad_minilm.sh runs both versions).
"""
import json
import os
import sys

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for version in ("1.1", "2.0"):
    with open(os.path.join(src, f"sample-v{version}.json"), encoding="utf-8") as f:
        sample = json.load(f)
    for split, articles in (("train", sample["data"][:2]), ("dev", sample["data"][2:])):
        with open(os.path.join(dst, f"{split}-v{version}.json"), "w", encoding="utf-8") as f:
            json.dump({"version": sample["version"], "data": articles}, f)
        n = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
        print(f"{split}-v{version}.json: {', '.join(a['title'] for a in articles)}; {n} questions")
