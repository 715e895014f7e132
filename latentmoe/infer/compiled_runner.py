"""The model runner with the compiled static-shape decode, verify and draft steps (decode_step.py).

:class:`CompiledRunner` keeps :class:`~latentmoe.infer.runner.ModelRunner`'s contract and overrides the forwards
that run every step — ``decode`` (one token per sequence), ``verify`` (1 + drafts per sequence) and the MTP
modules' draft windows (``_mtp``) — with :class:`~latentmoe.infer.decode_step.StaticStep` and
:class:`~latentmoe.infer.decode_step.StaticDraft`; prefill stays the reference's, and so does a draft window
wider than ``MAX_STATIC_DRAFT_WINDOW`` (the first draft after a prefill re-reads the whole prompt) and a batch
whose cached rows pass ``MAX_STATIC_GATHER_BYTES`` a layer (there the reference is faster). Each call:

1. pads the batch to its bucket (``bucket``), each block table to the bucket of the longest cached length
   (``block_bucket``);
2. runs the step (``torch.compile``d, ``dynamic=False``: one graph per (B, S, blocks) bucket, compiled on
   first use; inductor's on-disk cache keeps the compiled code across processes);
3. writes the step's new cache rows of the real positions into the pool in one ``index_copy_`` and samples.

``compile=False`` runs the same static steps eagerly (what the tests compare the compiled graphs against).
When compiling fails (no C++ compiler, an unsupported backend) or the cache is FP8 (the step reads fp32/bf16
rows), the runner says why in ``fallback_reason`` and every call takes the eager reference path instead.
"""

from __future__ import annotations

import logging
import time
from types import MappingProxyType

import torch

from latentmoe.infer.decode_step import StaticDraft, StaticStep, block_bucket, bucket, gather_bytes
from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.request import Request
from latentmoe.infer.runner import DEFAULT_PREFILL_CHUNK, PAD_TOKEN_ID, ModelRunner, Verification
from latentmoe.infer.speculative import DraftPlan
from latentmoe.model.transformer import CausalLM

log = logging.getLogger(__name__)

