"""The static-shape decode step: one fixed graph per (batch bucket, new tokens, cache blocks), compiled.

A decode step of an eager ``CausalLM`` is hundreds of small PyTorch ops, and at the ``small`` preset's size
their per-op overhead, not memory, sets the pace. :class:`StaticStep` is the same function written so that
no shape depends on the data, which lets ``torch.compile`` (inductor, ``dynamic=False``) fuse it into a few
kernels:

    ids [B, S] ──embed──▶ for each layer: absorbed MLA over the paged latent cache ──▶ MoE ──▶ norm ──▶ head
                                           (block-table gather + length mask)       (no routing-dependent shapes)

* **Batch buckets.** B running sequences are padded to the next power of two (capped at ``max_batch``);
  padding rows have length 0 and their outputs are dropped.
* **Cache buckets.** Each sequence's cached rows are read through its block table, padded to the block bucket
  of the longest (:func:`block_bucket`: at most a quarter more blocks than needed); keys at or past a
  sequence's own length are masked. Positions of the new tokens come from the lengths, inside the graph.
* **New rows stay out of the graph's inputs.** Attention reads the cached rows ``< length`` from the pool and
  the S new rows from the step itself (causal among them), and the step *returns* the new rows
  ``[layers, B, S, X]``; the runner writes them into the pool with one ``index_copy_`` afterwards. So the
  graph never mutates its inputs, and the pool is read-only inside it.
* **Precomputed at load** (:class:`AbsorbedAttention`): W^UK folded into the query up-projection (and the
  softmax scale with it), W^UV into the output projection — ``q_latent = W^{UQ·UK} c^Q`` and
  ``o = W^{O·UV} (Σ_t p_t c_t)`` (docs/mla-absorb.md), folded in float64 and stored in the model's dtype.
* **MoE without routing-dependent shapes** (:func:`latentmoe.model.moe.static_experts`): for T·K < E the
  chosen experts' weights are read by index (a fused gather in the compiled graph), else the pairs are sorted
  by expert and each expert's rows run as one product (``latentmoe::grouped_linear``, an op the graph calls).

The verification step of speculative decoding (S = 1 + drafts per sequence) is the same graph with S > 1;
drafting runs :class:`StaticDraft`, the MTP module written the same way over its own cache layer.
The eager ``ModelRunner`` stays the reference; ``CompiledRunner`` (compiled_runner.py) drives these steps and
falls back to it when compilation is unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.model.moe import MLP, route, static_experts
from latentmoe.model.transformer import Block, CausalLM


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= ``n``, capped at ``limit`` (pure): ``bucket(3, 16) == 4``,
    ``bucket(9, 12) == 12``. ``n`` must lie in ``[1, limit]``."""
    if not 1 <= n <= limit:
        raise ValueError(f"bucket: {n} is outside [1, {limit}]")
    return min(1 << (n - 1).bit_length(), limit)


BLOCK_BUCKETS_PER_OCTAVE = 4  # cache-length buckets between powers of two: at most 1/4 of the rows read are padding


