"""Paged latent KV cache: a shared pool of fixed-size blocks and one block table per sequence.

What is stored (DeepSeek-V3 TR §2.1.1; docs/mla-absorb.md): per layer and token, the normalised compressed
KV ``c^KV`` (``kv_lora_rank`` numbers) and the rotated decoupled key ``k^R`` (``qk_rope_head_dim``), side by
side in one row of width X = kv_lora_rank + qk_rope_head_dim — nothing per head. This is the layout
FlashMLA reads (576 = 512 + 64 for DeepSeek-V3).

    pool_LNbX  [layers, num_blocks, block_size, X]      one tensor for the whole engine
    scale_LNb  [layers, num_blocks, block_size]          fp32, only for the FP8 cache (one scale per token)
    block_tables: sequence id -> [block ids]             position p of a sequence lives in
                                                         block table[p // block_size], slot p % block_size

Sequences of any length share the pool; memory grows a block at a time with the tokens a sequence actually
holds; :meth:`PagedLatentCache.truncate` drops positions (rejected speculative drafts) and returns blocks
no longer needed, :meth:`PagedLatentCache.free` returns all of a finished sequence's blocks.

Cache dtypes: fp32, bf16, or FP8 E4M3 with a per-token fp32 scale (absmax / 448, the E4M3 maximum), which
halves bf16's bytes again (plus 4 bytes of scale per token and layer). Reads upcast to the compute dtype.

The model does not know about pages: :meth:`PagedLatentCache.view` gives a per-forward
:class:`PagedCacheView` with the ``write(layer, start_pos, kv_latent_BSC, k_rope_BSR)`` method MLA calls,
which stores the new rows and returns the batch's cached prefix gathered into ``[B, T, ·]`` tensors
(T = the longest sequence; shorter ones are masked by their start positions).
"""

from __future__ import annotations

import math

import torch

from latentmoe.config import ModelConfig
from latentmoe.dtypes import DTYPES
from latentmoe.fp8.formats import E4M3

CACHE_DTYPES = {name: DTYPES[name] for name in ("fp32", "bf16", "fp8")}
FP8_DTYPE = E4M3.dtype
FP8_MAX = E4M3.max  # 448
FP8_SCALE_DTYPE = torch.float32
MIN_SCALE = torch.finfo(torch.float32).tiny  # an all-zero row keeps a finite scale


def resolve_cache_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp8"`` or the torch dtype itself; anything else is a ValueError naming cache_dtype."""
    if isinstance(dtype, str):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        return CACHE_DTYPES[dtype]
    if dtype not in (*CACHE_DTYPES.values(), torch.float64):
        raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)} (or torch.float64), got {dtype}")
    return dtype


