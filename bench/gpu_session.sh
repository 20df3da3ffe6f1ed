#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool), two parts, each written to $OUT as
# it finishes:
#   1. the quality benchmark (bench/quality.py): every teacher signal — CE, online, top-64 with
#      each tail mode, sampled N = 32 (the default) and 50, two hybrids, T = 2 for online and N = 32 — over
#      3 seeds with the shipped teacher, 300 steps each, several runs at once on the one GPU;
#   2. stage one and stage two at a realistic size (bench/realistic.py): a ~135M teacher and a ~23M
#      student at a 32k vocabulary, built from configs.
# zarr and its codecs are not on the machine's image: carry them as wheels in .whl (docs/BENCHMARKS.md).
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
log() { echo "[$(date +%T)] $*"; }
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; Q="--steps 3 --micro-batch-size 2 --seeds 0,1 --kl-rows 4 --parallel 2"; R="--tiny"; QT=900; RT=900
else
  DEVICE=cuda; Q="--steps 300 --seeds 0,1,2 --parallel 11"; R=""; QT=${QUALITY_TIMEOUT:-330}; RT=${REALISTIC_TIMEOUT:-200}
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi

log "quality benchmark"
timeout $QT $PY bench/quality.py --device $DEVICE $Q --work "$W/quality" --out "$OUT/quality_gpu.json" \
    --modes ce,online,topk-renorm,topk-tail,topk-residual-label,sampled-n32,sampled,hybrid-k4-m24,hybrid-k16-m32,online@t2,sampled-n32@t2 \
    2>&1 | grep -v "Loading weights" | tail -45
log "realistic size"
timeout $RT $PY bench/realistic.py --device $DEVICE $R --work "$W/realistic" --out-dir "$OUT" 2>&1 \
    | tr '\r' '\n' | grep -vE '^(teacher|prepare|train|Loading)' | tail -40
log done
