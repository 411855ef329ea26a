#!/usr/bin/env bash
# The real runs of RESULTS.md: MiniLM-L6-H384 (a real uncased BERT from PyPI) on GLUE, on CPU.
#   GLUE=/path/to/glue bash tools/glue_minilm.sh [STEP...]
# GLUE (required): the folder holding the task folders RTE/, MRPC/, STS-B/, CoLA/, SST-2/ (train.tsv, dev.tsv).
# STEP: seed0|seed1|seed2 (rte mrpc stsb cola), ablation (STS-B, 3 seeds), ablationN, routesN (after
# stsb-sN: STS-B with the other three routes, reusing that seed's teacher), balanceN (the two gate
# routes again with Switch Transformer's load-balance weight 0.01), heavyN (the same at 0.1 and 1), sst2, sst2-short
# (1 teacher epoch, 1 distillation epoch: what fits in an hour of CPU; sst2-short-sN for seed N), TASK-sN,
# sizesN (after stsb-sN: one, 2 and 8 experts of 384, and 4 sharing no neuron), prunedN (the first of them:
# the FFN pruned by importance to 384 neurons), TASK-pruned-sN (the same after TASK-sN), TASK-shallow-sN (after
# TASK-sN: the 3-layer dense student of the same cost per token, distilled from that run's teacher),
# sst2-short-shallow-sN and sst2-short-pruned-sN (the same, short schedule).
# MINILM: any MiniLM folder (config.json, model.safetensors, vocab.txt); default
# ~/.cache/moebert/all-minilm-l6-v2, which any run of `train.py --bert all-minilm-l6-v2` fills.
# Teacher: lr 1e-4 for 5 epochs (the standard 2e-5 x 3 leaves this small model near chance on RTE);
# MoEBERT: the paper's Table 7 for each task. Each run writes out/<task>-s<seed>/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MINILM=${MINILM:-$HOME/.cache/moebert/all-minilm-l6-v2}
: "${GLUE:?set GLUE to the folder holding the GLUE task folders (RTE, MRPC, STS-B, CoLA, SST-2)}"
declare -A DIR=([rte]=RTE [mrpc]=MRPC [stsb]=STS-B [cola]=CoLA [sst2]=SST-2)
SHORT=(--teacher-epochs 1 --distill-epochs 1)  # SST-2 on a CPU-sized schedule (sst2-short...)
PRUNED="1 384 384"  # experts, expert dim, shared dim: one expert of 384, all shared = the FFN pruned by importance

run() {  # run TASK SEED [extra flags...]
  local task=$1 seed=$2; shift 2
  python train.py --task "$task" --bert "$MINILM" --data-dir "$GLUE/${DIR[$task]}" --seed "$seed" \
    --lr 1e-4 --teacher-epochs 5 --out "out/$task-s$seed" "$@"
}

ablate() {  # ablate TASK SEED: random split and no distillation, reusing that seed's teacher
  local task=$1 seed=$2 teacher=out/$1-s$2/teacher
  run "$task" "$seed" --teacher "$teacher" --split random --out "out/$task-random-s$seed"
  run "$task" "$seed" --teacher "$teacher" --distill-lambda 0 --out "out/$task-nodistill-s$seed"
}

sized() {  # sized TASK SEED EXPERTS EXPERT_DIM SHARED: other expert sizes, reusing TASK-sSEED's teacher
  run "$1" "$2" --teacher "out/$1-s$2/teacher" --num-experts "$3" --expert-dim "$4" --shared-dim "$5" \
    --out "out/$1-n$3-e$4-sh$5-s$2"
}

steps=${*:-"seed0 seed1 seed2 ablation sst2"}
for step in $steps; do
  case $step in
    seed0|seed1|seed2) for task in rte mrpc stsb cola; do run "$task" "${step#seed}"; done ;;
    ablation) for seed in 0 1 2; do ablate stsb "$seed"; done ;;  # STS-B: 1500 dev pairs, least noisy
    sst2) run sst2 0 ;;
    sst2-short|sst2-short-s[0-9]) s=${step#sst2-short}; s=${s#-s}; s=${s:-0}  # CPU-sized; seed 0 unless named
      run sst2 "$s" "${SHORT[@]}" --out "out/sst2-short-s$s" ;;
    sst2-short-shallow-s[0-9]) s=${step##*-s}  # the 3-layer student of sst2-short-sN's teacher, 1 epoch
      run sst2 "$s" "${SHORT[@]}" --teacher "out/sst2-short-s$s/teacher" --student shallow \
        --out "out/sst2-short-shallow-s$s" ;;
    sst2-short-pruned-s[0-9]) s=${step##*-s}  # the FFN pruned to 384 neurons from sst2-short-sN's teacher, 1 epoch
      run sst2 "$s" "${SHORT[@]}" --teacher "out/sst2-short-s$s/teacher" --num-experts 1 --expert-dim 384 \
        --shared-dim 384 --out "out/sst2-short-n1-e384-sh384-s$s" ;;
    ablation[0-9]) ablate stsb "${step#ablation}" ;;       # one seed of the ablation
    routes[0-9]) s=${step#routes}  # the paper's other routes (section 3.4) on STS-B, seed s's teacher
      for route in hash-balance gate-token gate-sentence; do
        run stsb "$s" --teacher "out/stsb-s$s/teacher" --route "$route" --out "out/stsb-$route-s$s"
      done ;;
    balance[0-9]) s=${step#balance}  # the gates with a load-balance loss (the default weight is 0, as the official code's)
      for route in gate-token gate-sentence; do
        run stsb "$s" --teacher "out/stsb-s$s/teacher" --route "$route" --balance-weight 0.01 \
          --out "out/stsb-$route-balanced-s$s"
      done ;;
    heavy[0-9]) s=${step#heavy}  # the gates with 10 and 100 times that weight: does a heavier one stop the collapse?
      for w in 0.1 1; do
        for route in gate-token gate-sentence; do
          run stsb "$s" --teacher "out/stsb-s$s/teacher" --route "$route" --balance-weight "$w" \
            --out "out/stsb-$route-balance$w-s$s"
        done
      done ;;
    pruned[0-9]) sized stsb "${step#pruned}" $PRUNED ;;  # after stsb-sN: the FFN pruned by importance to 384 neurons
    *-pruned-s[0-9]) sized "${step%-pruned-s*}" "${step##*-s}" $PRUNED ;;  # the same after TASK-sN
    sizes[0-9]) s=${step#sizes}  # one expert of 384 (the pruned FFN), 2 and 8 of 384 (256 shared), 4 sharing nothing
      for v in "$PRUNED" "2 384 256" "8 384 256" "4 384 0"; do sized stsb "$s" $v; done ;;
    *-shallow-s[0-9]) t=${step%-shallow-s*} s=${step##*-s}  # the 3-layer dense student of TASK-sN's teacher
      run "$t" "$s" --teacher "out/$t-s$s/teacher" --student shallow --out "out/$t-shallow-s$s" ;;
    *-s[0-9]) run "${step%-s*}" "${step##*-s}" ;;          # one run, e.g. mrpc-s1
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
