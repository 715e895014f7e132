"""The shipped corpus as a training dataset: its tokenizer (trained once, cached) and encoded train/val streams."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latentmoe.data.batching import encode_splits
from latentmoe.data.corpus import load_corpus
from latentmoe.data.tokenizer import load_or_train_tokenizer

CACHE_ENV = "LATENTMOE_CACHE"


@dataclass
class PreparedData:
    """A tokenizer and the encoded ``[N]`` train / validation token streams."""

    tokenizer: object
    train_ids: torch.Tensor
    val_ids: torch.Tensor


def default_cache_dir() -> Path:
    """Where tokenizers and encoded corpora are cached: ``$LATENTMOE_CACHE`` or ~/.cache/latentmoe."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentmoe")


def prepare_shipped_data(vocab_size: int, cache_dir: Path | None = None) -> PreparedData:
    """Tokenizer (trained once and cached) and the encoded train/validation token ids of the shipped corpus."""
    cache_dir = cache_dir or default_cache_dir()
    splits = load_corpus()
    tokenizer = load_or_train_tokenizer(vocab_size, cache_dir)
    tokens = encode_splits(tokenizer, splits, cache_dir)
    return PreparedData(tokenizer, tokens.train, tokens.val)
