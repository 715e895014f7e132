"""Load a model for inference from whatever a user points at: one of our checkpoints, a run directory (its
newest checkpoint) or a Hugging Face DeepSeek-V3/V2 directory, with its tokenizer.

    from latentmoe import load
    model, tokenizer = load("runs/demo")                 # or "hf-small", or "runs/demo/checkpoint-000200"
    model, tokenizer = load("hf-small", device="auto", dtype=torch.bfloat16)

The model is built on the meta device and materialised straight on the target device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from latentmoe.checkpoint import TOKENIZER_FILE, CheckpointError, find_tokenizer, load_model, resolve_checkpoint
from latentmoe.checkpoint.tensors import first_nonfinite
from latentmoe.device import resolve_device
from latentmoe.hf.errors import HFCheckpointError


def check_finite(model, source: Path) -> None:
    """Weights holding NaN or inf would sample garbage (or fail deep inside sampling): refuse them up front."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {bad} holds NaN or inf (a damaged or diverged checkpoint)")


def check_vocabulary(tokenizer, vocab_size: int, source: Path) -> None:
    """A tokenizer must not produce ids the model has no embedding for."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    size = inner.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}"
        )


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer :func:`load` would return for ``path``, without reading any weights (a server front end
    that tokenizes while worker processes hold the model). CheckpointError / HFCheckpointError as ``load``."""
    from latentmoe.checkpoint import load_config
    from latentmoe.hf import is_hf_checkpoint
    from latentmoe.hf import load_tokenizer as load_hf_tokenizer
    from latentmoe.hf.tokenizer import load_run_tokenizer

    path = Path(path)
    if is_hf_checkpoint(path):
        tokenizer = load_hf_tokenizer(path)
        if tokenizer is None:
            raise HFCheckpointError(f"no {TOKENIZER_FILE} in {path}")
        return tokenizer
    ckpt = resolve_checkpoint(path)
    return load_run_tokenizer(ckpt, config=load_config(ckpt)) or find_tokenizer(ckpt)


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """``(model, tokenizer)`` from a checkpoint, run or Hugging Face directory (see the module docstring).

    device: "auto" | "cpu" | "cuda[:N]" or a torch.device (default the host). dtype: parameter dtype (FP8
    weights of an HF checkpoint are dequantised to it). Errors (missing files, corrupt weights, a tokenizer
    larger than the vocabulary) are :class:`CheckpointError` / :class:`HFCheckpointError` naming the file."""
    from latentmoe.hf import is_hf_checkpoint, load_pretrained, load_tokenizer

    path = Path(path)
    target = resolve_device(device) if device is not None else None
    if is_hf_checkpoint(path):
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise HFCheckpointError(f"no {TOKENIZER_FILE} in {path}")
        model = load_pretrained(path, dtype=dtype, device=target)
        check_finite(model, path)
        check_vocabulary(tokenizer, model.config.vocab_size, path / TOKENIZER_FILE)
        return model, tokenizer
    from latentmoe.hf.tokenizer import load_run_tokenizer

    ckpt = resolve_checkpoint(path)
    model, _ = load_model(ckpt, device=target, dtype=dtype)
    # an HFTokenizer with our prompt rule (BOS first) and the run's chat template when it has one
    tokenizer = load_run_tokenizer(ckpt, config=model.config) or find_tokenizer(ckpt)
    check_finite(model, ckpt)
    check_vocabulary(tokenizer, model.config.vocab_size, ckpt)
    return model, tokenizer
