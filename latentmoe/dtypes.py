"""Dtype names, once: the short names the command line and configs use, and the torch dtypes they mean.

FP8 formats themselves (E4M3 / E5M2, their largest values and scale rule) live in ``latentmoe.fp8.formats``.
"""

from __future__ import annotations

import torch

from latentmoe.fp8.formats import E4M3

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
    "fp8": E4M3.dtype,
}


def dtype_from_name(name: str, *, allowed: tuple[str, ...] | None = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype of a short name (``"bf16"``); ValueError naming ``what`` for anything else."""
    names = allowed or tuple(DTYPES)
    if name not in names:
        raise ValueError(f"{what} must be one of {', '.join(names)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype (``torch.bfloat16`` → ``"bf16"``), else torch's own name."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")
