"""engine.keep_freed_memory: glibc keeps freed large blocks for reuse instead of unmapping them."""

import subprocess
import sys

import pytest

from rlctl import memory

# A child process allocates and fills a 64 MiB buffer (twice glibc's largest mmap threshold, so by
# default it gets a mapping of its own), frees it, and prints how much of it left the resident set.
FREE_64_MIB = """
import sys
from rlctl import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory()
def resident_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
block = bytearray(b"\\x01") * (64 * 2**20)
held = resident_mib()
del block
print(held - resident_mib())
"""


def returned_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREE_64_MIB, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc() is None, reason="the setting is glibc's (Linux)")
def test_a_freed_64_mib_block_goes_back_to_the_os_by_default_and_stays_when_kept():
    assert returned_mib("default") > 60  # unmapped at free: the whole 64 MiB leaves the resident set
    assert returned_mib("keep") < 4  # kept in the heap for the next allocation


@pytest.mark.parametrize(
    ("setting", "on_gpu", "applied"),
    [(None, False, True), (None, True, False), (True, True, True), (False, False, False)],
)
def test_keep_freed_memory_defaults_to_on_for_cpu_training_only_and_obeys_an_explicit_setting(
    monkeypatch, setting, on_gpu, applied
):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert memory.apply_allocator_setting(setting, on_gpu=on_gpu) is applied
    assert len(calls) == int(applied)
