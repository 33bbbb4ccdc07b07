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


@pytest.fixture(scope="session")
def ending_model_path(tmp_path_factory, tokenizer):
    """A tiny model taught to end a reply with EOS: the random one almost never ends one (1 token in
    49,152), so its multi-turn episodes would stop at the first reply. 60 Adam steps on rows whose
    labels are 40 % EOS teach it about that unigram rate (0.30 measured; ~5 s)."""
    import torch

    from rlctl.models import load_causal_lm

    folder = tmp_path_factory.mktemp("ending-model")
    model = load_causal_lm("random:tiny", tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(60):
        ids = torch.randint(1000, 20000, (16, 12), generator=generator)
        ids[torch.rand(ids.shape, generator=generator) < 0.4] = tokenizer.eos_token_id
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
