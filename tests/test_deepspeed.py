"""DeepSpeed ZeRO with two CPU processes (gloo), launched as users launch it: `accelerate launch`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
HERE = Path(__file__).parent


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(n: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(), *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.mark.parametrize(
    "algo, stage",
    [("grpo", "zero2"), ("grpo", "zero3"), ("ppo", "zero3")],
    ids=["grpo-zero2", "grpo-zero3", "ppo-zero3"],
)
def test_two_processes_train_under_zero_into_one_run_folder(tmp_path, algo, stage):
    run = tmp_path / "run"
    result = launch(2, "-m", "rlctl", "train", "recipe=smoke", f"algo={algo}", f"deepspeed={stage}",
                    "reward.terms=[{name: format, pattern: ing}]", f"hydra.run.dir={run}")  # fmt: skip
    assert result.stdout.count("step 2/2") == 1  # one rank logs
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    final = run / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # gathered weights, loadable anywhere
    assert all(torch.isfinite(p).all() for p in model.parameters())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "policy" / "deepspeed").is_dir()
    assert {p.name for p in (run / "checkpoints" / latest).glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}


def test_two_ranks_with_micro_batch_b_match_one_rank_with_2b(tmp_path):
    launch(2, str(HERE / "ds_equivalence.py"), str(tmp_path / "two.pt"), "2")
    launch(1, str(HERE / "ds_equivalence.py"), str(tmp_path / "one.pt"), "2")
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["after"].keys() == one["after"].keys()
    # The step moved weights by up to lr = 1e-3 (Adam's first step is ±lr per element) ...
    moved = max((one["after"][k] - one["before"][k]).abs().max().item() for k in one["after"])
    assert moved > 5e-4
    # ... and the two layouts agree to 1e-6 absolute (fp32; gradients summed in a different order,
    # which Adam's first step, g/(|g| + eps), magnifies only where |g| is near eps).
    worst = max((two["after"][k] - one["after"][k]).abs().max().item() for k in one["after"])
    print(f"equivalence: weights moved up to {moved:.2e}; 2 ranks vs 1 rank differ by at most {worst:.2e}")
    assert worst < 1e-6, worst
