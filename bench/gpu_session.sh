#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see the device tool), each part written to $OUT as it finishes.
#
# SESSION=fused (the default; issue #26), sized for 8 minutes on an H200 including set-up; the measurement first,
# so that a slow test step cannot cost it (stage one checks the kernels against torch as it loads them anyway):
#   1. stage one at a realistic size (bench/realistic.py --stage-one-only): a ~135M Llama teacher in bf16, a 32k
#      BPE vocabulary trained on the corpus (~1 min), 512 rows x 256 tokens = 131k tokens per run, batch 32;
#      per repeat a bare forward, then top-64 and sampled-32 each under torch, the fused kernels (native) and the
#      fused kernels with the copy stream (native+overlap), then a bare forward again; 3 repeats, medians.
#      Sized from the last H200 session (gpu_session_h200.log: tokenizer, 9 stage-one runs and stage two took
#      206 s): here 24 stage-one runs (6 variants x (3 repeats + a warm-up)) of 131k tokens at <= 2.2x a
#      ~3-6 us/token forward, each ~5 s with its set-up (weights hash, model load), and ~10 Triton compiles:
#      ~4 min. Writes $OUT/stage_one_<gpu>_fused.json (gpu: h200, h100, ...);
#   2. the fused kernels' tests compiled on the GPU, not interpreted (tests/pipeline/teacher/test_fused_gpu.py,
#      tests/stages/test_teacher_fused.py with the real copy stream): ~1-2 min, mostly Triton compiles of
#      ~40 small specialisations; writes $OUT/fused_tests_<gpu>.log.
#   Timeouts: 330 s and 120 s, set-up ~30 s: at worst the session ends within 8 minutes with what finished.
# SESSION=scale (issue #32; prepared, not yet run on a GPU), at most 8 minutes: bench/scale.py on a ~0.5B student
#   (Llama, 24 layers, hidden 1152, MLP 4608, 18 heads, the project's 8192-token vocabulary tied: 0.52B parameters)
#   at 2048 tokens, micro-batch 8 (16k tokens a step), bf16 autocast, sdpa: plain,
#   --gradient-checkpointing, and both with --compile; 3 warm-up and 8 timed steps each; tokens/s, MFU (model FLOPs
#   6N + 12·layers·hidden·seq per token over the card's dense bf16 peak; the recompute is not counted) and peak
#   memory per step. Each variant ~40 s (start, a 0.5B model built, steps) and ~60 s more to compile: ~3-4 min,
#   timeout 420 s. Writes $OUT/scale_<gpu>.json and .log.
# SESSION=curve (issue #34; prepared, not yet run on a GPU): bench/curve.py --scale gpu, a 50M student (Llama, 8 layers,
#   hidden 512, the teacher's 49,152-token vocabulary tied) and its project-tokenizer twin, CE and distilled from
#   SmolLM2-135M's sampled store over 12,800 rows x 512 tokens (6.6M tokens; 1200 steps of 32 rows read it 3 times:
#   ~20M training tokens), bf16, 3 seeds, 4 runs at once. Needs the teacher at $REAL_TEACHER (default
#   data/models/smollm2-135m, 540 MB: more than a device call carries, so a machine that has it or can run
#   `make real-teacher`). Writes $OUT/curve_<gpu>.json, .png and .log.
# SESSION=quality: the earlier session, the quality benchmark and both realistic stages.
# zarr and its codecs are not on the machine's image: carry them as wheels in .whl (zarr 3.1, numcodecs, donfig,
# google-crc32c, for the machine's Python), e.g.  pip download --only-binary=:all: --no-deps --python-version 3.X \
#   -d .whl zarr numcodecs donfig google-crc32c   ; pytest is optional (without it step 2 is skipped, said so).
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
SESSION=${SESSION:-fused}
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; GPU=cpu; Q="--steps 3 --micro-batch-size 2 --seeds 0,1 --kl-rows 4 --parallel 2"; R="--tiny"; QT=900; RT=900; TT=900
else
  DEVICE=cuda; Q="--steps 300 --seeds 0,1,2 --parallel 11"; R=""
  QT=${QUALITY_TIMEOUT:-330}; RT=${REALISTIC_TIMEOUT:-200}; TT=${TEST_TIMEOUT:-120}
  nvidia-smi --query-gpu=name,memory.total --format=csv
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed -E 's/^NVIDIA //; s/[^A-Za-z0-9]+.*$//' | tr 'A-Z' 'a-z')
fi
$PY -c "import torch, sys; import triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  || $PY -c "import torch; print('torch', torch.__version__, 'no triton')"

