"""Generation backends, one interface (``load_weights_of``, ``generate``, ``with_params``):

``hf``    transformers ``generate`` on the training model itself: batched, KV cache, left padding.
``vllm``  a vLLM engine in the same process, sent the policy's weights whenever they change.
"""

from rlctl.rollout.hf import HFRollout, SamplingParams

BACKENDS = ("hf", "vllm")

__all__ = ["BACKENDS", "HFRollout", "SamplingParams"]
