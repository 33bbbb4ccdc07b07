"""One TRPO step on fixed data, run under a launcher (see test_trpo.py).

The minibatch of ds_equivalence.py (8 rows, responses of 1-4 tokens, so the ranks hold unequal
token counts); with W processes each rank holds 8/W rows and splits them into micro-batches of
MICRO rows, through the same ``trust_region_update`` the trainer uses, with the Fisher products
on every row. Rank 0 writes the step's metrics and the weights after it to OUT.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ds_equivalence import ROWS, fixed_minibatch

from rlctl.algos import Algorithm
from rlctl.algos.trust_region import TrustRegionSpec
from rlctl.distributed import init_process_group, launched_ranks
from rlctl.models import load_causal_lm, load_tokenizer
from rlctl.optim.engine import ReplicaEngine
from rlctl.optim.scoring import response_logprobs
from rlctl.optim.trust_region import trust_region_update
from rlctl.optim.update import minibatch_counts


def main(out: Path, micro: int) -> None:
    ranks = launched_ranks()
    init_process_group(ranks)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("random:tiny")
    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    whole = fixed_minibatch()
    with torch.no_grad():  # θold's log-probs: the surrogate's denominator, as the trainer stores them
        old = response_logprobs(model, whole.input_ids, whole.attention_mask, whole.response_length)[0]
    whole = whole.with_(old_logprobs=old)
    per_rank = ROWS // ranks.world_size
    mine = whole.rows(torch.arange(ranks.rank * per_rank, (ranks.rank + 1) * per_rank))
    engine = ReplicaEngine(model, "no", ranks.world_size, ranks.rank)
    algo = Algorithm(advantage="grpo", group_size=2, policy_loss="surrogate", update="trust_region",
                     loss_agg="seq-mean-token-mean", kl_coef=0.1)  # fmt: skip
    totals = algo.totals(*minibatch_counts(mine.response_mask))  # counted over all ranks

    def loss_fn(part):
        logp = response_logprobs(engine.model, part.input_ids, part.attention_mask, part.response_length)[0]
        loss, stats = algo.loss(logp, part.old_logprobs, part.advantages, part.response_mask, part.ref_logprobs,
                                totals=totals)  # fmt: skip
        return loss, {"loss/total": loss.detach(), **stats}

    spec = TrustRegionSpec(max_kl=0.01, cg_iters=8, cg_damping=0.1, line_search_steps=10)
    grad_norm, stats = trust_region_update(engine, mine, micro, loss_fn, spec=spec, fisher_fraction=1.0,
                                           temperature=1.0)  # fmt: skip
    if ranks.is_main:
        after = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"grad_norm": grad_norm, "stats": stats, "after": after}, out)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
