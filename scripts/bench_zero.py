"""Per-rank memory of model + optimiser state under ZeRO stages, side by side in one run.

    python scripts/bench_zero.py                         # embedded SmolLM2-135M, 2 ranks, zero0 vs zero3
    python scripts/bench_zero.py --model random:tiny --stages 0 1 2 3

For each stage it launches N CPU processes (gloo) with `accelerate launch`, builds the policy
engine exactly as `rlctl train` does, takes one optimiser step on a small batch (Adam's moments
exist only after one), and has every rank count the bytes it holds in parameters, gradients and
optimiser state (fp32 master copies and both Adam moments). Prints one row per stage and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def tensor_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage in ``seen`` is not counted again)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def child(model_path: str, stage: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from rlctl.distributed import init_process_group, launched_ranks
    from rlctl.models import load_causal_lm, load_tokenizer
    from rlctl.optim.engine import DeepSpeedEngine, OptimSpec, ZeroSpec

    ranks = launched_ranks()
    init_process_group(ranks, even_alone=True)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, tokenizer, seed=0)
    engine = DeepSpeedEngine(model, OptimSpec(lr=1e-5), ZeroSpec(stage, "no", 2, 1, ranks.world_size))
    ids = torch.randint(10, 1000, (2, 16))
    engine.backward(engine.model(input_ids=ids).logits.float().mean())
    engine.step()
    params = [getattr(p, "ds_tensor", p) for p in engine.model.module.parameters()]
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    optimizer_tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    optimizer_tensors += [p for group in inner.param_groups for p in group["params"]]  # fp32 master partitions
    seen: set = set()  # under ZeRO-0 the optimiser's parameters are the model's own: count them once
    params_mb = tensor_bytes(params, seen) / 2**20
    row = {"rank": ranks.rank, "params_mb": params_mb, "optimizer_mb": tensor_bytes(optimizer_tensors, seen) / 2**20}
    rows = [None] * ranks.world_size
    dist.all_gather_object(rows, row)
    if ranks.is_main:
        Path(out).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "HF_HUB_OFFLINE": "1"}
    results = {}
    for stage in args.stages:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        out = tempfile.mktemp(suffix=".json")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", str(args.ranks),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
                   __file__, "--child", args.model, str(stage), out]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"zero{stage} failed:\n{done.stderr[-4000:]}")
        results[stage] = json.loads(Path(out).read_text())
    print(f"model {args.model}, {args.ranks} ranks: memory each rank holds after one step (fp32, AdamW)")
    print(f"{'stage':<7} {'rank':>4} {'params MB':>10} {'optimiser MB':>13} {'total MB':>9}")
    totals = {}
    for stage, rows in results.items():
        for row in rows:
            total = row["params_mb"] + row["optimizer_mb"]
            totals.setdefault(stage, []).append(total)
            print(
                f"zero{stage:<3} {row['rank']:>4} {row['params_mb']:>10.1f} {row['optimizer_mb']:>13.1f} {total:>9.1f}"
            )
    base = max(totals[args.stages[0]])
    for stage in args.stages[1:]:
        print(f"zero{stage} / zero{args.stages[0]} per-rank (largest rank): {max(totals[stage]) / base:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
