"""Rollout throughput of the hf and vllm backends, and the step-time breakdown of a run with each.

    python scripts/bench_rollout.py                  # embedded SmolLM2-135M, bf16, 8 prompts × 8 samples
    python scripts/bench_rollout.py --steps 4        # more steps for the breakdown

Part 1: tokens/s = valid generated tokens / wall seconds of one rollout call, at 16, 64 and 256 new
tokens, on GSM8K questions (../shared/data/gsm8k/test.jsonl, which make the model talk; the
built-in arithmetic prompts where that file is absent). Part 2: `rlctl train` (default settings,
no evaluation) with each backend, median seconds per stage over the steps after the first.
Each backend runs in its own fresh process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("hf", "vllm")
LENGTHS = (16, 64, 256)
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
STAGES = ("weight_sync", "rollout", "reward", "ref", "update", "step")


def data_overrides() -> list[str]:
    if GSM8K.exists():
        return ["data=gsm8k", f"data.path={GSM8K}", f"data.eval_path={GSM8K}"]
    return []


def throughput_child(backend: str) -> None:
    """Print {max_new_tokens: {"tokens", "seconds"}} for one backend as JSON."""
    from dataclasses import replace

    from hydra import compose, initialize_config_dir

    from rlctl.build import build_inference, build_prompts
    from rlctl.cli import CONF_DIR
    from rlctl.config import register_schemas

    register_schemas()
    overrides = [f"rollout={backend}", f"rollout.max_new_tokens={max(LENGTHS)}", *data_overrides()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("eval", overrides=overrides)
    policy, tokenizer, rollout = build_inference(cfg)
    _, held_out = build_prompts(cfg, tokenizer)
    prompts, answers = held_out.token_ids[:8], [e.answer for e in held_out.examples[:8]]
    rollout.with_params(replace(rollout.params, max_new_tokens=4)).generate(
        policy, prompts[:1], answers[:1], 1
    )  # warm-up
    results = {}
    for length in LENGTHS:
        sized = rollout.with_params(replace(rollout.params, max_new_tokens=length, temperature=1.0))
        start = time.perf_counter()
        batch = sized.generate(policy, prompts, answers, 8)
        seconds = time.perf_counter() - start
        results[length] = {"tokens": int(batch.response_mask.sum()), "seconds": seconds}
    print(json.dumps(results))


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_breakdown(backend: str, steps: int) -> dict[str, float]:
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="rlctl-bench-")) / backend
    command = [sys.executable, "-m", "rlctl", "train", f"rollout={backend}", f"steps={steps}", "eval.enabled=false",
               "save_final=false", "checkpoint.every=0", "logger.console=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r][1:]  # the first step pays one-off costs
    return {stage: statistics.median(r.get(f"time/{stage}_s", 0.0) for r in rows) for stage in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of the default run per backend (≥ 2)")
    args = parser.parse_args()
    source = f"GSM8K questions ({GSM8K})" if GSM8K.exists() else "built-in arithmetic prompts"
    print(f"rollout throughput: embedded SmolLM2-135M-Instruct, bf16, 8 prompts × 8 samples, {source}")
    speed = {b: run(["--throughput", b]) for b in BACKENDS}
    print(f"{'new tokens':>10} " + " ".join(f"{b + ' tok/s':>12} {b + ' s':>8}" for b in BACKENDS) + f" {'vllm/hf':>8}")
    for length in map(str, LENGTHS):
        rates = {b: speed[b][length]["tokens"] / speed[b][length]["seconds"] for b in BACKENDS}
        cells = " ".join(f"{rates[b]:>12.1f} {speed[b][length]['seconds']:>8.1f}" for b in BACKENDS)
        print(f"{length:>10} {cells} {rates['vllm'] / rates['hf']:>7.1f}×")
    print(f"\ndefault `rlctl train` step, median of steps 2..{args.steps} (seconds)")
    breakdown = {b: step_breakdown(b, args.steps) for b in BACKENDS}
    print(f"{'rollout':<8} " + " ".join(f"{s:>11}" for s in STAGES))
    for backend, row in breakdown.items():
        print(f"{backend:<8} " + " ".join(f"{row[s]:>11.2f}" for s in STAGES))
    print(f"step time hf / vllm: {breakdown['hf']['step'] / breakdown['vllm']['step']:.2f}×")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--throughput"]:
        throughput_child(sys.argv[2])
    else:
        main()
