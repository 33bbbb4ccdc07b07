"""One DeepSpeed optimisation step on fixed data, run under a launcher (see test_deepspeed.py).

With W processes each rank trains on its 8/W rows of the same 8-row batch; rank 0 writes the
updated weights to OUT. W = 2 with micro-batch 4 must match W = 1 with micro-batch 8.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rlctl.algos import Algorithm
from rlctl.distributed import init_process_group, launched_ranks
from rlctl.optim.engine import DeepSpeedEngine, OptimSpec, ZeroSpec
from rlctl.models import load_causal_lm, load_tokenizer
from rlctl.optim.scoring import response_logprobs


def main(out: Path, stage: int) -> None:
    ranks = launched_ranks()
    init_process_group(ranks)
    tokenizer = load_tokenizer("random:tiny")
    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (8, 12), generator=generator)
    mask = torch.ones(8, 4)
    mask[::3, -1] = 0  # some shorter responses
    advantages = torch.randn(8, generator=generator)
    rows = slice(ranks.rank * 8 // ranks.world_size, (ranks.rank + 1) * 8 // ranks.world_size)
    micro = 8 // ranks.world_size
    engine = DeepSpeedEngine(
        model, OptimSpec(lr=1e-3, max_grad_norm=1.0), ZeroSpec(stage, "no", micro, 1, ranks.world_size)
    )
    algo = Algorithm(advantage="grpo", group_size=2, loss_agg="seq-mean-token-mean")
    logp, _ = response_logprobs(engine.model, ids[rows], torch.ones_like(ids[rows]), 4)
    loss, _ = algo.loss(logp, logp.detach(), advantages[rows], mask[rows])
    engine.backward(loss)
    engine.step()
    state = engine.full_state_dict()
    if ranks.is_main:
        initial = load_causal_lm("random:tiny", tokenizer, seed=0).state_dict()
        torch.save({"after": {k: v.detach().float().clone() for k, v in state.items()}, "before": initial}, out)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
