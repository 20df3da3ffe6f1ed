#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool): trains the shipped teacher and the
# CE-only student reference with the project's loop, then measures stage one and stage two there.
# Locally, a dry run on CPU with tiny sizes checks every step:  DRY=1 bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/distill-out}; mkdir -p "$OUT"
W=${WORK:-/tmp/distill-work}; mkdir -p "$W"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; TEACHER_STEPS=3; STUDENT_STEPS=3; B1_ROWS=16; B1_BATCH=8; B2_STEPS=4; EXTRA="--eval-rows 16"
else
  DEVICE=cuda; TEACHER_STEPS=1500; STUDENT_STEPS=1500; B1_ROWS=2048; B1_BATCH=64; B2_STEPS=300; EXTRA=""
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi
log() { echo "[$(date +%T)] $*"; }

log prepare
$PY -m stages.cli prepare --input data/corpus/train.jsonl.gz --out "$W/tokens/train" | tail -1
$PY -m stages.cli prepare --input data/corpus/heldout.jsonl.gz --out "$W/tokens/heldout" | tail -1

for who in teacher student; do
  steps=$([ $who = teacher ] && echo $TEACHER_STEPS || echo $STUDENT_STEPS)
  log "train $who ($steps steps)"
  timeout 240 $PY -m stages.cli student --config data/configs/$who-train.yaml --train-store "$W/tokens/train" \
      --eval-store "$W/tokens/heldout" --out "$W/$who" --max-steps $steps --device $DEVICE $EXTRA 2>&1 \
      | tr '\r' '\n' | grep -v '^train:' | tail -25
  cp "$W/$who/metrics.json" "$W/$who/metrics.jsonl" "$W/$who/model/"
  cp "$W/$who/config.json" "$W/$who/model/training_config.json"  # config.json there is the HF model config
  # the tokenizer is data/tokenizer's; leaving it out keeps the archive under the 16 MB a file may bring back
  tar -C "$W/$who/model" -cf "$OUT/$who.tar" --exclude 'tokenizer*' .
  log "$who: $(cat $W/$who/metrics.json | tr -d '\n ')"
done

log "bench stage one"
timeout 150 $PY bench/stage_one.py --teacher "$W/teacher/model" --device $DEVICE --rows $B1_ROWS \
    --batch-size $B1_BATCH --out "$OUT/stage_one_gpu.json" 2>&1 | tr '\r' '\n' | grep -vE '^(teacher|prepare)' | tail -30
log "bench stage two"
timeout 200 $PY bench/stage_two.py --teacher "$W/teacher/model" --device $DEVICE --steps $B2_STEPS \
    --work "$W/b2" --out "$OUT/stage_two_gpu.json" 2>&1 | tr '\r' '\n' | grep -vE '^(teacher|prepare|train)' | tail -40
log done
