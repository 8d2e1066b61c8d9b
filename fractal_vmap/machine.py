"""The machine a run or a measurement ran on (the CPU's model, the device's name, recorded in run dirs and bench
reports), and the C allocator's tuning that every command applies at start (tune_allocator).
"""

import ctypes
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `cli` (tune_allocator) must start without it
    import torch


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's (Linux), else what platform knows (empty on many Linux boxes)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def device_slug(device: "torch.device") -> str:
    """A file-name-safe device name: e.g. cpu-2core, nvidia-h100-80gb-hbm3."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_allocator() -> None:
    """Keep freed memory in the C heap. By default glibc maps every block over its mmap threshold afresh and unmaps it
    on free, so each multi-MB tensor, made anew every step, page-faults all its pages in again: on the 2-core CPU
    that cost 15-20% of a grid row (16 lanes of the default model) and ~10% of a finetune run. 32 MiB is glibc's
    largest mmap threshold; the heap keeps up to 1 GiB of free memory before trimming. Linux (glibc) only."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)
