"""The process set-up of every training entry point: large tensors freed by one step are reused by
the next instead of being unmapped and page-faulted in again (glibc's default above 32 MB)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# 60 allocate-fill-free cycles of a 40 MB tensor (a ConvNeXt stage-1 activation is 33.5 MB in float32);
# prints the page faults they cost.
CYCLES = """
import resource, sys, torch
from bench.runtime import setup_threads
if sys.argv[1] == "setup":
    setup_threads(1)
torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")


def page_faults(mode: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "BENCH_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], env={**clean, **env}, capture_output=True, text=True, check=True)
    return int(out.stdout)


@glibc_only
def test_setup_keeps_freed_large_tensors_for_reuse():
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert page_faults("plain") >= 45 * pages  # glibc's default: every cycle faults its pages in again
    # the first few cycles while the heap grows (1 to 5 seen, by what else the interpreter allocates), then none
    assert page_faults("setup") <= 15 * pages


@glibc_only
def test_the_users_own_malloc_settings_and_the_opt_out_win():
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert page_faults("setup", BENCH_ALLOCATOR="default") >= 45 * pages
    assert page_faults("setup", MALLOC_MMAP_THRESHOLD_=str(1 << 20)) >= 45 * pages
