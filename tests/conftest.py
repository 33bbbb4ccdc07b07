import os
import sys

import pytest

# Never reach for a model hub in tests; everything comes from the embedded package or random init.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tokenizer():
    from rlctl.models import load_tokenizer

    return load_tokenizer("random:tiny")


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from rlctl.models import load_causal_lm

    return load_causal_lm("random:tiny", tokenizer, seed=0)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; each in-process build here starts from a clean one.
    So does DeepSpeed: its cached process groups go stale when a vLLM engine tears the group down."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_release_process_group_references"):
        groups._release_process_group_references(None)
