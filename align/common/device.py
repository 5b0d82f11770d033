"""Device selection: cuda → mps → cpu, or whatever the user asked for."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from align.common.errors import AlignError


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``), or the best available one."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise AlignError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlignError(f"device {requested!r} asked for but CUDA is not available here: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AlignError(f"device {requested!r} asked for but MPS is not available here: use --device cpu")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes that ``device`` can still allocate: free GPU memory on CUDA, MemAvailable of the host otherwise
    (MPS shares it); None when it cannot be told."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing large blocks back to the OS.

    torch has no caching allocator on the CPU, and glibc serves every block above 32 MB with a fresh mmap: a pack
    of heads allocates tens of such tensors per step (gradients, θ + δ), each then page-faulted in anew.
    bench/bench_study.py measured packed SAM steps at 32 heads 1.6× faster with this (no change for one head).
    Process-wide and harmless elsewhere; a no-op (False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
