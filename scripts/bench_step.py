"""Seconds per GRPO step, its breakdown, peak resident memory and padding, for full fine-tuning and
LoRA r = 16, on one piece of work; optionally TRL's GRPOTrainer on the same work, side by side.

The work: the embedded SmolLM2-135M-Instruct, two-digit addition, 8 prompts × 4 samples, ≤ 32 new
tokens, β = 0.04, 5 steps; step time is the median of steps 2–5 (the first pays one-off costs).
Each variant runs in a fresh process (peak RSS is per process), one after the other:

    python scripts/bench_step.py                                  # rlctl: full and LoRA r = 16
    python scripts/bench_step.py engine.precision=bf16            # any train overrides, applied to both
    python scripts/bench_step.py --trl /tmp/trl-venv/bin/python   # and TRL, installed in a scratch venv

TRL is a yardstick, not a dependency: install it outside the project (``python -m venv
/tmp/trl-venv && /tmp/trl-venv/bin/pip install trl``). Its run gets the same model folder, the same
prompts (written to a temporary JSONL), the same rule reward (first number = the sum) and the same
sizes; precision follows ``engine.precision`` (bf16 or fp32).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import peak_rss_mb, run_train_steps

WORK = ["data.digits=2", "prompts_per_step=8", "algo.group_size=4", "rollout.max_new_tokens=32",
        "algo.kl_coef=0.04", "steps=5"]  # fmt: skip
VARIANTS = {"full fine-tuning": ["model.lora.r=0"], "LoRA r = 16": ["model.lora.r=16", "optim.lr=1e-4"]}
TIMES = ("time/rollout_s", "time/ref_s", "time/update_s")


def rlctl_child(overrides: list[str]) -> None:
    """Build and run the steps in this process; print {"step_s", breakdown, "peak_rss_mb", padding} as JSON."""
    stages, cfg, rows = run_train_steps(overrides)
    steady = rows[1:] or rows
    median = {key: statistics.median(r.get(key, 0.0) for r in steady) for key in ("step_s", *TIMES)}
    print(json.dumps({
        **median, "peak_rss_mb": peak_rss_mb(),
        "padding_fixed": statistics.mean(r["batch/padding_frac_fixed"] for r in rows),
        "padding": statistics.mean(r["batch/padding_frac"] for r in rows),
        "trainable_params": sum(p.numel() for p in stages.policy.unwrapped().parameters() if p.requires_grad),
        "precision": cfg.engine.precision,
    }))  # fmt: skip


def trl_child(model_dir: str, prompts_file: str, bf16: bool) -> None:
    """TRL's GRPOTrainer on the same work (run with the scratch venv's python)."""
    import re

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])  # fmt: skip

    def first_number_is_the_sum(completions, answer, **_):
        found = [re.search(r"-?\d+", c[0]["content"]) for c in completions]
        return [float(m is not None and m.group() == a) for m, a in zip(found, answer)]

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=32, num_generations=4,
        gradient_accumulation_steps=1, max_completion_length=32, beta=0.04, learning_rate=2e-5, max_steps=5,
        bf16=bf16, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], temperature=1.0, seed=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model_dir, reward_funcs=first_number_is_the_sum, args=config, train_dataset=dataset,
                          callbacks=[StepTimer()])  # fmt: skip
    trainer.train()
    steady = step_times[1:] or step_times
    print(json.dumps({"step_s": statistics.median(steady), "peak_rss_mb": peak_rss_mb()}))


def run(command: list[str]) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} … failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trl_inputs(overrides: list[str]) -> tuple[str, str, bool]:
    """The model folder, a JSONL of the training prompts, and bf16 or not, as rlctl resolves them."""
    from hydra import compose, initialize_config_dir

    from rlctl import models
    from rlctl.cli import CONF_DIR
    from rlctl.config import fill, register_schemas
    from rlctl.data import load_examples
    from rlctl.data.prompts import PromptFormat
    from rlctl.data.sources import SourceSpec

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=[*WORK, *overrides])
    source, _ = fill("data", cfg.data, SourceSpec, PromptFormat)
    train, _ = load_examples(source.source, source)
    prompts = Path(tempfile.mkdtemp(prefix="trl-bench-")) / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in train))
    return models.resolve(cfg.model.path), str(prompts), cfg.engine.precision == "bf16"


def main(args: list[str]) -> None:
    trl_python = None
    if "--trl" in args:
        at = args.index("--trl")
        trl_python, args = args[at + 1], args[:at] + args[at + 2 :]
    results = {}
    for name, variant in VARIANTS.items():
        results[name] = run([sys.executable, __file__, "--rlctl-child", *WORK, *variant, *args])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if trl_python:
        model_dir, prompts, bf16 = trl_inputs(args)
        results["TRL GRPOTrainer"] = run([trl_python, __file__, "--trl-child", model_dir, prompts, str(bf16)])
        print(f"TRL GRPOTrainer: {json.dumps(results['TRL GRPOTrainer'])}", flush=True)
    print(f"\nwork: {' '.join(WORK)} {' '.join(args)}; median of steps 2–5")
    print(f"{'':<18} {'s/step':>7} {'rollout':>8} {'ref':>6} {'update':>7} {'peak RSS GB':>12} "
          f"{'padding fixed → used':>21} {'trainable':>11}")  # fmt: skip
    for name, r in results.items():
        if "padding" in r:
            print(f"{name:<18} {r['step_s']:>7.1f} {r['time/rollout_s']:>8.1f} {r['time/ref_s']:>6.1f} "
                  f"{r['time/update_s']:>7.1f} {r['peak_rss_mb'] / 1024:>12.2f} "
                  f"{r['padding_fixed']:>12.2f} → {r['padding']:.2f} {r['trainable_params']:>11,}")  # fmt: skip
        else:
            print(f"{name:<18} {r['step_s']:>7.1f} {'':>8} {'':>6} {'':>7} {r['peak_rss_mb'] / 1024:>12.2f}")
    full, lora = results["full fine-tuning"], results["LoRA r = 16"]
    print(f"LoRA / full: peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}, step time "
          f"{lora['step_s'] / full['step_s']:.2f}")  # fmt: skip
    if "TRL GRPOTrainer" in results:
        trl = results["TRL GRPOTrainer"]
        print(f"rlctl (full) / TRL: step time {full['step_s'] / trl['step_s']:.2f}, peak RSS "
              f"{full['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rlctl-child"]:
        rlctl_child(sys.argv[2:])
    elif sys.argv[1:2] == ["--trl-child"]:
        trl_child(sys.argv[2], sys.argv[3], sys.argv[4] == "True")
    else:
        main(sys.argv[1:])
