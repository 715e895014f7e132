"""The one exception of :mod:`latentmoe.hf`."""

from __future__ import annotations


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint directory is unusable; the one-line message names the file (and the tensor or key)."""
