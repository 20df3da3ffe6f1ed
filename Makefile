# distill — one target per stage; inputs and outputs are make variables, so any stage runs on your data:
#   make prepare CORPUS=my.jsonl.gz TOKENS=runs/my/tokens
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
TOPK        ?= $(RUN)/topk
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
ARGS        ?=

.PHONY: setup test test-slow demo tokenizer corpus prepare prepare-heldout teacher student student-ce eval report \
        pretrain-teacher pretrain-student bench clean

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

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# ---- the embedded default data (already in git; these rebuild it) ----
corpus:
	$(PYTHON) scripts/build_corpus.py --src ../shared/corpora --out data/corpus

tokenizer: setup
	$(DISTILL) tokenizer --input $(CORPUS) --vocab-size 8192 --out $(TOKENIZER) $(ARGS)

# ---- stage 0: corpus -> tokens store ----
prepare: setup
	$(DISTILL) prepare --input $(CORPUS) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) --backend $(BACKEND) --out $(TOKENS) $(ARGS)

prepare-heldout: setup
	$(DISTILL) prepare --input $(HELDOUT) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) --backend $(BACKEND) --out $(EVAL_TOKENS) $(ARGS)

# ---- stage one: teacher once over the tokens -> topk store ----
teacher: setup
	$(DISTILL) teacher --tokens-store $(TOKENS) --teacher $(TEACHER) --out $(TOPK) --top-k $(TOP_K) \
		--temperature $(TEMPERATURE) $(GRID) --backend $(BACKEND) --max-rows $(MAX_ROWS) $(ARGS)

# ---- stage two: student from the topk store (no teacher in memory) ----
student: setup
	$(DISTILL) student --train-store $(TOPK) --eval-store $(EVAL_TOKENS) --model $(STUDENT_MODEL) \
		--alpha $(ALPHA) --temperature $(TEMPERATURE) --tail $(TAIL) --out $(STUDENT_OUT) --max-steps $(STEPS) \
		--resume auto $(ARGS)

# the same-size student without a teacher (alpha = 1), on the same rows
student-ce: setup
	$(DISTILL) student --train-store $(TOPK) --eval-store $(EVAL_TOKENS) --model $(STUDENT_MODEL) \
		--alpha 1 --out $(CE_OUT) --max-steps $(STEPS) --resume auto $(ARGS)

# The shipped teacher and the CE-only student reference (a lent H100 took ~1.5 min each; a 2-core
# CPU takes hours: rerun to resume from the newest checkpoint).
pretrain-teacher: setup
	$(MAKE) prepare prepare-heldout RUN=runs
	$(DISTILL) student --config data/configs/teacher-train.yaml --resume auto $(ARGS)

pretrain-student: setup
	$(MAKE) prepare prepare-heldout RUN=runs
	$(DISTILL) student --config data/configs/student-train.yaml --resume auto $(ARGS)

eval report:
	@echo "make $@: evaluation and the report are not built yet (the next issue); the pipeline today is prepare -> teacher -> student" >&2
	@exit 2

# Speed and size: results in bench/results/*.json, summarised in docs/BENCHMARKS.md.
bench: setup
	$(BIN)/python bench/stage_one.py --teacher $(TEACHER) --rows 64 --repeats 3 --out bench/results/stage_one_cpu.json
	$(BIN)/python bench/stage_two.py --teacher $(TEACHER) --steps 30 --out bench/results/stage_two_cpu.json

# The whole pipeline on the embedded default, on CPU in a few minutes: stage one over the first
# DEMO_ROWS rows of the train split, then a distilled student and a CE-only one on those rows.
DEMO_ROWS ?= 1024
DEMO_STEPS ?= 60
demo: setup
	$(MAKE) prepare prepare-heldout RUN=$(RUN)
	$(MAKE) teacher RUN=$(RUN) MAX_ROWS=$(DEMO_ROWS)
	$(MAKE) student RUN=$(RUN) STEPS=$(DEMO_STEPS) ARGS="--eval-every 20 --checkpoint-every 20 --warmup-steps 6 $(ARGS)"
	$(MAKE) student-ce RUN=$(RUN) STEPS=$(DEMO_STEPS) ARGS="--eval-every 20 --checkpoint-every 20 --warmup-steps 6 $(ARGS)"
	@echo
	@echo "demo done, everything under $(RUN)/:"
	@echo "  tokens stores      $(TOKENS), $(EVAL_TOKENS)"
	@echo "  teacher top-k      $(TOPK)        (.venv/bin/distill inspect $(TOPK))"
	@echo "  distilled student  $(STUDENT_OUT)/model   held-out: $$(cat $(STUDENT_OUT)/metrics.json | tr -d '\n ' | grep -o '"heldout_loss":[0-9.]*')"
	@echo "  CE-only student    $(CE_OUT)/model   held-out: $$(cat $(CE_OUT)/metrics.json | tr -d '\n ' | grep -o '"heldout_loss":[0-9.]*')"

clean:
	rm -rf runs/demo
