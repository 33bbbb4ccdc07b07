"""Generation backends. ``hf``: transformers ``generate`` with KV cache, batched, left padding."""

from rlctl.rollout.hf import HFRollout, SamplingParams

BACKENDS = {"hf": HFRollout}

__all__ = ["BACKENDS", "HFRollout", "SamplingParams"]
