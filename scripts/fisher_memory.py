"""What TRPO's Fisher products hold in memory, measured beside what the memory plan counts for them.

Each row count runs in its own fresh process (peak RSS is per process): the embedded SmolLM2-135M,
``rows`` random sequences of ``prompt + response`` tokens, the double backward of the mean
full-vocabulary KL as ``rlctl train algo=trpo`` builds it, and two Fisher-vector products.

    python scripts/fisher_memory.py                        # 8, 16, 32 rows; 128 + 16 tokens; bf16 autocast
    python scripts/fisher_memory.py --rows 8 64 --precision no

Prints, per row count, the peak RSS beyond the loaded model (the graph, its products and the CG
vectors' direction and product) and what the plan counts for them (its "Fisher products" row and
two of its CG vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

GIB = 2**30
MODEL = "embedded:smollm2-135m"


def child(rows: int, prompt: int, response: int, precision: str) -> None:
    import psutil
    import torch

    from rlctl.batch import Batch
    from rlctl.models import load_causal_lm, load_tokenizer
    from rlctl.optim.trust_region import fisher_vector_product, full_log_probs, kl_sum

    model = load_causal_lm(MODEL, load_tokenizer(MODEL))
    params = [p for p in model.parameters() if p.requires_grad]
    length = prompt + response
    batch = Batch(
        input_ids=torch.randint(0, model.config.vocab_size, (rows, length)),
        attention_mask=torch.ones(rows, length, dtype=torch.long), response_mask=torch.ones(rows, response),
        group_ids=torch.zeros(rows, dtype=torch.long), prompts=[""] * rows, completions=[""] * rows,
        answers=[""] * rows,
    )  # fmt: skip
    direction = torch.randn(sum(p.numel() for p in params))
    before = psutil.Process(os.getpid()).memory_info().rss
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        log_probs = full_log_probs(model, batch, 1.0)
    kl = kl_sum(log_probs.detach(), log_probs, batch.response_mask) / (rows * response)
    product = fisher_vector_product(kl, params)
    product(direction)
    product(direction)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured_gib": (peak - before) / GIB}))


def planned(rows: int, prompt: int, response: int, precision: str) -> float:
    from rlctl.models import config_of
    from rlctl.plan import PlanInputs, memory_plan, shape_of

    shape = shape_of(config_of(MODEL))
    inputs = PlanInputs(shape=shape, precision=precision, trust_region=True, fisher_rows=rows,
                        sequence_tokens=prompt + response, response_tokens=response)  # fmt: skip
    # the probe's direction and product are two of the CG vectors the plan counts in its own row
    fisher = dict((name, size) for name, size, _ in memory_plan(inputs).rows)["Fisher products (trust region)"]
    return (fisher + 2 * 4 * shape.parameters) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=16)
    parser.add_argument("--precision", choices=["bf16", "no"], default="bf16")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rows[0], args.prompt, args.response, args.precision)
        return
    print(f"Fisher products, SmolLM2-135M, {args.prompt} + {args.response} tokens per row, precision {args.precision}")
    print(f"{'rows':>5} {'measured GiB':>13} {'plan GiB':>9}")
    for rows in args.rows:
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--rows", str(rows), "--prompt", str(args.prompt),
             "--response", str(args.response), "--precision", args.precision],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            print(f"{rows:>5} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
            continue
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured_gib"]
        print(f"{rows:>5} {measured:>13.2f} {planned(rows, args.prompt, args.response, args.precision):>9.2f}")


if __name__ == "__main__":
    main()