if [ "$SESSION" = scale ]; then
  if [ "${DRY:-0}" = 1 ]; then
    S="--layers 2 --hidden-size 64 --intermediate-size 128 --heads 2 --seq-len 128 --micro-batch-size 2 --steps 2 --warmup 1"
  else
    S="--layers 24 --hidden-size 1152 --intermediate-size 4608 --heads 18 --seq-len 2048 --micro-batch-size 8 --steps 8 --warmup 3"
  fi
  log "scale: a ~0.5B student at 2048 tokens, checkpointing off and on, compiled"
  timeout ${SCALE_TIMEOUT:-420} $PY bench/scale.py --device $DEVICE $([ $DEVICE = cuda ] && echo --dtype bfloat16) $S \
      --variants plain,checkpointing,checkpointing+compile --work "$W/scale" --out "$OUT/scale_${GPU}.json" 2>&1 \
      | tr '\r' '\n' | grep -vE '^(train|prepare|Loading)' | tail -15 | tee "$OUT/scale_${GPU}.log"
  log done
  exit 0
fi

if [ "$SESSION" = curve ]; then
  T=${REAL_TEACHER:-data/models/smollm2-135m}
  [ -f "$T/model.safetensors" ] || { echo "error: SESSION=curve needs SmolLM2-135M at REAL_TEACHER=$T (make real-teacher)" >&2; exit 2; }
  if [ "${DRY:-0}" = 1 ]; then
    C="--rows 16 --steps 4 --eval-every 2 --micro-batch-size 2 --seq-len 64 --seeds 0,1 --heldout-docs 4 --device cpu"
  else
    C="--scale gpu"
  fi
  log "curve: learning curves from the real teacher's store"
  timeout ${CURVE_TIMEOUT:-1500} $PY bench/curve.py --teacher "$T" $C --work "$W/curve" --out "$OUT/curve_${GPU}.json" \
      --figure "$OUT/curve_${GPU}.png" 2>&1 | tee "$OUT/curve_${GPU}.log" | tail -40
  log done
  exit 0
fi

if [ "$SESSION" = fused ]; then
  log "stage one, realistic size: torch, fused, fused + copy stream"
  timeout ${RT_FUSED:-330} $PY bench/realistic.py --device $DEVICE $R --stage-one-only --dtype bfloat16 --repeats 3 \
      --kernels torch,native,native+overlap --stores topk64,sampled32 --work "$W/realistic" --out-dir "$OUT" \
      --suffix "${GPU}_fused" 2>&1 | tr '\r' '\n' | grep -vE '^(teacher|prepare|train|Loading)' \
      | tee "$OUT/stage_one_${GPU}_fused.log" | tail -40
  grep -E "^distill:|not timed|Error" "$OUT/stage_one_${GPU}_fused.log" | head -5
  log "fused kernels' tests, compiled"
  if $PY -c "import pytest" 2>/dev/null; then
    timeout $TT $PY -m pytest -q -p no:cacheprovider -W ignore tests/pipeline/teacher/test_fused_gpu.py \
        tests/stages/test_teacher_fused.py 2>&1 | tail -25 | tee "$OUT/fused_tests_$GPU.log"
  else
    log "no pytest on this machine: the kernels are still checked against torch when stage one loads them"
  fi
  log done
  exit 0
fi

log "quality benchmark"
timeout $QT $PY bench/quality.py --device $DEVICE $Q --work "$W/quality" --out "$OUT/quality_gpu.json" \
    --modes ce,online,topk-renorm,topk-tail,topk-residual-label,sampled-n32,sampled,hybrid-k4-m24,hybrid-k16-m32,online@t2,sampled-n32@t2 \
    2>&1 | grep -v "Loading weights" | tail -45
log "realistic size"
timeout $RT $PY bench/realistic.py --device $DEVICE $R --work "$W/realistic" --out-dir "$OUT" 2>&1 \
    | tr '\r' '\n' | grep -vE '^(teacher|prepare|train|Loading)' | tail -40
log done
