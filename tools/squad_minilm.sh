#!/usr/bin/env bash
# The real SQuAD run of the README: MiniLM-L6-H384 on the real SQuAD 2.0 sample (and its v1.1 form),
# trained on its first two articles and evaluated on the third, on CPU.
#   MINILM=~/.cache/moebert/minilm SQUAD=../shared/data/squad bash tools/squad_minilm.sh [squad|squad2]...
# Teacher: lr 1e-4 for 5 epochs, as the README's GLUE runs with this small model (tools/glue_minilm.sh);
# MoEBERT: the paper's Table 7 for SQuAD (train.py's defaults). Writes out/<task>-sample/.
set -euo pipefail
cd "$(dirname "$0")/.."
MINILM=${MINILM:-$HOME/.cache/moebert/minilm}
SQUAD=${SQUAD:-../shared/data/squad}
python tools/squad_sample.py "$SQUAD" out/squad-sample-data
for task in ${*:-squad squad2}; do
  python train.py --task "$task" --bert "$MINILM" --data-dir out/squad-sample-data --seed 0 \
    --lr 1e-4 --teacher-epochs 5 --out "out/$task-sample"
done