# inductor options (read-only). A C++ wrapper calls the kernels: ~20% off a step. The decompose_mm pass turns
# matrix-vector products (one row: batch 1) up to 2,048 wide into inductor's own fused reductions instead of
# BLAS calls: in bf16 oneDNN's one-row GEMMs ran 3x slower than fp32's. Its width limit is read when torch
# imports the pass, before any compile option applies, so options cannot raise it: the vocabulary-wide head
# is written as a reduction in the step itself (decode_step.head_logits)
COMPILE_OPTIONS = MappingProxyType({"cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}})
RECOMPILE_LIMIT = 256  # graphs per step function: buckets of batch x new tokens x cache blocks
MAX_STATIC_DRAFT_WINDOW = 8  # wider draft windows (a prompt's first draft) run the reference: one graph each
# Batches whose cached rows exceed this per layer run the reference runner: the static step copies every row
# before reading it twice, and at batch 16 x 4,096 rows (21 MiB a layer) that made it slower than the
# reference (309 vs 459 tok/s, benchmarks/decode.py); at 2.6 MiB (batch 16 x 512) it was faster (1,276 vs 859)
MAX_STATIC_GATHER_BYTES = 8 * 2**20


class CompiledRunner(ModelRunner):
    """``ModelRunner`` with the static-shape steps for decode, verify and draft (see the module docstring).

    Args: as ``ModelRunner``, plus ``max_batch`` (the largest batch bucket) and ``compile`` (False: the static
    steps run eagerly). ``compile_seconds`` maps each compiled bucket to the wall time of its first call
    (compilation included): ``(B, S, blocks)`` for the main step, ``("mtpK", B, W, blocks)`` for module K's.
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
        self.drafts = [StaticDraft(model, depth) for depth in range(1, len(model.mtp) + 1)]
        self.compile = compile
        self.compile_seconds: dict[tuple, float] = {}
        self.fallback_reason: str | None = "the cache is FP8 (the static step reads fp32/bf16 rows)" if cache.is_fp8 \
            else None
        self._compiled = self._compiled_drafts = None
        if compile:
            options = dict(COMPILE_OPTIONS) or None
            self._compiled = torch.compile(self.step, dynamic=False, fullgraph=True, options=options)
            self._compiled_drafts = [torch.compile(d, dynamic=False, fullgraph=True, options=options)
                                     for d in self.drafts]
        self._layers = model.config.num_hidden_layers

    # ------------------------------------------------------------------ the step
    def _run(self, eager, compiled, args, key):
        """``compiled(*args)`` (``eager(*args)`` when not compiling); None when compilation fails on the first
        graph, with the reason kept in ``fallback_reason``. ``key`` names the graph in ``compile_seconds``."""
        if compiled is None:
            return eager(*args)
        if key in self.compile_seconds:  # compiled before: no recompilation, so no limit to raise
            return compiled(*args)
        t0 = time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = compiled(*args)
        except Exception as exc:  # compilation unavailable here: say so once, then run the eager reference
            if self.compile_seconds:
                raise
            self.fallback_reason = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            log.warning("compiled decode step unavailable, running eagerly: %s", self.fallback_reason)
            return None
        self.compile_seconds[key] = time.perf_counter() - t0
        return out

    def _padded_tables(self, batch: list[Request], lengths: list[int], Bp: int) -> torch.Tensor | None:
        """Block tables ``[Bp, N]`` covering each sequence's ``lengths[b]`` cached rows, N the block bucket of the
        longest; padding entries (and padding sequences) point at block 0, masked by their lengths. None when
        the rows a layer would gather exceed ``MAX_STATIC_GATHER_BYTES`` (the reference is faster there)."""
        cache = self.cache
        N = block_bucket(max(1, *(cache.blocks_for(n) for n in lengths)), cache.num_blocks)
        if gather_bytes(cache.pool_LNbX, Bp, N) > MAX_STATIC_GATHER_BYTES:
            return None
        tables = [cache.block_tables[r.request_id][:N] for r in batch]
        return self._tensor([t + [0] * (N - len(t)) for t in tables] + [[0] * N] * (Bp - len(batch)))

    def _write(self, layers: slice, new_LnX: torch.Tensor, slots: list[int]) -> None:
        """Write rows ``new_LnX[l, i]`` of cache layers ``layers`` at pool slots ``slots[i]``."""
        cache = self.cache
        flat = cache.pool_LNbX.view(cache.num_layers, -1, cache.width)[layers]
        flat.index_copy_(1, self._tensor(slots), new_LnX.to(cache.dtype))

    def _slot(self, request: Request, position: int) -> int:
        bs = self.cache.block_size
        return self.cache.block_tables[request.request_id][position // bs] * bs + position % bs

    def _static(self, batch: list[Request], ids: list[list[int]], real_B: list[int]):
        """Run the step for ``batch`` feeding ``ids[b]`` (all of one length S) at positions ``num_cached + s``;
        rows of the first ``real_B[b]`` positions go into the cache. Returns (logits, hidden) of the real
        sequences, or None when the step is unavailable."""
        if self.fallback_reason is not None:
            return None
        cache = self.cache
        B, S = len(batch), len(ids[0])
        Bp = bucket(B, max(self.max_batch, B))
        lengths = [r.num_cached for r in batch]
        table_BN = self._padded_tables(batch, lengths, Bp)
        if table_BN is None:
            return None
        for r, n in zip(batch, real_B, strict=True):
            cache.ensure(r.request_id, r.num_cached + n)
        ids_BS = self._tensor(ids + [[PAD_TOKEN_ID] * S] * (Bp - B))
        lengths_B = self._tensor(lengths + [0] * (Bp - B))
        out = self._run(self.step, self._compiled, (ids_BS, lengths_B, table_BN, cache.pool_LNbX),
                        (Bp, S, table_BN.shape[1]))
        if out is None:
            return None
        logits_BSV, hidden_BSD, new_LBSX = out
        slots, picks = [], []
        for b, (r, n) in enumerate(zip(batch, real_B, strict=True)):
            for s in range(n):
                slots.append(self._slot(r, r.num_cached + s))
                picks.append(b * S + s)
        self._write(slice(0, self._layers), new_LBSX.flatten(1, 2)[:, self._tensor(picks)], slots)
        return logits_BSV[:B], hidden_BSD[:B]

    def _mtp(self, batch, depth, prev_BWD, ids_BW, start_B):
        """The draft window through :class:`StaticDraft` (every window row written, as the reference does);
        the reference for windows wider than ``MAX_STATIC_DRAFT_WINDOW`` or when the step is unavailable."""
        B, W = len(batch), len(ids_BW[0])
        if self.fallback_reason is not None or W > MAX_STATIC_DRAFT_WINDOW:
            return super()._mtp(batch, depth, prev_BWD, ids_BW, start_B)
        Bp = bucket(B, max(self.max_batch, B))
        table_BN = self._padded_tables(batch, start_B, Bp)
        if table_BN is None:
            return super()._mtp(batch, depth, prev_BWD, ids_BW, start_B)
        prev_BWD = torch.cat([prev_BWD, prev_BWD.new_zeros(Bp - B, *prev_BWD.shape[1:])])
        ids = self._tensor(ids_BW + [[PAD_TOKEN_ID] * W] * (Bp - B))
        compiled = self._compiled_drafts[depth - 1] if self._compiled_drafts is not None else None
        args = (prev_BWD, ids, self._tensor(start_B + [0] * (Bp - B)), table_BN, self.cache.pool_LNbX)
        out = self._run(self.drafts[depth - 1], compiled, args, (f"mtp{depth}", Bp, W, table_BN.shape[1]))
        if out is None:
            return super()._mtp(batch, depth, prev_BWD[:B], ids_BW, start_B)
        hidden_BWD, logits_BWV, new_BWX = out
        slots = [self._slot(r, start + w) for r, start in zip(batch, start_B, strict=True) for w in range(W)]
        layer = self.drafts[depth - 1].layer
        self._write(slice(layer, layer + 1), new_BWX[:B].flatten(0, 1)[None], slots)
        return hidden_BWD[:B], logits_BWV[:B]

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
