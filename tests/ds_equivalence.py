"""One DeepSpeed update per loss aggregation on fixed data, run under a launcher (see test_deepspeed.py).

The minibatch is 8 rows with responses of unequal length: rows 0-3 are short (1-2 tokens), rows
4-7 long (3-4 tokens), so with 2 ranks one rank holds far fewer tokens than the other, which is
where a mean of per-rank means and one mean over all tokens differ. With W processes each rank
trains on its 8/W rows in micro-batches of MICRO rows, through the same ``optim.update`` the
trainer uses. Rank 0 writes, per aggregation, the global gradient norm, the minibatch loss and the
updated weights to OUT. Adam's first update is lr·g / (|g| + ε); with lr = 1e6, ε = 1e4 it is about 100·g,
so the weights show the gradient's scale as well as its direction; clipping is off.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rlctl.algos import Algorithm, ops
from rlctl.batch import Batch
from rlctl.distributed import init_process_group, launched_ranks, mean_over_ranks
from rlctl.models import load_causal_lm, load_tokenizer
from rlctl.optim.engine import DeepSpeedEngine, OptimSpec, ZeroSpec
from rlctl.optim.scoring import response_logprobs
from rlctl.optim.update import minibatch_counts, update

ROWS, RESPONSE = 8, 4
LENGTHS = [1, 2, 1, 2, 4, 3, 4, 4]  # response tokens per row


def fixed_minibatch() -> Batch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (ROWS, 8 + RESPONSE), generator=generator)
    mask = torch.zeros(ROWS, RESPONSE)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    attention = torch.cat([torch.ones(ROWS, 8, dtype=torch.long), mask.long()], dim=1)
    return Batch(
        input_ids=ids, attention_mask=attention, response_mask=mask, group_ids=torch.arange(ROWS) // 2,
        prompts=[""] * ROWS, completions=[""] * ROWS, answers=[""] * ROWS,
        advantages=torch.randn(ROWS, generator=generator), ref_logprobs=-11.0 + torch.rand(ROWS, RESPONSE, generator=generator),
    )  # fmt: skip


def main(out: Path, stage: int, micro: int) -> None:
    ranks = launched_ranks()
    init_process_group(ranks)
    tokenizer = load_tokenizer("random:tiny")
    whole = fixed_minibatch()
    per_rank = ROWS // ranks.world_size
    mine = whole.rows(torch.arange(ranks.rank * per_rank, (ranks.rank + 1) * per_rank))
    results = {}
    for agg in ops.AGGREGATIONS:
        model = load_causal_lm("random:tiny", tokenizer, seed=0)
        zero = ZeroSpec(True, stage, False, False, "no", micro, per_rank // micro, ranks.world_size)
        engine = DeepSpeedEngine(model, OptimSpec(lr=1e6, eps=1e4, max_grad_norm=0.0), zero)
        algo = Algorithm(advantage="grpo", group_size=2, loss_agg=agg, kl_coef=0.1, entropy_coef=0.01)
        totals = algo.totals(*minibatch_counts(mine.response_mask))

        def loss_fn(part: Batch, engine=engine, algo=algo, totals=totals):
            logp, entropy = response_logprobs(
                engine.model,
                part.input_ids,
                part.attention_mask,
                part.response_length,
                with_entropy=True,
                entropy_grad=True,
            )
            return algo.loss(logp, logp.detach(), part.advantages, part.response_mask, part.ref_logprobs, entropy,
                             totals=totals)  # fmt: skip

        grad_norm, stats = update(engine, mine, micro, loss_fn)
        loss = mean_over_ranks({"loss": stats["loss/policy"]})["loss"]
        state = engine.full_state_dict()
        if ranks.is_main:
            results[agg] = {"grad_norm": grad_norm, "loss": loss,
                            "after": {k: v.detach().float().clone() for k, v in state.items()}}  # fmt: skip
    if ranks.is_main:
        initial = load_causal_lm("random:tiny", tokenizer, seed=0).state_dict()
        torch.save({"results": results, "before": initial}, out)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
