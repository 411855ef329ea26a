#!/usr/bin/env bash
# second GPU run: the two failing tests with tracebacks, the tests not reached, then bench training/checkpoint
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MOEBERT_CACHE=/tmp/c2
python tools/minilm_fp16.py gpu_carry/minilm /tmp/c2/minilm --dtype fp32 >/dev/null; cp -r gpu_carry/squad_eval /tmp/c2/
timeout 120 python -m pytest -q -rfs -p no:cacheprovider --tb=short --durations=10 $(cat gpu_carry/ids.txt) > $OUT/pytest2.txt 2>&1; echo "pytest rc $?"
tail -60 $OUT/pytest2.txt | cut -c1-300
timeout 110 python bench.py --device cuda --min-seconds 0.5 --repeats 2 --train-repeats 2 --only training checkpoint --out $OUT/bench_train.json > $OUT/bench2.txt 2>&1; echo "bench rc $?"
tail -30 $OUT/bench2.txt
