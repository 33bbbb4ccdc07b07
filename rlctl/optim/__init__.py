"""The optimisation stage: engines (plain, DeepSpeed), log-probs and values, the batch layout,
and the minibatch / micro-batch update of one engine with a given loss."""
