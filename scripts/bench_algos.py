"""Peak resident memory and step time of PPO (with its critic) and GRPO on the same model and batch.

Each algorithm runs in its own fresh process (peak RSS is per process), side by side in one call:

    python scripts/bench_algos.py                      # embedded SmolLM2-135M, 3 steps each
    python scripts/bench_algos.py model=tiny steps=2   # any train overrides, applied to both

Prints one row per algorithm and the GRPO/PPO ratios. Step time is the median over the steps
after the first (the first pays one-off costs).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from bench_common import peak_rss_mb, run_train_steps

ALGOS = ("ppo", "grpo")


def child(overrides: list[str]) -> None:
    """Build and run the steps in this process, print {"peak_rss_mb", "step_s", ...} as JSON."""
    stages, cfg, rows = run_train_steps(overrides)
    times = [r["step_s"] for r in rows]
    steady = times[1:] or times
    print(json.dumps({
        "peak_rss_mb": peak_rss_mb(),
        "step_s": statistics.median(steady),
        "first_step_s": times[0],
        "critic": stages.critic is not None,
        "reference": stages.reference is not None,
        "samples_per_step": cfg.prompts_per_step * cfg.algo.group_size,
    }))  # fmt: skip


def main(overrides: list[str]) -> None:
    if not any(o.startswith("steps=") for o in overrides):
        overrides = ["steps=3", *overrides]
    results = {}
    for algo in ALGOS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", f"algo={algo}", *overrides],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            sys.exit(f"{algo} failed:\n{out.stderr[-3000:]}")
        results[algo] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"overrides: {' '.join(overrides)}")
    print(
        f"{'algo':<6} {'critic':>6} {'reference':>9} {'samples/step':>12} {'peak RSS MB':>12} {'step s':>8} {'first step s':>12}"
    )
    for algo, r in results.items():
        print(f"{algo:<6} {r['critic']!s:>6} {r['reference']!s:>9} {r['samples_per_step']:>12} "
              f"{r['peak_rss_mb']:>12.0f} {r['step_s']:>8.2f} {r['first_step_s']:>12.2f}")  # fmt: skip
    ppo, grpo = results["ppo"], results["grpo"]
    print(
        f"GRPO / PPO: peak memory {grpo['peak_rss_mb'] / ppo['peak_rss_mb']:.2f}, step time {grpo['step_s'] / ppo['step_s']:.2f}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main(sys.argv[1:])
