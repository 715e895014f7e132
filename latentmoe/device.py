"""Device selection: the one place that names device kinds.

``resolve_device(spec)`` turns what a user writes (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a
``torch.device`` or None) into a ``torch.device``; everything else takes the device it is handed (or the
model's) and never spells a device kind itself. ``available_memory_bytes(device)`` is what a memory budget
(the inference engine's cache pool) may start from: free accelerator memory, or the host's available RAM.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"
CPU = "cpu"
CUDA = "cuda"
MEMINFO = "/proc/meminfo"
MEMINFO_AVAILABLE = "MemAvailable:"
KIB = 1024  # /proc/meminfo counts in kB, which there means KiB


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """``"auto"`` (or None): the first CUDA device when one is available, else the CPU; ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"`` as written. A ``torch.device`` passes through (a CUDA one gets its index and
    is checked like a string; any other kind, such as meta, is taken as given). A CUDA spec without a
    usable CUDA device, or an unknown string, is a ValueError naming ``device``."""
    if spec is None or spec == AUTO:
        return torch.device(CUDA, 0) if torch.cuda.is_available() else torch.device(CPU)
    if isinstance(spec, torch.device):
        device = spec
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from exc
        if device.type not in (CPU, CUDA):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == CUDA:
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} asked for CUDA, but torch sees no CUDA device")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec!r} asked for CUDA device {index}; there are {torch.cuda.device_count()}")
        device = torch.device(CUDA, index)
    return device


def is_accelerator(device: torch.device) -> bool:
    """True for a CUDA device (whose memory is not the host's)."""
    return device.type == CUDA


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can use now: free CUDA memory for a CUDA device; for anything
    else (the CPU, and the meta device, whose stand-in for real memory is the host's) the host's available
    RAM — ``MemAvailable`` from /proc/meminfo, or free physical pages where that file does not exist."""
    if is_accelerator(device):
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith(MEMINFO_AVAILABLE):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
