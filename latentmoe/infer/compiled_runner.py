"""The model runner with the compiled static-shape decode and verify step (decode_step.py).

:class:`CompiledRunner` keeps :class:`~latentmoe.infer.runner.ModelRunner`'s contract and overrides the two
forwards that run every step — ``decode`` (one token per sequence) and ``verify`` (1 + drafts per sequence) —
with :class:`~latentmoe.infer.decode_step.StaticStep`; prefill and drafting stay the reference's. Each call:

1. pads the batch to its bucket (``bucket``), each block table to the bucket of the longest cached length
   (``block_bucket``);
2. runs the step (``torch.compile``d, ``dynamic=False``: one graph per (B, S, blocks) bucket, compiled on
   first use; inductor's on-disk cache keeps the compiled code across processes);
3. writes the step's new cache rows of the real positions into the pool in one ``index_copy_`` and samples.

``compile=False`` runs the same static step eagerly (what the tests compare the compiled graph against).
When compiling fails (no C++ compiler, an unsupported backend) or the cache is FP8 (the step reads fp32/bf16
rows), the runner says why in ``fallback_reason`` and every call takes the eager reference path instead.
"""

from __future__ import annotations

import logging
import time

import torch

from latentmoe.infer.decode_step import StaticStep, block_bucket, bucket
from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.request import Request
from latentmoe.infer.runner import DEFAULT_PREFILL_CHUNK, PAD_TOKEN_ID, ModelRunner, Verification
from latentmoe.infer.speculative import DraftPlan
from latentmoe.model.transformer import CausalLM

log = logging.getLogger(__name__)

COMPILE_OPTIONS: dict[str, object] = {"cpp_wrapper": True}  # a C++ wrapper calls the kernels: ~20% off a step
RECOMPILE_LIMIT = 256  # graphs per step function: buckets of batch x new tokens x cache blocks


class CompiledRunner(ModelRunner):
    """``ModelRunner`` with the static-shape step for decode and verify (see the module docstring).

    Args: as ``ModelRunner``, plus ``max_batch`` (the largest batch bucket) and ``compile`` (False: the static
    step runs eagerly). ``compile_seconds`` maps each compiled bucket ``(B, S, blocks)`` to the wall time of
    its first call (compilation included).
    """

    def __init__(
        self,
        model: CausalLM,
        cache: PagedLatentCache,
        *,
        device: torch.device,
        attention: str = "auto",
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_batch: int = 16,
        compile: bool = True,
    ):
        super().__init__(model, cache, device=device, attention=attention, prefill_chunk=prefill_chunk)
        self.max_batch = max_batch
        self.step = StaticStep(model)
        self.compile = compile
        self.compile_seconds: dict[tuple[int, int, int], float] = {}
        self.fallback_reason: str | None = "the cache is FP8 (the static step reads fp32/bf16 rows)" if cache.is_fp8 \
            else None
        self._compiled = torch.compile(self.step, dynamic=False, fullgraph=True,
                                       options=dict(COMPILE_OPTIONS) or None) if compile else None
        self._layers = model.config.num_hidden_layers

    # ------------------------------------------------------------------ the step
    def _run(self, ids_BS, lengths_B, table_BN, key):
        pool = self.cache.pool_LNbX
        if self._compiled is None:
            return self.step(ids_BS, lengths_B, table_BN, pool)
        if key in self.compile_seconds:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self._compiled(ids_BS, lengths_B, table_BN, pool)
        t0 = time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = self._compiled(ids_BS, lengths_B, table_BN, pool)
        except Exception as exc:  # compilation unavailable here: say so once, then run the eager reference
            if self.compile_seconds:
                raise
            self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            log.warning("compiled decode step unavailable, running eagerly: %s", self.fallback_reason)
            return None
        self.compile_seconds[key] = time.perf_counter() - t0
        return out

    def _static(self, batch: list[Request], ids: list[list[int]], real_B: list[int]):
        """Run the step for ``batch`` feeding ``ids[b]`` (all of one length S) at positions ``num_cached + s``;
        rows of the first ``real_B[b]`` positions go into the cache. Returns (logits, hidden) of the real
        sequences, or None when the step is unavailable."""
        if self.fallback_reason is not None:
            return None
        cache, bs = self.cache, self.cache.block_size
        B, S = len(batch), len(ids[0])
        Bp = bucket(B, max(self.max_batch, B))
        for r, n in zip(batch, real_B, strict=True):
            cache.ensure(r.request_id, r.num_cached + n)
        lengths = [r.num_cached for r in batch]
        N = block_bucket(max(1, *(cache.blocks_for(n) for n in lengths)), cache.num_blocks)
        tables = [cache.block_tables[r.request_id][:N] for r in batch]
        rows = [t + [0] * (N - len(t)) for t in tables] + [[0] * N] * (Bp - B)
        ids_BS = self._tensor(ids + [[PAD_TOKEN_ID] * S] * (Bp - B))
        out = self._run(ids_BS, self._tensor(lengths + [0] * (Bp - B)), self._tensor(rows), (Bp, S, N))
        if out is None:
            return None
        logits_BSV, hidden_BSD, new_LBSX = out
        slots, picks = [], []
        for b, (r, n) in enumerate(zip(batch, real_B, strict=True)):
            table = cache.block_tables[r.request_id]
            for s in range(n):
                p = r.num_cached + s
                slots.append(table[p // bs] * bs + p % bs)
                picks.append(b * S + s)
        new_LnX = new_LBSX.flatten(1, 2)[:, self._tensor(picks)]
        flat = cache.pool_LNbX.view(cache.num_layers, -1, cache.width)[: self._layers]
        flat.index_copy_(1, self._tensor(slots), new_LnX.to(cache.dtype))
        return logits_BSV[:B], hidden_BSD[:B]

    # ------------------------------------------------------------------ decode / verify
    @torch.no_grad()
    def decode(self, batch: list[Request]) -> list[int]:
        out = self._static(batch, [[r.tokens[-1]] for r in batch], [1] * len(batch))
        if out is None:
            return super().decode(batch)
        logits_BSV, _ = out
        tokens = []
        for b, r in enumerate(batch):
            r.num_cached += 1
            tokens.append(self._sample(r, logits_BSV[b, -1:]))
        return tokens

    @torch.no_grad()
    def verify(self, batch: list[Request], plan: DraftPlan) -> list[Verification]:
        """Every request's own drafts, padded to the plan's count, in one static step."""
        K = plan.num_draft_tokens
        ids = [[r.tokens[-1], *r.drafts, *[PAD_TOKEN_ID] * (K - len(r.drafts))] for r in batch]
        out = self._static(batch, ids, [1 + len(r.drafts) for r in batch])
        if out is None:
            return super().verify(batch, plan)
        logits_BSV, hidden_BSD = out
        return [self._accept(r, plan, logits_BSV[b], hidden_BSD[b]) for b, r in enumerate(batch)]
