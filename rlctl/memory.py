"""How the process's C allocator treats freed memory (``engine.keep_freed_memory``).

glibc serves every block above its mmap threshold (at most 32 MiB) from a mapping of its own and
unmaps it when the block is freed. Training frees and re-allocates the same large tensors every
micro-batch (an embedding gradient of vocab × hidden, logits, activations), so every one of them
comes back as fresh pages the kernel must fault in and zero; on the 2-core development machine that
costs ~6 ms per MB, ~15 % of a step. Keeping freed memory in the heap lets the next micro-batch reuse
it. The price is that freed memory is not handed back to the OS until the process ends, which
raises peak RSS a little where the work's peak is early and brief.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes: free heap top is returned only beyond 2 GiB


def _glibc():
    """The process's glibc, or None elsewhere (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    process = ctypes.CDLL(None)  # the symbols already loaded: the allocator this process really uses
    if not hasattr(process, "gnu_get_libc_version"):  # only glibc has it; musl's mallopt takes nothing we set
        return None
    return process


def keep_freed_memory() -> bool:
    """From now on, no block gets a mapping of its own and the heap is not trimmed: freed memory
    stays in the process for the next allocation. True when glibc took both settings."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def apply_allocator_setting(keep: bool | None, on_gpu: bool) -> bool:
    """``engine.keep_freed_memory``: None keeps freed memory when training runs on the CPU (where the
    faults are the trainer's own time). True where it was applied."""
    wanted = (not on_gpu) if keep is None else keep
    return keep_freed_memory() if wanted else False
