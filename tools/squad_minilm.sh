#!/usr/bin/env bash
# The real SQuAD run of RESULTS.md: MiniLM-L6-H384 on the real SQuAD 2.0 sample (and its v1.1 form),
# trained on its first two articles and evaluated on the third, on CPU.
#   SQUAD=/path/to/sample bash tools/squad_minilm.sh [squad|squad2]...
# SQUAD (required): a folder holding sample-v1.1.json and sample-v2.0.json, the first 3 articles
# (Normans, Computational_complexity_theory, Southern_California) of dev-v1.1.json and dev-v2.0.json.
# MINILM: any MiniLM folder; default ~/.cache/moebert/all-minilm-l6-v2 (`train.py --bert all-minilm-l6-v2` fills it).
# Teacher: lr 1e-4 for 5 epochs, as the GLUE runs of RESULTS.md with this small model (tools/glue_minilm.sh);
# MoEBERT: the paper's Table 7 for SQuAD (train.py's defaults). Writes out/<task>-sample/.
set -euo pipefail
cd "$(dirname "$0")/.."
MINILM=${MINILM:-$HOME/.cache/moebert/all-minilm-l6-v2}
: "${SQUAD:?set SQUAD to the folder holding sample-v1.1.json and sample-v2.0.json (the first 3 articles of SQuAD dev)}"
python tools/squad_sample.py "$SQUAD" out/squad-sample-data
for task in ${*:-squad squad2}; do
  python train.py --task "$task" --bert "$MINILM" --data-dir out/squad-sample-data --seed 0 \
    --lr 1e-4 --teacher-epochs 5 --out "out/$task-sample"
done
