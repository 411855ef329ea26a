#!/usr/bin/env bash
# The whole GPU check in one command, under 9.5 minutes on one H100/H200, offline (timeout_s 590):
#   bash tools/gpu_check.sh                 # from the repo root, on the GPU machine
#   DRY_RUN=1 bash tools/gpu_check.sh       # on a CPU: every part, cut to seconds, to check the script
# It needs two git-ignored folders carried along (46 MB together):
#   gpu_carry/minilm  MiniLM in fp16 (python tools/minilm_fp16.py ~/.cache/moebert/all-minilm-l6-v2 gpu_carry/minilm)
#   gpu_carry/RTE     GLUE RTE's train.tsv and dev.tsv (0.9 MB)
#   gpu_carry/squad_eval  the official SQuAD evaluation scripts the tests fetch (cp -r ~/.cache/moebert/squad_eval)
# Everything lands in $OUT (default ./gpu_out): env.txt, pytest.txt, pytest.xml, pipeline.txt,
# rte/results.json + rte/log.jsonl, bench.txt + bench_cuda.json, gpu_util.csv, timings.txt; at the end
# all of them go into gpu_out.tar.gz, beside which only timings, pytest, pipeline, bench and
# bench_graphs.txt stay (6 files: at most 8 come back from the device machine).
# Parts: environment, prep, tests (the CUDA ones), bench, graphs, pipeline, rest (the other tests, as
# time allows). Each has its own timeout, cut further so that the whole stays within BUDGET seconds;
# a part that fails or times out does not stop the others.
# Knobs: BUDGET (default 560 s), TEACHER_EPOCHS (5), DISTILL_EPOCHS (the paper's: 10 for RTE),
# BENCH_ONLY (default "inference profile importance training checkpoint").
set -uo pipefail  # no -e: one failed part must not take the later ones with it
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: parts run from other folders too
BUDGET=${BUDGET:-560}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-5}
BENCH_ONLY=${BENCH_ONLY:-inference profile importance training checkpoint}
START=$SECONDS
PY=python
command -v python >/dev/null || PY=python3
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # models and caches: large, not worth sending back
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network here: fail fast, never hang
export MOEBERT_CACHE=$WORK/cache  # the tests' MiniLM goes here (prep), not into ~/.cache

if [ "${DRY_RUN:-0}" = 1 ]; then
  # CPU, a few examples, a fraction of an epoch: the same commands, in seconds.
  DEVICE=cpu
  PIPELINE_CUT="--max-train-examples 16 --max-eval-examples 16 --distill-epochs 0.5 --log-every 1"
  TEACHER_EPOCHS=0.5
  PYTEST_SELECT="bf16 and not minilm"
  REST_SELECT="truncation_rule"
  BENCH_CUT="--quick"
else
  DEVICE=cuda
  PIPELINE_CUT="--log-every 50${DISTILL_EPOCHS:+ --distill-epochs $DISTILL_EPOCHS}"
  # The CUDA tests first; the others pass in CI on CPU, and on the H200 the whole suite took 220 s:
  # they come last, as the budget allows (they caught two library-version differences there).
  PYTEST_SELECT="cuda or bf16 or grouped"
  REST_SELECT="not (cuda or bf16 or grouped or any_directory or pypi_release)"  # the last two need PyPI and pip install -e .
  # GPU timings are steady: 0.5 s per measurement is hundreds of batches; 2 alternating repeats.
  BENCH_CUT="--min-seconds 0.5 --repeats 2 --train-repeats 2 --profile-batch 1 32"
fi

left() { echo $((BUDGET - (SECONDS - START))); }

# part NAME CAP RESERVE: run the function NAME with a timeout of CAP seconds, less if fewer than
# CAP + RESERVE seconds of the budget are left (RESERVE: what the later parts need).
part() {
  local name=$1 cap=$2 reserve=$3
  local limit=$(($(left) - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 15)); then
    echo "$name: skipped, $(left)s of the budget left" | tee -a "$OUT/timings.txt"
    return
  fi
  echo "=== $name: timeout ${limit}s, $(left)s of the budget left ==="
  local t0=$SECONDS
  timeout -k 10 "$limit" bash -c "$name"  # timeout signals the whole process group: children too
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" TIMED OUT"
  echo "$name: rc $rc, $((SECONDS - t0))s of ${limit}s$note" | tee -a "$OUT/timings.txt"
}

# 1. env: the machine, the GPU, the packages; an install attempt only if something is missing.
env_info() {
  date -u; uname -a; echo "cores $(nproc)"; free -g; df -h . | tail -1
  nvidia-smi || echo "no nvidia-smi"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null
  $PY -c 'import sys; print("python", sys.version)'
  $PY -c 'import torch; c = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda,
    "available", c, torch.cuda.get_device_name() if c else "-", "bf16", c and torch.cuda.is_bf16_supported())'
  local missing
  missing=$($PY -c 'import importlib.util as u; print(" ".join(m for m in ["torch", "transformers", "tokenizers",
    "safetensors", "numpy", "pytest", "sklearn", "scipy"] if u.find_spec(m) is None))')
  if [ -n "$missing" ]; then
    echo "missing: $missing; trying pip (offline this fails: then we go on with what is there)"
    timeout 60 $PY -m pip install -q --retries 0 --timeout 10 -r requirements-dev.txt || echo "pip install failed"
  fi
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy|pytest|scikit-learn|scipy) '
}
environment() { env_info >"$OUT/env.txt" 2>&1; cat "$OUT/env.txt"; }

