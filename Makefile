# distill — one target per stage; inputs and outputs are make variables, so any stage runs on your data:
#   make prepare CORPUS=my.jsonl.gz TOKENS=runs/my/tokens
# Extra flags go to one kind of stage each, so `make demo TRAIN_ARGS=…` changes training alone:
#   PREPARE_ARGS (tokenizer, prepare), GENERATE_ARGS, TEACHER_ARGS, TRAIN_ARGS (student, student-ce, pretrain-*),
#   EVAL_ARGS, REPORT_ARGS.
# `make demo` runs the whole pipeline on the embedded default; `make test` runs the test suite.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
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

.PHONY: setup test test-faults test-slow slurm-deps slurm plan demo demo-fd tokenizer corpus eval-sets generate prepare prepare-heldout teacher student student-ce finetune \
        eval report pretrain-teacher pretrain-student bench bench-bytes bench-quality bench-cross sweep clean

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that the project's `torch>=` requirement installs nothing bigger
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

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

# ---- generate: the teacher writes a synthetic corpus (OUT/generated.jsonl, which prepare reads) ----
# from PROMPTS (JSONL with a "prompt" field, or text, one per line) or, without it, UNCONDITIONAL
# completions from BOS; RULES= a rule file (pipeline/rules.py) enforced while decoding
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
	$(DISTILL) student --train-store $(STORE) --eval-store $(EVAL_TOKENS) --model $(STUDENT_MODEL) \
		--alpha $(ALPHA) --temperature $(TEMPERATURE) --tail $(TAIL) --out $(STUDENT_OUT) --max-steps $(STEPS) \
		--resume auto $(TRAIN_ARGS)

# the same-size student without a teacher (alpha = 1), on the same rows
student-ce: setup
	$(DISTILL) student --train-store $(STORE) --eval-store $(EVAL_TOKENS) --model $(STUDENT_MODEL) \
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

# ---- before a cluster run: the store's size, stage-one GPU-hours and array size, stage two's cost ----
#   make plan PLAN_TOKENS=10B SEQ_LEN=2048 TEACHER=/models/llama-8b GPUS=64 TIME_LIMIT=04:00:00 \
#             PLAN_ARGS="--dtype bfloat16 --gpu-tflops 989 --student-params 1B"
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
bench-bytes: setup
	$(BIN)/python bench/store_bytes.py --teacher $(TEACHER) --rows 128 --out bench/results/store_bytes_cpu.json

# Which teacher signal recovers most of online distillation's gain over CE: each mode, 3 seeds,
# 300 steps (about an hour on 2 cores for these four; run it in the background). More modes, e.g.
# QUALITY_MODES=ce,online,topk-tail,topk-renorm,sampled-n32,hybrid-k4-m24,online@t2,sampled-n32@t2,
# take about 2.5 hours here; on a GPU all of them take minutes (bench/gpu_session.sh).
QUALITY_MODES ?= ce,online,topk-tail,sampled-n32
# cross-tokenizer distillation (issue #23): same-tokenizer vs data/tokenizer-4096 students from one
# sampled store, CE and each --cross-tokenizer mode over 3 seeds, held-out bits per byte. This size
# (100 steps of 8 rows of 128 tokens, 9 modes × 3 seeds) took 41 minutes on a shared 2-core CPU: it
# checks the path and measures the early gain, not the converged one. Run it in the background.
CROSS_STEPS ?= 100
CROSS_MODES ?= same-ce,same-kd,same-both,cross-ce,cross-exact,cross-chunk,cross-both,cross-exact-prefix,cross-both-prefix
bench-cross: setup
	$(BIN)/python bench/cross_tokenizer.py --teacher $(TEACHER) --steps $(CROSS_STEPS) --seeds 0,1,2 \
		--modes $(CROSS_MODES) --out bench/results/cross_tokenizer_cpu.json

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
# DEMO_ROWS rows of the train split, distilled students at T = 1 and T = 2 and a CE-only one on
# those rows, then all four models evaluated and compared in a report.
DEMO_ROWS ?= 512
DEMO_STEPS ?= 60
DEMO_LIMIT ?= 100
DEMO_TRAIN = STEPS=$(DEMO_STEPS) TRAIN_ARGS="--eval-every 30 --checkpoint-every 30 --warmup-steps 6 $(TRAIN_ARGS)"
DEMO_EVAL = TASKS=heldout,lambada,hellaswag,storycloze,agreement \
	EVAL_ARGS="--limit $(DEMO_LIMIT) --agreement $(RUN)/topk-heldout $(EVAL_ARGS)"
demo: setup
	$(MAKE) prepare prepare-heldout RUN=$(RUN)
	$(MAKE) teacher RUN=$(RUN) STORE=$(RUN)/store-t1 TEMPERATURE=1 MAX_ROWS=$(DEMO_ROWS)
	$(MAKE) teacher RUN=$(RUN) STORE=$(RUN)/store-t2 TEMPERATURE=2 MAX_ROWS=$(DEMO_ROWS)
	$(MAKE) teacher RUN=$(RUN) TOKENS=$(EVAL_TOKENS) STORE=$(RUN)/topk-heldout KIND=topk MAX_ROWS=128
	$(MAKE) student RUN=$(RUN) STORE=$(RUN)/store-t1 TEMPERATURE=1 STUDENT_OUT=$(RUN)/student-kd-t1 $(DEMO_TRAIN)
	$(MAKE) student RUN=$(RUN) STORE=$(RUN)/store-t2 TEMPERATURE=2 STUDENT_OUT=$(RUN)/student-kd-t2 $(DEMO_TRAIN)
	$(MAKE) student-ce RUN=$(RUN) STORE=$(RUN)/store-t1 $(DEMO_TRAIN)
	$(MAKE) eval RUN=$(RUN) MODEL=$(TEACHER) EVAL_OUT=$(RUN)/eval/1-teacher.json $(DEMO_EVAL)
	$(MAKE) eval RUN=$(RUN) MODEL=$(RUN)/student-kd-t1/model EVAL_OUT=$(RUN)/eval/2-student-kd-t1.json $(DEMO_EVAL)
	$(MAKE) eval RUN=$(RUN) MODEL=$(RUN)/student-kd-t2/model EVAL_OUT=$(RUN)/eval/3-student-kd-t2.json $(DEMO_EVAL)
	$(MAKE) eval RUN=$(RUN) MODEL=$(CE_OUT)/model EVAL_OUT=$(RUN)/eval/4-student-ce.json $(DEMO_EVAL)
	$(MAKE) report RUN=$(RUN) RUNS="$(addprefix $(RUN)/eval/,1-teacher.json 2-student-kd-t1.json 3-student-kd-t2.json 4-student-ce.json)"
	@echo
	@echo "demo done, everything under $(RUN)/:"
	@echo "  tokens stores      $(TOKENS), $(EVAL_TOKENS)"
	@echo "  teacher stores     $(RUN)/store-t1, $(RUN)/store-t2 (drawn at T = 1, 2; .venv/bin/distill inspect DIR)"
	@echo "  students           $(RUN)/student-kd-t1/model, $(RUN)/student-kd-t2/model, $(CE_OUT)/model"
	@echo "  evaluations        $(RUN)/eval/*.json"
	@echo "  report             $(REPORT)/report.md (table) and $(REPORT)/*.png (figures)"

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