def block_bucket(n: int, limit: int) -> int:
    """The cache-block bucket for ``n`` blocks (pure): ``n`` rounded up to a multiple of a quarter of the power of
    two below it, capped at ``limit`` — 1..8, then 10, 12, 14, 16, 20, 24, 28, 32, 40, ... — so a sequence reads at
    most a quarter more rows than it holds, with four graphs per doubling of the context."""
    if not 1 <= n <= limit:
        raise ValueError(f"block_bucket: {n} is outside [1, {limit}]")
    step = max(1, (1 << (n.bit_length() - 1)) // BLOCK_BUCKETS_PER_OCTAVE)
    return min(-(-n // step) * step, limit)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (or wider) whatever x's dtype, as latentmoe.model.norm.RMSNorm."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.to(xc.dtype)).to(x.dtype)


def rotate_interleaved(x_BSHR: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE (latentmoe.model.rope.apply_rotary) with per-sequence positions, cos/sin ``[B, S, R/2]``."""
    x = x_BSHR.to(torch.promote_types(x_BSHR.dtype, torch.float32)).unflatten(-1, (-1, 2))
    real, imag = x[..., 0], x[..., 1]
    cos, sin = cos_BSR[:, :, None, :], sin_BSR[:, :, None, :]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(x_BSHR.dtype)


class AbsorbedAttention(nn.Module):
    """One MLA layer's weights in the layout the absorbed step reads (buffers, computed once from ``mla``).

    ``w_in_PD``: ``q_a_proj`` (when the query is compressed) and ``kv_a_proj_with_mqa`` stacked, ``[Q + C + R, D]``.
    ``w_q_MQ``: ``[H·C + H·R, Q]`` — rows ``h·C + c`` give the softmax-scaled latent query
    (Σ_n W^UK[h,n,c] W^UQ[h,n,:]), rows ``H·C + h·R + r`` the scaled rope query; Q is ``q_lora_rank`` (or the
    hidden size without query compression). ``w_o_DM``: ``[D, H·C]`` = Σ_v W^O[:, h·V + v] W^UV[h, v, c].
    """

    def __init__(self, mla):
        super().__init__()
        c = mla.config
        H, N, R, V, C = mla.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        dtype = mla.kv_b_proj.weight.dtype
        wide = torch.float64
        w_kv_HXC = mla.kv_b_proj.weight.detach().to(wide).view(H, N + V, C)
        w_uk_HNC, w_uv_HVC = w_kv_HXC.split([N, V], dim=1)
        q_up = mla.q_b_proj if c.uses_q_lora else mla.q_proj
        w_q_HXQ = q_up.weight.detach().to(wide).view(H, N + R, -1)
        w_qnope_HNQ, w_qrope_HRQ = w_q_HXQ.split([N, R], dim=1)
        w_qlat_HCQ = torch.einsum("hnc,hnq->hcq", w_uk_HNC, w_qnope_HNQ)
        scale = mla.softmax_scale
        w_q_MQ = torch.cat([w_qlat_HCQ.reshape(H * C, -1), w_qrope_HRQ.reshape(H * R, -1)]) * scale
        w_o_DHV = mla.o_proj.weight.detach().to(wide).view(-1, H, V)
        w_o_DM = torch.einsum("dhv,hvc->dhc", w_o_DHV, w_uv_HVC).reshape(-1, H * C)
        # the two projections of the normed input, q_a (or nothing) and kv_a, as one matrix: one read, one matmul
        down = [mla.q_a_proj] if c.uses_q_lora else []
        down.append(mla.kv_a_proj_with_mqa)
        w_in_PD = torch.cat([m.weight.detach() for m in down])
        biases = [m.bias for m in down]
        b_in_P = None if all(b is None for b in biases) else torch.cat([
            (b.detach() if b is not None else torch.zeros(m.weight.shape[0], dtype=dtype, device=m.weight.device))
            for m, b in zip(down, biases, strict=True)])
        self.q_rank = c.q_lora_rank if c.uses_q_lora else 0
        self.register_buffer("w_in_PD", w_in_PD, persistent=False)
        self.register_buffer("b_in_P", b_in_P, persistent=False)
        self.heads, self.latent, self.rope = H, C, R
        self.uses_q_lora = c.uses_q_lora
        self.eps = c.rms_norm_eps
        self.register_buffer("w_q_MQ", w_q_MQ.to(dtype), persistent=False)
        self.register_buffer("w_o_DM", w_o_DM.to(dtype), persistent=False)
        self.mla = mla  # what the step shares with the model (the norms, o_proj's bias)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_BSR: torch.Tensor,
        sin_BSR: torch.Tensor,
        cached_BTX: torch.Tensor,
        key_mask_BT: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the S new tokens over ``cached_BTX`` (rows where ``key_mask_BT``) and over each other
        (causally). Returns the output ``[B, S, D]`` and the new cache rows ``[B, S, X]``."""
        mla = self.mla
        B, S, _ = x_BSD.shape
        H, C, R = self.heads, self.latent, self.rope
        down_BSP = F.linear(x_BSD, self.w_in_PD, self.b_in_P)
        kv_BSX = down_BSP[..., self.q_rank :]
        cq = rms_norm(down_BSP[..., : self.q_rank], mla.q_a_layernorm.weight, self.eps) if self.uses_q_lora else x_BSD
        q_BSM = F.linear(cq, self.w_q_MQ)
        q_lat_BSHC = q_BSM[..., : H * C].view(B, S, H, C)
        q_rope_BSHR = rotate_interleaved(q_BSM[..., H * C :].view(B, S, H, R), cos_BSR, sin_BSR)
        new_lat_BSC = rms_norm(kv_BSX[..., :C], mla.kv_a_layernorm.weight, self.eps)
        new_rope_BSR = rotate_interleaved(kv_BSX[..., None, C:], cos_BSR, sin_BSR)[:, :, 0]
        new_BSX = torch.cat([new_lat_BSC, new_rope_BSR], dim=-1)
        # scores, softmax and sums in at least fp32 whatever the weights' dtype: the cast of bf16 rows fuses
        # into their gather, and the CPU's fp32 batched products ran 3-4x faster than its bf16 ones at decode
        # shapes (a few query rows per sequence)
        wide = torch.promote_types(x_BSD.dtype, torch.float32)
        q_BMX = torch.cat([q_lat_BSHC, q_rope_BSHR], dim=-1).view(B, S * H, C + R).to(wide)
        cached_BTX, new_wide_BSX = cached_BTX.to(wide), new_BSX.to(wide)
        old_BMT = torch.bmm(q_BMX, cached_BTX.transpose(1, 2)).masked_fill(~key_mask_BT[:, None, :], float("-inf"))
        causal_SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()
        new_BSHS = torch.bmm(q_BMX, new_wide_BSX.transpose(1, 2)).view(B, S, H, S)
        new_BMS = new_BSHS.masked_fill(~causal_SS[None, :, None, :], float("-inf")).view(B, S * H, S)
        probs_BMK = torch.cat([old_BMT, new_BMS], dim=-1).softmax(dim=-1)
        T = cached_BTX.shape[1]
        out_BMC = torch.bmm(probs_BMK[..., :T], cached_BTX[..., :C]) + torch.bmm(probs_BMK[..., T:],
                                                                                new_wide_BSX[..., :C])
        out_BSD = F.linear(out_BMC.reshape(B, S, H * C).to(x_BSD.dtype), self.w_o_DM, mla.o_proj.bias)
        return out_BSD, new_BSX


class StaticBlock(nn.Module):
    """A transformer block for the static step: absorbed attention, then the dense FFN or the MoE with
    :func:`~latentmoe.model.moe.static_experts` (routing exactly as ``Router.forward``)."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        self.attention = AbsorbedAttention(block.self_attn)
        self.eps = block.input_layernorm.eps
        mlp = block.mlp if isinstance(block.mlp, MLP) else block.mlp.shared_experts  # the dense SwiGLU, if any
        self.down = mlp.down_proj if mlp is not None else None
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach() if mlp is not None else None
        self.register_buffer("w_gate_up_ND", gate_up, persistent=False)  # gate and up as one matmul

    def dense(self, x_TD: torch.Tensor, w_gate_up_ND: torch.Tensor) -> torch.Tensor:
        """The block's dense SwiGLU (the FFN, or the shared experts) with gate and up in one matmul."""
        gate, up = F.linear(x_TD, w_gate_up_ND).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, x_BSD, cos_BSR, sin_BSR, cached_BTX, key_mask_BT):
        b = self.block
        attn_BSD, new_BSX = self.attention(rms_norm(x_BSD, b.input_layernorm.weight, self.eps), cos_BSR, sin_BSR,
                                           cached_BTX, key_mask_BT)
        x_BSD = x_BSD + attn_BSD
        h_BSD = rms_norm(x_BSD, b.post_attention_layernorm.weight, self.eps)
        if isinstance(b.mlp, MLP):
            return x_BSD + self.dense(h_BSD, self.w_gate_up_ND), new_BSX
        moe = b.mlp
        B, S, D = h_BSD.shape
        h_TD = h_BSD.reshape(B * S, D)
        c = moe.config
        logits_TE = F.linear(h_TD.float(), moe.gate.weight.float())  # the router in fp32 (TR §3.3.1)
        routing = route(
            logits_TE, moe.gate.e_score_correction_bias, top_k=c.num_experts_per_tok,
            n_group=1 if c.topk_method == "greedy" else c.n_group, topk_group=c.topk_group,
            routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
            scoring_func=c.scoring_func, group_score="max" if c.topk_method == "group_limited_greedy" else "top2_sum",
        )
        y_TD = static_experts(h_TD, routing.topk_idx_TK, routing.topk_weight_TK, moe.experts)
        if moe.shared_experts is not None:
            y_TD = y_TD + self.dense(h_TD, self.w_gate_up_ND)
        return x_BSD + y_TD.view(B, S, D), new_BSX


class StaticStep(nn.Module):
    """The main model's decode/verify step over the paged pool, with static shapes (see the module docstring).

    ``forward(ids_BS, lengths_B, block_table_BN, pool_LNbX)``: sequence b feeds ``ids_BS[b]`` at positions
    ``lengths_B[b] + s`` over its cached rows ``[0, lengths_B[b])``, found in the blocks of
    ``block_table_BN[b]`` (padded with any valid block id). ``pool_LNbX`` is the cache pool (read only; its
    first ``num_hidden_layers`` layers are the main model's), in fp32 or bf16.
    """

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.blocks = nn.ModuleList(StaticBlock(b) for b in model.model.layers)
        self.eps = model.model.norm.eps

    def forward(
        self, ids_BS: torch.Tensor, lengths_B: torch.Tensor, block_table_BN: torch.Tensor, pool_LNbX: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns logits ``[B, S, V]``, the hidden states after the final norm ``[B, S, D]`` (what MTP drafts
        from) and the new cache rows ``[layers, B, S, X]`` for the runner to write into the pool."""
        m = self.model
        cos_BSR, sin_BSR, key_mask_BT = step_positions(m, lengths_B, ids_BS.shape[1], block_table_BN, pool_LNbX)
        x_BSD = m.model.embed_tokens(ids_BS)
        new_rows = []
        for layer, block in enumerate(self.blocks):
            # gathered one layer at a time: a [B, T, X] buffer that stays in cache, not all layers' rows at once
            x_BSD, new_BSX = block(x_BSD, cos_BSR, sin_BSR, gather_rows(pool_LNbX, layer, block_table_BN),
                                   key_mask_BT)
            new_rows.append(new_BSX)
        hidden_BSD = rms_norm(x_BSD, m.model.norm.weight, self.eps)
        return head_logits(m.lm_head, hidden_BSD), hidden_BSD, torch.stack(new_rows)


class StaticDraft(nn.Module):
    """MTP module ``depth`` over its own cache layer with static shapes: ``CausalLM.mtp_forward``'s function
    (combine, one block, shared head) written as :class:`StaticStep` writes the main model.

    ``forward(prev_BSD, future_ids_BS, lengths_B, block_table_BN, pool_LNbX)``: sequence b runs the window of
    S positions from ``lengths_B[b]`` over the module's cached rows ``[0, lengths_B[b])`` (cache layer
    ``num_hidden_layers + depth - 1``). Returns the block output h^depth ``[B, S, D]``, the logits ``[B, S, V]``
    and the window's new cache rows ``[B, S, X]`` for the runner to write.
    """

    def __init__(self, model: CausalLM, depth: int):
        super().__init__()
        if not 1 <= depth <= len(model.mtp):
            raise ValueError(f"depth must be in [1, {len(model.mtp)}], got {depth}")
        self.model = model
        self.module = model.mtp[depth - 1]
        self.block = StaticBlock(self.module.block)
        self.layer = model.config.num_hidden_layers + depth - 1

    def forward(
        self, prev_BSD: torch.Tensor, future_ids_BS: torch.Tensor, lengths_B: torch.Tensor,
        block_table_BN: torch.Tensor, pool_LNbX: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, module = self.model, self.module
        cos_BSR, sin_BSR, key_mask_BT = step_positions(m, lengths_B, future_ids_BS.shape[1], block_table_BN,
                                                       pool_LNbX)
        h_BSD = module.combine(prev_BSD, m.model.embed_tokens(future_ids_BS))
        out_BSD, new_BSX = self.block(h_BSD, cos_BSR, sin_BSR, gather_rows(pool_LNbX, self.layer, block_table_BN),
                                      key_mask_BT)
        return out_BSD, head_logits(m.lm_head, module.shared_head.norm(out_BSD)), new_BSX


def head_logits(lm_head: nn.Linear, hidden_BSD: torch.Tensor) -> torch.Tensor:
    """``lm_head(hidden_BSD)``: logits ``[B, S, V]``. A single row (batch 1, one token) is written as a product
    and a sum in at least fp32, which inductor compiles into one fused reduction over the vocabulary's rows
    instead of a BLAS matrix-vector call: on the 2-core AMD CPU MKL's read the 4 MiB head at a third of
    streaming speed (0.86 ms of a 5.4 ms step, one thread). Inductor's own decompose_mm pass leaves products
    wider than 2,048 (a vocabulary) to BLAS."""
    if hidden_BSD.shape[0] * hidden_BSD.shape[1] != 1:
        return lm_head(hidden_BSD)
    wide = torch.promote_types(hidden_BSD.dtype, torch.float32)
    logits_BSV = (hidden_BSD.to(wide)[..., None, :] * lm_head.weight.to(wide)).sum(-1)
    if lm_head.bias is not None:
        logits_BSV = logits_BSV + lm_head.bias
    return logits_BSV.to(hidden_BSD.dtype)


def step_positions(
    model: CausalLM, lengths_B: torch.Tensor, S: int, block_table_BN: torch.Tensor, pool_LNbX: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE tables of the S new positions ``lengths_B[b] + s`` (``[B, S, R/2]`` each) and the mask of the cached
    rows a sequence may read (``[B, N·bs]``: row t where t < ``lengths_B[b]``)."""
    N, bs = block_table_BN.shape[1], pool_LNbX.shape[2]
    positions_BS = lengths_B[:, None] + torch.arange(S, device=lengths_B.device)[None, :]
    angles_BSR = positions_BS.to(torch.float32)[..., None] * model.rotary.inv_freq
    cos_BSR, sin_BSR = angles_BSR.cos() * model.rotary.amplitude, angles_BSR.sin() * model.rotary.amplitude
    key_mask_BT = torch.arange(N * bs, device=lengths_B.device)[None, :] < lengths_B[:, None]
    return cos_BSR, sin_BSR, key_mask_BT


def gather_inline(pool_LNbX: torch.Tensor, layer: int, block_table_BN: torch.Tensor) -> torch.Tensor:
    """Cache layer ``layer``'s rows of each sequence's blocks, in order: ``[B, N·bs, X]``."""
    B, N = block_table_BN.shape
    _, _, bs, X = pool_LNbX.shape
    return pool_LNbX[layer].index_select(0, block_table_BN.flatten()).view(B, N * bs, X)


@torch.library.custom_op("latentmoe::gather_blocks", mutates_args=())
def gather_blocks(pool_LNbX: torch.Tensor, layer: int, block_table_BN: torch.Tensor) -> torch.Tensor:
    """:func:`gather_inline` as an op the compiler cannot see into: the graph calls aten's row copy."""
    return gather_inline(pool_LNbX, layer, block_table_BN)


gather_blocks.register_fake(gather_inline)  # the same shapes, traced on fake tensors


EXTERN_GATHER_BYTES = 4 * 2**20  # larger gathers run as aten's copy inside the compiled graph (see gather_rows)


def gather_bytes(pool_LNbX: torch.Tensor, batch: int, blocks: int) -> int:
    """Bytes one layer's gather copies for ``batch`` sequences of ``blocks`` blocks each (pure)."""
    _, _, bs, X = pool_LNbX.shape
    return batch * blocks * bs * X * pool_LNbX.element_size()


def gather_rows(pool_LNbX: torch.Tensor, layer: int, block_table_BN: torch.Tensor) -> torch.Tensor:
    """Cache layer ``layer``'s rows of each sequence's blocks, in order: ``[B, N·bs, X]``.

    The same copy either way; the choice depends on shapes only. Measured on the 2-core CPU (fp32 ``small``,
    one thread): for a gather of a few MiB inductor's fused code is as fast as aten's or faster (batch 1 at
    4,096 cached rows: 5.7 vs 7.0 ms a step), while at 21 MiB a layer (batch 16 at 4,096) it is 2-3x slower
    (87 vs 67 ms a step), so gathers past ``EXTERN_GATHER_BYTES`` call aten's through :func:`gather_blocks`."""
    if gather_bytes(pool_LNbX, *block_table_BN.shape) > EXTERN_GATHER_BYTES:
        return gather_blocks(pool_LNbX, layer, block_table_BN)
    return gather_inline(pool_LNbX, layer, block_table_BN)
