"""Shared by the offline stages' tests: what one update of a built run applies."""

from rlctl.offline import offline_step


def gradient_of_update(run, updates_before: int = 0):
    """(the gradient the update after ``updates_before`` others applies, that step's metrics); closes the run's logger."""
    grads, step = {}, run.engine.step

    def record_then_step():
        grads.clear()
        grads.update({n: p.grad.detach().clone() for n, p in run.engine.unwrapped().named_parameters()})
        return step()

    run.engine.step = record_then_step
    for _ in range(updates_before):
        offline_step(run)
    metrics = offline_step(run)
    run.logger.close()
    return grads, metrics
