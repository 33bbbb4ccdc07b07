"""TRPO's trust-region step, checked on a policy small enough to build its Fisher matrix: 3 contexts,
a vocabulary of 4, logits = θ (12 numbers). F·v against the explicit Hessian, conjugate gradient
against the explicit solve, the KL bound, the line search halving an overshooting step, a step
with no improvement leaving θ bitwise, and two ranks taking the one-rank step; then algo=trpo end
to end on the tiny model, and its mistakes."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import rlctl

from rlctl.algos import Algorithm
from rlctl.algos.trust_region import TrustRegionSpec, conjugate_gradient, trust_region_step
from rlctl.optim.trust_region import fisher_vector_product

CONTEXTS, VOCAB = 3, 4


def toy(seed: int = 0):
    """θ [3, 4] logits; sampled tokens (contexts × 2 samples) with advantages."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(CONTEXTS, VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, VOCAB, (CONTEXTS, 2), generator=g)
    advantages = torch.tensor([[1.0, -1.0], [0.5, 0.0], [-0.5, 1.5]], dtype=torch.float64)
    return theta, actions, advantages


def kl_mean(old_theta: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Mean over contexts of KL(softmax(old) ‖ softmax(θ)) over the whole vocabulary."""
    old, new = torch.log_softmax(old_theta, -1), torch.log_softmax(theta, -1)
    return (old.exp() * (old - new)).sum(-1).mean()


def surrogate_loss(theta, old_theta, actions, advantages, rows=slice(None), total: int | None = None):
    """−Σ ρ·A / N over the chosen rows' samples, N = all samples (a rank's share of the mean)."""
    logp = torch.log_softmax(theta, -1).gather(1, actions)[rows]
    old = torch.log_softmax(old_theta, -1).gather(1, actions)[rows].detach()
    return -(torch.exp(logp - old) * advantages[rows]).sum() / (total or actions.numel())


def explicit_fisher(theta0: torch.Tensor) -> torch.Tensor:
    old = theta0.detach()
    return torch.autograd.functional.hessian(lambda t: kl_mean(old, t.view(CONTEXTS, VOCAB)), old.reshape(-1))


def test_the_fisher_vector_product_equals_the_explicit_hessian_times_v():
    theta, _, _ = toy()
    fvp = fisher_vector_product(kl_mean(theta.detach(), theta), [theta])
    fisher = explicit_fisher(theta)  # [12, 12]; for a softmax: per context (diag(p) − ppᵀ) / 3
    p = torch.softmax(theta.detach(), -1)
    by_hand = torch.block_diag(*[(torch.diag(p[c]) - torch.outer(p[c], p[c])) / CONTEXTS for c in range(CONTEXTS)])
    assert torch.allclose(fisher, by_hand, atol=1e-12)
    for seed in range(3):
        v = torch.randn(CONTEXTS * VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert torch.allclose(fvp(v).double(), fisher @ v, atol=1e-5)


def test_conjugate_gradient_solves_the_damped_system_like_the_explicit_solve():
    theta, _, _ = toy()
    a = explicit_fisher(theta) + 0.1 * torch.eye(CONTEXTS * VOCAB, dtype=torch.float64)
    b = torch.randn(CONTEXTS * VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, residual = conjugate_gradient(lambda v: a @ v, b, iterations=50, tolerance=1e-20)
    assert residual < 1e-8 and torch.linalg.norm(a @ x - b) < 1e-8
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


def run_step(theta, actions, advantages, spec: TrustRegionSpec, loss_shift: float = 0.0):
    """One step on the toy policy through the same operations the engine gives: returns the result and Δ."""
    start = theta.detach().clone()
    loss = surrogate_loss(theta, start, actions, advantages)
    gradient = torch.autograd.grad(loss, theta)[0].reshape(-1)
    fvp = fisher_vector_product(kl_mean(start, theta), [theta])

    @torch.no_grad()
    def try_step(delta):
        theta.copy_(start if delta is None else start + delta.view_as(theta))
        if delta is None:
            return 0.0, 0.0
        return float(surrogate_loss(theta, start, actions, advantages)) + loss_shift, float(kl_mean(start, theta))

    result = trust_region_step(gradient, fvp, try_step, loss.item(), spec)
    return result, (theta.detach() - start).reshape(-1), start


def test_the_accepted_step_keeps_the_measured_kl_within_max_kl_and_improves_the_surrogate():
    theta, actions, advantages = toy()
    spec = TrustRegionSpec(max_kl=0.01, cg_iters=20, cg_damping=1e-3, line_search_steps=10)
    result, delta, start = run_step(theta, actions, advantages, spec)
    assert result.step_fraction == 1.0 and 0 < result.kl <= 0.01
    assert result.kl == pytest.approx(float(kl_mean(start, start + delta.view_as(start))))
    # The full step sits on the quadratic model's boundary: ½Δᵀ(F + λI)Δ = δ, λ the damping.
    damped = explicit_fisher(start) + 1e-3 * torch.eye(CONTEXTS * VOCAB, dtype=torch.float64)
    assert 0.5 * float(delta @ damped @ delta) == pytest.approx(0.01, rel=1e-4)
    assert result.surrogate_gain > 0 and result.surrogate_gain == pytest.approx(result.expected_gain, rel=0.2)


def test_a_full_step_that_overshoots_max_kl_is_halved():
    # At δ = 1.5 the quadratic model underestimates the KL of the full step, so it is rejected and
    # the line search takes a fraction of it, whose measured KL is within δ.
    theta, actions, advantages = toy()
    spec = TrustRegionSpec(max_kl=1.5, cg_iters=20, cg_damping=1e-3, line_search_steps=10)
    result, _, _ = run_step(theta, actions, advantages, spec)
    assert result.rejected_steps >= 1 and result.step_fraction == 0.5**result.rejected_steps
    assert 0 < result.kl <= 1.5 and result.surrogate_gain > 0


def test_a_step_with_no_improvement_leaves_the_weights_bitwise_unchanged():
    theta, actions, advantages = toy()
    before = theta.detach().clone()
    spec = TrustRegionSpec(max_kl=0.01, cg_iters=20, cg_damping=1e-3, line_search_steps=4)
    result, _, _ = run_step(theta, actions, advantages, spec, loss_shift=1.0)  # every try "worse"
    assert result.step_fraction == 0.0 and result.rejected_steps == 4
    assert torch.equal(theta.detach(), before)


def test_two_ranks_take_the_step_one_rank_takes_on_the_whole_minibatch():
    # Rank 0 holds contexts 0-1, rank 1 context 2. Each rank's gradient, F·v, loss and KL are its
    # share (divided by the counts of the whole minibatch) and are summed over ranks, as the engine's
    # all-reduce does: the step must be the one-rank step on all three contexts.
    spec = TrustRegionSpec(max_kl=0.01, cg_iters=20, cg_damping=1e-3, line_search_steps=10)
    theta, actions, advantages = toy()
    _, whole, _ = run_step(theta, actions, advantages, spec)

    theta, actions, advantages = toy()
    start = theta.detach().clone()
    ranks = [slice(0, 2), slice(2, 3)]

    def kl_share(t, rows):  # this rank's contexts' KL over the whole minibatch's count of contexts
        old, new = torch.log_softmax(start[rows], -1), torch.log_softmax(t[rows], -1)
        return (old.exp() * (old - new)).sum(-1).sum() / CONTEXTS

    gradient = sum(torch.autograd.grad(surrogate_loss(theta, start, actions, advantages, r), theta)[0] for r in ranks)
    products = [fisher_vector_product(kl_share(theta, r), [theta]) for r in ranks]

    @torch.no_grad()
    def try_step(delta):
        theta.copy_(start if delta is None else start + delta.view_as(theta))
        loss = sum(float(surrogate_loss(theta, start, actions, advantages, r)) for r in ranks)
        return loss, sum(float(kl_share(theta, r)) for r in ranks)

    loss = sum(float(surrogate_loss(start, start, actions, advantages, r)) for r in ranks)
    trust_region_step(gradient.reshape(-1), lambda v: sum(p(v) for p in products), try_step, loss, spec)
    assert torch.allclose((theta.detach() - start).reshape(-1), whole, atol=1e-10)


def test_trpo_mistakes_are_one_line_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="policy_loss: the trust-region step .* use policy_loss=surrogate"):
        Algorithm(update="trust_region", policy_loss="ppo_clip")
    for key, value, message in (("max_kl", 0.0, "must be > 0"), ("cg_iters", 0, "must be ≥ 1"),
                                ("cg_damping", -1.0, "must be ≥ 0"), ("fisher_fraction", 1.5, "must be in \\(0, 1\\]")):  # fmt: skip
        with pytest.raises(ValueError, match=f"{key}: {message}"):
            Algorithm(update="trust_region", policy_loss="surrogate", **{key: value})
    refused = rlctl("train", "algo=trpo", "deepspeed=zero3", "dry_run=true", check=False, cwd=tmp_path)
    assert refused.returncode == 1 and (
        "error: deepspeed: the trust-region step (algo=trpo) needs the whole parameters and gradient on every rank: "
        "it runs under deepspeed=none (one process), zero0 or zero1 (several), not ZeRO stage 3" in refused.stderr
    )
    refused = rlctl("train", "algo=trpo", "engine.precision=fp16", "dry_run=true", check=False, cwd=tmp_path)
    assert refused.returncode == 1 and "error: engine.precision: the trust-region step" in refused.stderr
    assert rlctl("train", "algo=trpo", "deepspeed=zero1", "dry_run=true", cwd=tmp_path).returncode == 0
    described = rlctl("train", "algo=trpo", "dry_run=true", cwd=tmp_path)
    assert (
        "one trust-region step per minibatch (max_kl 0.05), CG iterations 10, Fisher on 8 samples" in described.stdout
    )


def test_trpo_trains_on_the_tiny_model_and_logs_its_step(tmp_path):
    reward = tmp_path / "length.py"  # a reward that varies on a random model: the completion's length
    reward.write_text("def score(completion, answer):\n    return len(completion) / 10\n")
    run = tmp_path / "run"
    result = rlctl("train", "recipe=smoke", "algo=trpo", f"reward.fn={reward}:score", "algo.cg_damping=0.001",
                   f"hydra.run.dir={run}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"trpo/kl"' in line]
    assert len(steps) == 2
    for row in steps:
        assert 0 <= row["trpo/kl"] <= 0.05 and row["trpo/cg_residual"] >= 0
        assert row["trpo/step_fraction"] in (0.0, *[0.5**k for k in range(10)])
        if row["trpo/step_fraction"] > 0:
            assert row["trpo/surrogate_gain"] > 0


@pytest.mark.integration
def test_two_processes_take_the_one_process_step_on_the_whole_minibatch(tmp_path):
    # trpo_equivalence.py: 8 rows of unequal length; 2 ranks of 4 rows in micro-batches of 2 against
    # 1 rank of 8 rows in one micro-batch. g, each F·v and the line search's sums are summed over ranks,
    # so the step (its fraction, KL, gain) and the weights after it must agree to fp32 summation order.
    from test_deepspeed import HERE, launch

    launch(2, str(HERE / "trpo_equivalence.py"), str(tmp_path / "two.pt"), "2")
    launch(1, str(HERE / "trpo_equivalence.py"), str(tmp_path / "one.pt"), "8")
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    before = load_tiny_weights()
    assert one["stats"]["trpo/step_fraction"] > 0, one["stats"]  # a step was taken, so the weights moved
    for key in ("trpo/step_fraction", "trpo/rejected_steps"):
        assert two["stats"][key] == one["stats"][key], key
    for key in ("trpo/kl", "trpo/expected_gain", "trpo/surrogate_gain"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4), key
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    moved = max((one["after"][k] - before[k]).abs().max().item() for k in before)
    worst = max((two["after"][k] - one["after"][k]).abs().max().item() for k in before)
    print(f"largest weight move {moved:.2e}, largest difference between the layouts {worst:.2e}")
    assert moved > 1e-4 and worst < 1e-4 * moved


def load_tiny_weights() -> dict[str, torch.Tensor]:
    from rlctl.models import load_causal_lm, load_tokenizer

    return load_causal_lm("random:tiny", load_tokenizer("random:tiny"), seed=0).state_dict()