def latent_bytes_per_token(config: ModelConfig, *, num_layers: int, dtype: str | torch.dtype) -> int:
    """Bytes one token of one sequence takes in a cache of ``num_layers`` layers, from the formula (before
    anything is allocated): layers × ((kv_lora_rank + qk_rope_head_dim) × element size [+ the FP8 scale])."""
    dtype = resolve_cache_dtype(dtype)
    per_layer = (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize
    if dtype == FP8_DTYPE:
        per_layer += FP8_SCALE_DTYPE.itemsize
    return num_layers * per_layer


def contiguous_start(block_ids: list[int]) -> int | None:
    """The first id when ``block_ids`` are consecutive (``[7, 8, 9]`` → 7), else None (pure; host-side, so
    the check costs no device synchronisation)."""
    if block_ids and block_ids == list(range(block_ids[0], block_ids[0] + len(block_ids))):
        return block_ids[0]
    return None


def quantize_fp8_rows(x_NX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 rows with one fp32 scale per row: ``x ≈ q * scale``, scale = absmax / 448.

    Clamps explicitly before the cast (torch's CPU cast saturates, but that is not portable).
    """
    scale_N = (x_NX.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    q_NX = (x_NX.float() / scale_N[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q_NX, scale_N


def dequantize_fp8_rows(q_NX: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_rows` (any leading shape: ``q [..., X]``, ``scale [...]``)."""
    return (q_NX.to(torch.float32) * scale_N[..., None]).to(dtype)


class BlockAllocator:
    """Free list of block ids ``0 .. num_blocks-1``. Allocation and release are O(blocks)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"the cache pool has {len(self._free)} free blocks; {n} requested")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedLatentCache:
    """The block pool and block tables for ``num_layers`` layers (the main model's, then the MTP blocks').

    Sequences are identified by any hashable id. ``ensure(seq, n)`` makes room for positions ``[0, n)``;
    ``truncate(seq, n)`` keeps only ``[0, n)``; ``free(seq)`` returns every block.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int = 64,
        dtype: str | torch.dtype = torch.float32,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.dtype = resolve_cache_dtype(dtype)
        self.compute_dtype = compute_dtype
        self.kv_lora_rank = config.kv_lora_rank
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.block_size = block_size
        self.num_layers = num_layers
        self.allocator = BlockAllocator(num_blocks)
        self.pool_LNbX = torch.zeros(num_layers, num_blocks, block_size, self.width, dtype=self.dtype, device=device)
        self.scale_LNb = (
            torch.ones(num_layers, num_blocks, block_size, dtype=FP8_SCALE_DTYPE, device=device)
            if self.is_fp8
            else None
        )
        self.block_tables: dict[object, list[int]] = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_fp8(self) -> bool:
        return self.dtype == FP8_DTYPE

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def bytes_per_token(self, num_layers: int | None = None) -> int:
        """Bytes one token of one sequence occupies, measured from the allocated tensors, summed over the
        first ``num_layers`` layers (default all): layers × (X · element size [+ scale bytes])."""
        layers = self.num_layers if num_layers is None else num_layers
        per_layer = self.pool_LNbX[0, 0, 0].numel() * self.pool_LNbX.element_size()
        if self.scale_LNb is not None:
            per_layer += self.scale_LNb[0, 0, 0].numel() * self.scale_LNb.element_size()
        return layers * per_layer

    def add_sequence(self, seq_id: object) -> None:
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        self.block_tables[seq_id] = []

    def ensure(self, seq_id: object, num_tokens: int) -> None:
        """Allocate blocks so that positions ``[0, num_tokens)`` of ``seq_id`` have a slot."""
        table = self.block_tables[seq_id]
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocator.allocate(missing))

    def truncate(self, seq_id: object, num_tokens: int) -> None:
        """Drop positions ``>= num_tokens`` of ``seq_id``: blocks wholly past them go back to the pool."""
        table = self.block_tables[seq_id]
        keep = self.blocks_for(num_tokens)
        if len(table) > keep:
            self.allocator.release(table[keep:])
            del table[keep:]

    def free(self, seq_id: object) -> None:
        self.allocator.release(self.block_tables.pop(seq_id))

    def copy_prefix(self, src_id: object, dst_id: object, num_tokens: int, *, num_layers: int | None = None) -> None:
        """Copy positions ``[0, num_tokens)`` of the first ``num_layers`` layers from one sequence to another
        (identical prompts prefilled once). Whole blocks are copied; rows past ``num_tokens`` are garbage that
        the destination overwrites before it reads them."""
        n_blocks = self.blocks_for(num_tokens)
        self.ensure(dst_id, num_tokens)
        src = torch.tensor(self.block_tables[src_id][:n_blocks], dtype=torch.long, device=self.pool_LNbX.device)
        dst = torch.tensor(self.block_tables[dst_id][:n_blocks], dtype=torch.long, device=self.pool_LNbX.device)
        layers = self.num_layers if num_layers is None else num_layers
        pool = self.pool_LNbX.view(torch.uint8) if self.is_fp8 else self.pool_LNbX  # no fp8 index_copy_ on CPU
        pool[:layers].index_copy_(1, dst, pool[:layers].index_select(1, src))
        if self.scale_LNb is not None:
            self.scale_LNb[:layers].index_copy_(1, dst, self.scale_LNb[:layers].index_select(1, src))

    # ------------------------------------------------------------------ data
    def store(self, layer: int, slots_N: torch.Tensor, rows_NX: torch.Tensor) -> None:
        """Write rows ``[N, X]`` into flat slots (block · block_size + offset) of ``layer``."""
        flat = self.pool_LNbX[layer].view(-1, self.width)
        if self.is_fp8:
            q_NX, scale_N = quantize_fp8_rows(rows_NX)
            flat[slots_N] = q_NX
            self.scale_LNb[layer].view(-1)[slots_N] = scale_N
        else:
            flat[slots_N] = rows_NX.to(self.dtype)

    def load(self, layer: int, block_table_BN: torch.Tensor, *, first_block: int | None = None) -> torch.Tensor:
        """The rows of the blocks in ``block_table_BN``, as ``[B, N·block_size, X]`` in the compute dtype.

        ``first_block``: set when the table is one row of consecutive blocks starting there
        (:func:`contiguous_start`); those rows are then sliced, not gathered.
        """
        B, N = block_table_BN.shape
        pool_NbX = self.pool_LNbX[layer]
        if B == 1 and N and first_block is not None:
            rows = pool_NbX[first_block : first_block + N].reshape(1, N * self.block_size, self.width)  # a view
            scale = self.scale_LNb[layer, first_block : first_block + N].reshape(1, -1) if self.is_fp8 else None
        else:  # index_select: ~4x faster than advanced indexing for this gather on CPU
            flat_blocks = block_table_BN.flatten()
            rows = pool_NbX.index_select(0, flat_blocks).view(B, N * self.block_size, self.width)
            scale = self.scale_LNb[layer].index_select(0, flat_blocks).view(B, -1) if self.is_fp8 else None
        if scale is not None:
            return dequantize_fp8_rows(rows, scale, self.compute_dtype)
        return rows.to(self.compute_dtype)

    def read(self, layer: int, seq_id: object, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv_latent [T, C], k_rope [T, R])`` of one sequence's first ``num_tokens`` positions."""
        blocks = self.block_tables[seq_id][: self.blocks_for(num_tokens)]
        table = torch.tensor([blocks], dtype=torch.long, device=self.pool_LNbX.device)
        rows_TX = self.load(layer, table, first_block=contiguous_start(blocks))[0, :num_tokens]
        return rows_TX[:, : self.kv_lora_rank], rows_TX[:, self.kv_lora_rank :]

    def view(self, seq_ids: list[object], start_pos_B: torch.Tensor, num_new: int) -> PagedCacheView:
        """A cache for one forward of ``num_new`` tokens per sequence at positions ``start_pos_B[b] + s``.

        Blocks must already cover those positions (:meth:`ensure`).
        """
        return PagedCacheView(self, [self.block_tables[s] for s in seq_ids], start_pos_B, num_new)


class PagedCacheView:
    """What MLA sees during one forward: ``write(layer, start_pos, kv_latent_BSC, k_rope_BSR)`` stores the
    new rows of every sequence into its blocks and returns ``(kv_latent_BTC, k_rope_BTR)``, the cached
    prefixes of the batch gathered and right-padded to T = max(start + S) (padding is masked by MLA)."""

    def __init__(self, cache: PagedLatentCache, block_tables: list[list[int]], start_pos_B: torch.Tensor, num_new: int):
        self.cache = cache
        self.start_pos_B = start_pos_B
        bs = cache.block_size
        self.length = int((start_pos_B + num_new).max())
        n_blocks = cache.blocks_for(self.length)
        for table, start in zip(block_tables, start_pos_B.tolist(), strict=True):
            if len(table) < cache.blocks_for(start + num_new):
                raise ValueError(f"a block table of {len(table)} blocks does not cover position "
                                 f"{start + num_new - 1}; call ensure() first")
        rows = [table[:n_blocks] + [0] * (n_blocks - len(table[:n_blocks])) for table in block_tables]
        self.first_block = contiguous_start(rows[0]) if len(rows) == 1 else None
        # built on the host and copied once: the tables are Python lists
        self.block_table_BN = torch.tensor(rows, dtype=torch.long).to(start_pos_B.device)
        positions_BS = start_pos_B[:, None] + torch.arange(num_new, device=start_pos_B.device)[None, :]
        blocks_BS = self.block_table_BN.gather(1, positions_BS // bs)
        self.slots_N = (blocks_BS * bs + positions_BS % bs).flatten()

    def write(
        self, layer: int, start_pos: torch.Tensor, kv_latent_BSC: torch.Tensor, k_rope_BSR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if start_pos is not self.start_pos_B:
            raise ValueError("start_pos must be the tensor this view was made for")
        rows_NX = torch.cat([kv_latent_BSC, k_rope_BSR.to(kv_latent_BSC.dtype)], dim=-1).flatten(0, 1)
        self.cache.store(layer, self.slots_N, rows_NX)
        rows_BTX = self.cache.load(layer, self.block_table_BN, first_block=self.first_block)[:, : self.length]
        C = self.cache.kv_lora_rank
        return rows_BTX[..., :C], rows_BTX[..., C:]
