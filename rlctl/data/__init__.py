"""Dataset sources -> examples -> tokenised prompt batches."""

from rlctl.data.prompts import PromptSet, encode_prompts
from rlctl.data.sampler import PromptSampler
from rlctl.data.sources import SOURCES, Example, load_examples

__all__ = ["SOURCES", "Example", "PromptSampler", "PromptSet", "encode_prompts", "load_examples"]