# 2. prep: the carried files, and an fp32 MiniLM for the tests. They hold our BERT and transformers'
# to 1e-5 on the same folder, and transformers loads an fp16 file as fp16: so an exact fp32 copy.
prep() {
  test -f gpu_carry/minilm/model.safetensors || { echo "gpu_carry/minilm is missing: carry it"; return 1; }
  test -f gpu_carry/RTE/train.tsv -a -f gpu_carry/RTE/dev.tsv || { echo "gpu_carry/RTE is missing: carry it"; return 1; }
  $PY tools/minilm_fp16.py gpu_carry/minilm "$MOEBERT_CACHE/all-minilm-l6-v2" --dtype fp32
  # The official SQuAD scripts the tests compare with come from PyPI wheels, out of reach there: carried.
  if [ -d gpu_carry/squad_eval ]; then cp -r gpu_carry/squad_eval "$MOEBERT_CACHE/"; else echo "no gpu_carry/squad_eval"; fi
}

# 3. tests: the CUDA ones (tests), and at the end the others (rest), each selected with pytest -k.
run_tests() {
  local name=$1 select=$2 rc
  $PY -m pytest -q -rfs -p no:cacheprovider --durations=15 --junitxml="$OUT/$name.xml" tests \
    -k "$select" >"$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 40 "$OUT/$name.txt"
  return $rc
}
tests() { run_tests pytest "$PYTEST_SELECT"; }
rest() { run_tests pytest_rest "$REST_SELECT"; }

# 4. the pipeline: MiniLM -> MoEBERT on real RTE in bf16, tools/glue_minilm.sh's recipe (teacher lr
# 1e-4 for 5 epochs, then train.py's defaults: the paper's Table 7 distillation for RTE).
pipeline() {
  local rc
  # shellcheck disable=SC2086  # $PIPELINE_CUT is a word list
  $PY train.py --task rte --bert gpu_carry/minilm --data-dir gpu_carry/RTE --seed 0 --lr 1e-4 \
    --teacher-epochs "$TEACHER_EPOCHS" --device "$DEVICE" --dtype bf16 --out "$RUN" $PIPELINE_CUT \
    >"$OUT/pipeline.txt" 2>&1
  rc=$?
  tail -n 25 "$OUT/pipeline.txt"
  return $rc
}

# 5. bench.py on the GPU (bf16 autocast), BERT-base sizes: about 175 s on the H200 at these settings.
bench() {
  local rc
  # shellcheck disable=SC2086  # word lists
  $PY bench.py --device "$DEVICE" $BENCH_CUT --only $BENCH_ONLY --out "$OUT/bench_cuda.json" >"$OUT/bench.txt" 2>&1
  rc=$?
  tail -n 30 "$OUT/bench.txt"
  return $rc
}

# 6. inference again, each forward replayed from a CUDA graph: the GPU's own time (a dense BERT-base
# waits on the host up to batch 32 in eager mode). On a CPU there are no graphs: the part is skipped.
graphs() {
  local rc
  [ "$DEVICE" = cuda ] || { echo "no CUDA graphs on $DEVICE"; return 0; }
  $PY bench.py --device cuda --only inference --cuda-graphs --min-seconds 0.3 --repeats 2 \
    --out "$OUT/bench_cuda_graphs.json" >"$OUT/bench_graphs.txt" 2>&1
  rc=$?
  tail -n 30 "$OUT/bench_graphs.txt"
  return $rc
}

RUN=$WORK/rte-s0
export OUT PY DEVICE RUN TEACHER_EPOCHS PIPELINE_CUT PYTEST_SELECT REST_SELECT BENCH_CUT BENCH_ONLY
export -f env_info environment prep run_tests tests rest pipeline bench graphs  # bash -c (under timeout) sees them

: >"$OUT/timings.txt"
echo "device $DEVICE, budget ${BUDGET}s, out $OUT" | tee -a "$OUT/timings.txt"
# GPU use every 5 s through the whole run: shows whether the small model leaves the GPU idle.
UTIL_PID=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 >"$OUT/gpu_util.csv" 2>&1 &
  UTIL_PID=$!
fi

# Caps: what each part may take at most; reserves: what the parts after it need (budget 560 s).
# Measured on the H200 (2026-11-28): pipeline 228 s, bench 175 s, the CUDA tests under a minute.
# The speed measurements go before the pipeline, whose accuracy that run has already shown.
part environment 60 500
part prep 60 480
part tests 90 450
part bench 200 250
part graphs 80 230
part pipeline 250 0
# Whatever the pipeline got to (log.jsonl is written as it goes), without the 90 MB models.
mkdir -p "$OUT/rte"
for f in results.json log.jsonl teacher/metrics.json teacher/settings.json moebert/metrics.json moebert/settings.json; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/rte/${f//\//_}"
done
part rest 600 0

[ -n "$UTIL_PID" ] && kill "$UTIL_PID" 2>/dev/null
echo "total: $((SECONDS - START))s" | tee -a "$OUT/timings.txt"
echo "--- timings"
cat "$OUT/timings.txt"
# At most 8 files come back from the device machine: all of them in one archive, the summaries beside it.
tar czf "$WORK/gpu_out.tar.gz" -C "$OUT" . && mv "$WORK/gpu_out.tar.gz" "$OUT/" &&
  find "$OUT" -mindepth 1 -type f ! -name gpu_out.tar.gz ! -name timings.txt ! -name pytest.txt \
    ! -name pipeline.txt ! -name bench.txt ! -name bench_graphs.txt -delete && find "$OUT" -mindepth 1 -type d -empty -delete
rm -rf "$WORK"
