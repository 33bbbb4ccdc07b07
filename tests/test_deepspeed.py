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

from rlctl.algos import ops

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


FORMAT_REWARD = ("reward.terms=[{name: format, pattern: ing}]",)
# the judge partitioned like the reference, the gold reward on every rank, checkpoints/best gathered
JUDGE_AND_GOLD = ("reward=judge", "eval.gold=exact_number", "checkpoint.keep_best=gold")


# multi-turn: replies with observations between them (tests/echo_env.py), every rank its own episodes;
# under ZeRO-3 each turn gathers the weights, so a rank whose episodes ended must still take part
ECHO_ENV = ("env=custom", f"env.cls={HERE}/echo_env.py:Echo", "rollout.max_new_tokens=8", "env.max_turns=3",
            "model.path=ENDING")  # fmt: skip
# rollout=hf under ZeRO-3: every forward gathers the weights, and the ranks' replies end at different
# steps (a model that ends them); before generate ran in step over the ranks, this hung after step 1
REPLIES_OF_DIFFERENT_LENGTHS = (*FORMAT_REWARD, "model.path=ENDING")


@pytest.mark.parametrize(
    "algo, stage, reward",
    [("grpo", "zero2", FORMAT_REWARD), ("grpo", "zero3", JUDGE_AND_GOLD), ("ppo", "zero3", FORMAT_REWARD),
     ("grpo", "zero3", ECHO_ENV), ("grpo", "zero3", REPLIES_OF_DIFFERENT_LENGTHS)],
    ids=["grpo-zero2", "grpo-zero3-judge-gold-best", "ppo-zero3", "grpo-zero3-multi-turn",
         "grpo-zero3-replies-of-different-lengths"],
)  # fmt: skip
@pytest.mark.integration
def test_two_processes_train_under_zero_into_one_run_folder(tmp_path, algo, stage, reward, request):
    run = tmp_path / "run"
    if "model.path=ENDING" in reward:  # a tiny model that ends its replies (tests/conftest.py)
        reward = tuple(w.replace("ENDING", request.getfixturevalue("ending_model_path")) for w in reward)
    result = launch(2, "-m", "rlctl", "train", "recipe=smoke", f"algo={algo}", f"deepspeed={stage}", *reward,
                    f"hydra.run.dir={run}")  # fmt: skip
    assert result.stdout.count("step 2/2") == 1  # one rank logs
    if reward == JUDGE_AND_GOLD:
        evaluation = json.loads((run / "eval.json").read_text())
        assert "gold_mean" in evaluation["after"] and evaluation["best"]["by"] == "gold_mean"
        assert AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "best") is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
    if "env=custom" in reward:
        assert all(r["env/observation_tokens"] > 0 for r in rows if "reward/mean" in r)
    final = run / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # gathered weights, loadable anywhere
    assert all(torch.isfinite(p).all() for p in model.parameters())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "policy" / "deepspeed").is_dir()
    assert {p.name for p in (run / "checkpoints" / latest).glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}


@pytest.mark.integration
def test_two_ranks_in_micro_batches_match_one_rank_in_one_for_every_aggregation(tmp_path):
    # Rank 0 holds rows of 1-2 response tokens, rank 1 rows of 3-4 (ds_equivalence.py): per-rank
    # means would weigh rank 0's few tokens as much as rank 1's many. Both layouts go through
    # optim.update; the 2-rank run also splits each rank's 4 rows into 2 micro-batches.
    launch(2, str(HERE / "ds_equivalence.py"), str(tmp_path / "two.pt"), "2", "2")
    launch(1, str(HERE / "ds_equivalence.py"), str(tmp_path / "one.pt"), "2", "8")
    two, one = torch.load(tmp_path / "two.pt")["results"], torch.load(tmp_path / "one.pt")
    before, one = one["before"], one["results"]
    assert set(two) == set(one) == set(ops.AGGREGATIONS)
    for agg in ops.AGGREGATIONS:
        a, b = two[agg], one[agg]
        # Adam's first step with lr = 1e6, ε = 1e4 is about 100·g: each tensor moved by about 100× its gradient.
        # Per tensor, the layouts' difference relative to how far it moved (fp32 summation order: ~1e-7;
        # a mean of per-rank means: ~1e-1).
        moved = {k: (b["after"][k] - before[k]).abs().max().item() for k in b["after"]}
        worst = max((a["after"][k] - b["after"][k]).abs().max().item() / max(moved[k], 1e-12) for k in moved)
        print(f"{agg:24s} grad norm {a['grad_norm']:.6f} vs {b['grad_norm']:.6f}, loss {a['loss']:.6f} vs "
              f"{b['loss']:.6f}; largest relative weight difference {worst:.1e}")  # fmt: skip
        assert max(moved.values()) > 1e-3, agg
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), agg
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), agg
        assert worst < 1e-5, (agg, worst)
