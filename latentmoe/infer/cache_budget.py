"""How big the engine's block pool is: from a memory budget, or an explicit block count — pure functions.

The pool is allocated once, in the engine's constructor, so its size is a decision made before any request
arrives. It is made from bytes, not from the model's context length: DeepSeek-V3's 163,840 positions × 16
sequences would be ~187 GB of bf16 latent cache, far more than a machine has.

    bytes per block = layers × block_size × (C + R) × element size  (+ layers × block_size × 4 for FP8 scales)
    blocks          = min(budget // bytes per block,  max_batch × (ceil(max_model_len / block_size) + 1))

The cap is the most the engine could ever use: ``max_batch`` sequences of ``max_model_len`` tokens, plus one
spare block each for the positions speculative decoding touches past a request's end. The default budget
is :data:`DEFAULT_CACHE_MEMORY_FRACTION` of the memory available on the cache's device when the engine is
built (free accelerator memory, or the host's available RAM — see ``latentmoe.device``); the weights are
already loaded by then, so the fraction is of what is left. ``parse_memory_size("2GiB")`` reads the sizes a
user types (``--cache-memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from latentmoe.io import format_bytes, parse_size

DEFAULT_CACHE_MEMORY_FRACTION = 0.25  # of available memory: room for activations, other processes, the OS
SPARE_BLOCKS_PER_SEQUENCE = 1  # speculative verification / draft windows run a few positions past the end

def parse_memory_size(text: str) -> int:
    """Bytes in ``text``: a number and an optional unit — B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
    (powers of 1024), any case: ``"2GiB"`` → 2147483648, ``"1.5GB"`` → 1500000000, ``"4096"`` → 4096.
    Anything else, or a size under one byte, is a ValueError quoting the text (``latentmoe.io.parse_size``)."""
    if not isinstance(text, str):
        raise ValueError(f"memory size {text!r} is not a size like 2GiB, 512MiB or 1.5GB")
    return parse_size(text, what="memory size")


@dataclass(frozen=True)
class CachePool:
    """The size of an engine's cache pool, as chosen. ``budget_bytes`` is the budget it was cut from (None
    when ``num_blocks`` was given); ``capped`` says the full-context cap, not the budget, set the size."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    budget_bytes: int | None = None
    capped: bool = False

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        """One line for a start-up message: blocks, tokens, bytes."""
        return (f"{self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
                f"{format_bytes(self.num_bytes)}")


def max_useful_blocks(*, max_batch: int, max_model_len: int, block_size: int) -> int:
    """The most blocks ``max_batch`` sequences of ``max_model_len`` tokens can hold at once."""
    return max_batch * (math.ceil(max_model_len / block_size) + SPARE_BLOCKS_PER_SEQUENCE)


def default_cache_budget(available_bytes: int, fraction: float = DEFAULT_CACHE_MEMORY_FRACTION) -> int:
    """The budget when none is given: ``fraction`` of the memory available now."""
    return int(available_bytes * fraction)


def size_cache_pool(
    *,
    bytes_per_block: int,
    block_size: int,
    max_batch: int,
    max_model_len: int,
    budget_bytes: int | None = None,
    num_blocks: int | None = None,
) -> CachePool:
    """The pool for an explicit ``num_blocks`` (taken as given) or for ``budget_bytes`` (as many whole blocks
    as fit, capped at :func:`max_useful_blocks`). Exactly one of the two must be given; a budget smaller
    than one block is a ValueError naming cache_memory_bytes."""
    if (budget_bytes is None) == (num_blocks is None):
        raise ValueError("cache_memory_bytes / num_blocks: give exactly one of them")
    if num_blocks is not None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return CachePool(num_blocks=num_blocks, block_size=block_size, bytes_per_block=bytes_per_block)
    fit = budget_bytes // bytes_per_block
    if fit < 1:
        raise ValueError(
            f"cache_memory_bytes: a budget of {budget_bytes} bytes holds no cache block "
            f"(one block of {block_size} tokens is {bytes_per_block} bytes)"
        )
    cap = max_useful_blocks(max_batch=max_batch, max_model_len=max_model_len, block_size=block_size)
    return CachePool(num_blocks=min(fit, cap), block_size=block_size, bytes_per_block=bytes_per_block,
                     budget_bytes=budget_bytes, capped=cap < fit)
