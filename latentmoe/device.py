"""Which device runs what: the one place that names devices.

Every command takes ``--device auto|cpu|cuda|cuda:N`` and every library entry point a ``device=`` argument;
both end here. ``auto`` is the first CUDA device when torch sees one, else the CPU. Under torchrun each rank
uses ``cuda:LOCAL_RANK`` (NCCL) when CUDA is available, else the CPU (gloo): :func:`rank_device`.

The rest of the package never spells a device name: it asks for :data:`HOST` (where host-side bookkeeping,
generators and file I/O live), :func:`resolve_device`, or a tensor's own ``.device``.
"""

from __future__ import annotations

import re

import torch

AUTO = "auto"
CPU_TYPE = "cpu"
CUDA_TYPE = "cuda"
HOST = torch.device(CPU_TYPE)
META = torch.device("meta")
DEVICE_CHOICES = (AUTO, CPU_TYPE, CUDA_TYPE, f"{CUDA_TYPE}:N")
_SPEC_RE = re.compile(rf"^(?:{AUTO}|{CPU_TYPE}|{CUDA_TYPE}(?::\d+)?)$")


class DeviceError(ValueError):
    """A device spec is malformed or names a device this machine does not have."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(spec: str | torch.device | None = AUTO) -> torch.device:
    """``"auto"`` (or None) → cuda:0 when available, else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given, checked
    to exist; a ``torch.device`` passes through (checked the same way)."""
    if spec is None:
        spec = AUTO
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = str(spec).strip().lower()
        if not _SPEC_RE.match(text):
            raise DeviceError(f"device {spec!r} is not one of {', '.join(DEVICE_CHOICES)}")
        if text == AUTO:
            return torch.device(CUDA_TYPE, 0) if cuda_available() else HOST
        device = torch.device(text)
    if device.type == CUDA_TYPE:
        if not cuda_available():
            raise DeviceError(f"device {spec!r}: this torch build or machine has no CUDA device")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(CUDA_TYPE, index)
    return device


def rank_device(local_rank: int, spec: str | torch.device | None = AUTO) -> torch.device:
    """The device of a torchrun rank: ``cuda:(local_rank mod visible GPUs)`` for auto/cuda when CUDA is available,
    else the CPU; an explicit ``cuda:N`` is kept as given."""
    device = resolve_device(spec)
    if device.type == CUDA_TYPE and (spec is None or str(spec) in (AUTO, CUDA_TYPE)):
        return torch.device(CUDA_TYPE, local_rank % torch.cuda.device_count())
    return device


def is_cuda(device: torch.device) -> bool:
    return device.type == CUDA_TYPE


def collective_backend(device: torch.device) -> str:
    """torch.distributed backend for tensors on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if is_cuda(device) else "gloo"


def set_current(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (NCCL collectives and ``torch.cuda`` calls use it); no-op on CPU."""
    if is_cuda(device):
        torch.cuda.set_device(device)


MEMINFO = "/proc/meminfo"
MEMINFO_AVAILABLE = "MemAvailable:"
MEMINFO_UNIT = 1024  # /proc/meminfo counts in kB, which there means KiB


def available_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can use now: free CUDA memory for a CUDA device; for anything else
    (the CPU, and the meta device, whose stand-in for real memory is the host's) the host's available RAM —
    ``MemAvailable`` from /proc/meminfo, or free physical pages where that file does not exist."""
    import os

    if is_cuda(device):
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith(MEMINFO_AVAILABLE):
                    return int(line.split()[1]) * MEMINFO_UNIT
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
