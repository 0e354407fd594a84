"""Where and how a run computes: the device, CPU threads, autocast dtype and memory layout, resolved
once from the config and the machine. No training here, so launchers and readers can ask for the
device without importing the training loops."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import settings
from .config import TrainConfig
from .errors import ConfigError

# Measured per norm on this project's CPUs (README, "Speed"): channels-last helps BatchNorm and the
# seed LayerNorm, while GroupNorm's CPU kernel is faster on NCHW in the seed and residual models.
# lnc normalises over the channels, which are contiguous in channels-last (NCHW costs a copy each way).
CHANNELS_LAST_BY_NORM = {"bn": True, "gn": False, "ln": True, "lnc": True, "lnchw": False}
# The ConvNeXt family trains channels-last with every norm: its float32 depthwise convs are 2-4x
# faster in that layout, which outweighs GroupNorm's preference (docs/convnext.md: 2.1x overall with gn).
CHANNELS_LAST_PRESETS = {"convnext"}


@dataclass
class Runtime:
    """Where and how tensors run: resolved once from the config and the machine."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    memory_format: torch.memory_format

    @property
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def describe(self) -> str:
        fmt = "channels_last" if self.memory_format == torch.channels_last else "nchw"
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')} {fmt} threads={torch.get_num_threads()}"

    def hardware(self) -> str:
        """The processor the run's seconds per epoch belong to: the GPU's name, else the CPU model."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# glibc serves each allocation above its mmap threshold (32 MB at most, by default) with a fresh mmap
# and unmaps it on free, so such a tensor is page-faulted in again at every step. The ConvNeXt's
# stage-1 expansion in float32 (batch 128 x 64 x 32 x 32 = 33.5 MB) is over it: on a CPU without
# bf16 a step spent most of its time in page faults (docs/speed.md). Kept in the heap instead.
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 1 << 30), "M_MMAP_THRESHOLD": (-3, 256 << 20)}
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own variables: a user's choice wins


def keep_large_allocations() -> bool:
    """Let glibc reuse freed tensors of up to 256 MB instead of returning them to the kernel; True
    if set. No-op off glibc, when the user set glibc's variables, or with BENCH_ALLOCATOR=default."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or os.environ.get("BENCH_ALLOCATOR") == "default":
        return False
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.values())


def setup_threads(threads: int | None = None) -> int:
    """Use the cores this process may run on (cgroup/affinity aware), unless told otherwise; large
    allocations stay in the heap (``keep_large_allocations``)."""
    keep_large_allocations()
    if threads is None:
        threads = settings.number("BENCH_THREADS") or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_runtime(cfg: TrainConfig, norm: str, device: torch.device | None = None, preset: str | None = None) -> Runtime:
    device = device or default_device()
    if cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device)):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    auto = preset in CHANNELS_LAST_PRESETS or CHANNELS_LAST_BY_NORM.get(norm, False)
    channels_last = {"on": True, "off": False}.get(cfg.channels_last, auto)
    return Runtime(device, dtype, torch.channels_last if channels_last else torch.contiguous_format)


def check_compiler(device: torch.device) -> None:
    """``torch.compile`` builds C++ kernels on the CPU: without a compiler it fails mid-run, so say so first."""
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if cxx):
        raise ConfigError("compile = true needs a C++ compiler for CPU kernels and none is on PATH; "
                          "install one (apt-get install g++) or set compile = false")


def pick_device(name: str | None = None) -> torch.device:
    """``--device``: the named device, else cuda when available."""
    return torch.device(name) if name else default_device()
