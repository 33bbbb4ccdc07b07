"""LoRA through peft: the policy trains low-rank adapters on frozen weights.

A LoRA layer computes W x + s·B A x with W [out, in] frozen, A [r, in], B [out, r] trained and
s = alpha / r. Its merged weight is W + s·B A. The adapter starts at B = 0, so the initial policy
is the base model: the base (the policy with its adapter disabled) is the reference, and no second
copy is held. A rollout engine and ``checkpoints/final`` get merged weights under the base model's
own parameter names; step checkpoints keep only the adapter (and its optimiser state).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlctl.errors import RlctlError, check_fields

ADAPTER_FOLDER = "adapter"  # inside checkpoints/final: the adapter alone, for peft's PeftModel.from_pretrained


@dataclass(frozen=True)
class LoraSpec:
    """The ``model.lora`` group (filled by field name)."""

    r: int  # rank; 0 = no adapter, the whole model trains
    alpha: float  # scale s = alpha / r
    dropout: float  # dropout on the adapter's input
    # names (or suffixes) of the linear layers that get an adapter; ["all-linear"] = all but the head
    target_modules: list[str]

    def __post_init__(self) -> None:
        checks = (("r", self.r >= 0, "must be ≥ 0 (0 = no LoRA)"),
                  ("alpha", self.alpha > 0, "must be > 0"),
                  ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
                  ("target_modules", len(self.target_modules) > 0, "must name at least one module"))  # fmt: skip
        check_fields(self, checks)
        object.__setattr__(self, "target_modules", list(self.target_modules))

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def check_targets(linear_names: list[str], targets: list[str], key: str = "model.lora.target_modules") -> None:
    """One line, before the model loads, when a target names no linear layer of the model: the
    suffixes that do exist (``linear_names``: the model's linear layers but the LM head)."""
    if targets == ["all-linear"]:
        return
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linear_names):
            raise RlctlError(f"{key}: the model has no linear layer named {target!r}; its linear layers: {suffixes} "
                             "(or all-linear)")  # fmt: skip


def add_adapter(model: torch.nn.Module, spec: LoraSpec, task_type: str | None = "CAUSAL_LM") -> torch.nn.Module:
    """``model`` with a fresh LoRA adapter (B = 0: it computes what ``model`` did); only the adapter
    trains. ``task_type=None`` for a transformer body without an LM head (a critic's backbone)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none", task_type=task_type)  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft names the modules it could not find
        raise RlctlError(f"model.lora.target_modules: {str(err).splitlines()[0]}") from None


def load_adapter(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` with the trainable adapter saved in ``folder`` (a step checkpoint's policy)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def is_adapted(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_disabled(model: torch.nn.Module):
    """Context in which the adapted ``model`` computes with its base weights alone."""
    return model.disable_adapter()


_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """peft's name of a base weight -> the base model's ("…q_proj.base_layer.weight" -> "…q_proj.weight")."""
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")


def merged_weights(weights: Iterable[tuple[str, torch.Tensor]], scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """An adapted model's (name, tensor) stream -> the merged model's, under the base model's names.

    Each adapted layer's base weight W waits for its A and B (they follow it in module order) and
    leaves as W + scaling·B A, in W's dtype; every other tensor passes through renamed. Only
    adapted layers' tensors are held, one layer at a time.
    """
    waiting: dict[str, dict[str, torch.Tensor]] = {}  # layer prefix -> {"weight", "A", "B"}
    for name, tensor in weights:
        if ".lora_A." in name or ".lora_B." in name:
            prefix = name.split(".lora_")[0]
            waiting.setdefault(prefix, {})["A" if ".lora_A." in name else "B"] = tensor
        elif ".base_layer.weight" in name:
            waiting.setdefault(name.removesuffix(".base_layer.weight"), {})["weight"] = tensor
        else:
            yield base_name(name), tensor
            continue
        prefix = name.split(".lora_")[0] if ".lora_" in name else name.removesuffix(".base_layer.weight")
        parts = waiting[prefix]
        if len(parts) == 3:
            del waiting[prefix]
            weight = parts["weight"]
            delta = scaling * (parts["B"].float() @ parts["A"].float())
            yield base_name(prefix) + ".weight", (weight.float() + delta).to(weight.dtype)
    if waiting:
        raise RuntimeError(f"LoRA layers without all of base weight, A and B: {sorted(waiting)[:3]}")


def scaling_of(model: torch.nn.Module) -> float:
    """s of the adapted model's adapter: alpha / r (alpha / √r with rank-stabilised LoRA)."""
    config = model.peft_config["default"]
    return config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)


def save_adapted(model: torch.nn.Module, folder: Path, state: dict, whole: bool) -> None:
    """Write an adapted model from its full state dict (gathered from all ranks under ZeRO-3).

    whole=False (a step checkpoint): the adapter alone. whole=True (``checkpoints/final``): the
    merged model as a plain HF folder, which loads and serves like any other, and the adapter
    beside it in ``adapter/``.
    """
    folder = Path(folder)
    target = folder / ADAPTER_FOLDER if whole else folder
    model.save_pretrained(target, state_dict=state, safe_serialization=True, save_embedding_layers=False)
    if whole:
        merged = dict(merged_weights(state.items(), scaling_of(model)))
        model.get_base_model().save_pretrained(folder, state_dict=merged, safe_serialization=True)


class AdapterDisabled(torch.nn.Module):
    """The adapted policy computing with its base weights alone: the reference, with no copy of them.

    It offers no output embeddings, so scoring takes the logits of its own forward, where the
    adapter is off (a head applied outside that forward could be an adapted one)."""

    def __init__(self, adapted: torch.nn.Module):
        super().__init__()
        self._adapted = (adapted,)  # a tuple: the policy's weights are not this module's own parameters

    @property
    def config(self):
        """The model's config (its attention kind decides how scoring may pack rows)."""
        return self._adapted[0].config

    def forward(self, **inputs):
        model = self._adapted[0]
        with adapter_disabled(model):
            return model(**inputs)
