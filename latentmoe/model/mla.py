"""Multi-head Latent Attention (DeepSeek-V2 §2.1; DeepSeek-V3 TR §2.1.1, eq. 1–11).

For a hidden state h_t (dimension d), with n_h heads:

- queries: c_t^Q = W^DQ h_t (rank ``q_lora_rank``, normalised), q_t^C = W^UQ c_t^Q, q_t^R = RoPE(W^QR c_t^Q)
  — in the checkpoint ``q_a_proj`` → ``q_a_layernorm`` → ``q_b_proj``; without query compression
  (``q_lora_rank`` 0/None) a single ``q_proj``;
- keys/values: one joint latent c_t^KV = W^DKV h_t of rank ``kv_lora_rank`` plus one decoupled key
  k_t^R = RoPE(W^KR h_t) of width ``qk_rope_head_dim`` shared by all heads — both come from
  ``kv_a_proj_with_mqa``; the latent is normalised by ``kv_a_layernorm``;
- per head, k^C and v are up-projected from the latent by ``kv_b_proj`` (W^UK, W^UV); the head's key is
  [k^C; k^R] and its query [q^C; q^R]; softmax scale 1/sqrt(d_h + d_h^R) (× mscale² under YaRN);
- the output projection ``o_proj`` (W^O).

Only c_t^KV (normalised) and k_t^R (rotated) need caching: ``kv_lora_rank + qk_rope_head_dim`` numbers per
layer and token. Two attention paths read those tensors and give the same result:

- *materialised* (:meth:`MLA.attend`, the reference; training and long prefills): per-head K and V are
  expanded from the latent through ``kv_b_proj``;
- *absorbed* (:meth:`MLA.attend_absorbed`; decode): W^UK is folded into the query and W^UV into the
  output, so attention runs straight against the latent and nothing per head is ever expanded
  (docs/mla-absorb.md has the algebra). ``attention="auto"`` picks the cheaper one by multiply-adds.

The cache passed to :meth:`MLA.forward` is anything with ``write(layer, start_pos, kv_latent_BSC, k_rope_BSR)
-> (kv_latent_BTC, k_rope_BTR)``: the contiguous :class:`LatentCache` (one ``int`` start for the batch) or
the engine's paged cache view (``start_pos`` a ``[B]`` tensor, one start per sequence; keys past a
sequence's own length are masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.config import ModelConfig
from latentmoe.model.norm import RMSNorm
from latentmoe.model.rope import apply_rotary


class LatentCache:
    """Latent-only KV cache for all layers: ``kv_latent [L, B, T_max, kv_lora_rank]`` (after
    ``kv_a_layernorm``) and ``k_rope [L, B, T_max, qk_rope_head_dim]`` (after RoPE). Nothing per head.

    Preallocated once for ``max_length`` tokens; ``length`` is the number of positions filled.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        batch_size: int,
        max_length: int,
        num_layers: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (num_layers, batch_size, max_length)
        self.kv_latent = torch.zeros(*shape, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(*shape, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    def write(
        self, layer: int, start: int, kv_latent_BSC: torch.Tensor, k_rope_BSR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions [start, start+S) of ``layer``; return the cached prefix [0, start+S)."""
        end = start + kv_latent_BSC.shape[1]
        if end > self.max_length:
            raise ValueError(f"cache holds {self.max_length} positions; writing up to {end}")
        self.kv_latent[layer, :, start:end] = kv_latent_BSC
        self.k_rope[layer, :, start:end] = k_rope_BSR
        return self.kv_latent[layer, :, :end], self.k_rope[layer, :, :end]

    def bytes_per_token(self) -> int:
        """Cache bytes per token per sequence, measured from the allocated tensors."""
        per_position = self.kv_latent[:, 0, 0].numel() * self.kv_latent.element_size()
        return per_position + self.k_rope[:, 0, 0].numel() * self.k_rope.element_size()


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, k_len]`` mask (True = may attend) for queries at the last q_len positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


ATTENTION_MODES = ("materialised", "absorbed", "auto")


def start_positions_mask(start_pos_B: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Boolean ``[B, q_len, k_len]`` mask (True = may attend) for sequences whose ``q_len`` new tokens sit at
    positions ``start_pos_B[b] + s``: causal within the new tokens, and keys past each sequence's own
    length (padding of a shorter sequence in the batch) are hidden."""
    q_pos_BS = start_pos_B[:, None] + torch.arange(q_len, device=start_pos_B.device)[None, :]
    return torch.arange(k_len, device=start_pos_B.device)[None, None, :] <= q_pos_BS[:, :, None]


def absorbed_is_cheaper(config: ModelConfig, q_len: int, k_len: int) -> bool:
    """Whether absorbed attention needs fewer multiply-adds than materialised for ``q_len`` queries over
    ``k_len`` keys (per sequence and head; the projections both paths share are left out).

    materialised: expand K^C, V for every key (k_len·C·(N+V)), then q·k (N+R) and p·v (V) per query-key pair;
    absorbed: fold W^UK, W^UV per query (q_len·C·(N+V)), then q·[c;k^R] (C+R) and p·c (C) per pair.
    Decode (q_len 1) is always absorbed; a long prefill is materialised when 2C > N + V (DeepSeek-V3).
    """
    C, N, R, V = config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    materialised = k_len * C * (N + V) + q_len * k_len * (N + R + V)
    absorbed = q_len * C * (N + V) + q_len * k_len * (2 * C + R)
    return absorbed < materialised


def rotate(x_BSHR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for shared positions (``cos`` ``[S, R/2]``) or per-sequence ones (``[B, S, R/2]``)."""
    if cos.dim() == 2:
        return apply_rotary(x_BSHR, cos, sin)
    B, S = x_BSHR.shape[:2]
    flat = apply_rotary(x_BSHR.flatten(0, 1)[None], cos.flatten(0, 1), sin.flatten(0, 1))
    return flat.view(B, S, *x_BSHR.shape[2:])


class MLA(nn.Module):
    """Multi-head Latent Attention; parameter names follow the Hugging Face DeepSeek-V3 layout."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        c = config
        self.n_heads = c.num_attention_heads
        if c.uses_q_lora:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * c.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = c.softmax_scale

    def project_queries(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Per-head queries ``[B, S, H, qk_nope + qk_rope]`` (before RoPE)."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD))) if self.config.uses_q_lora else self.q_proj(x_BSD)
        return q.unflatten(-1, (self.n_heads, self.config.qk_head_dim))

    def compress_kv(
        self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached quantities: normalised latent ``[B, S, kv_lora_rank]`` and rotated shared key ``[B, S, rope]``."""
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x_BSD).split(
            [self.config.kv_lora_rank, self.config.qk_rope_head_dim], dim=-1
        )
        k_rope = rotate(k_rope[:, :, None, :], cos_SR, sin_SR)[:, :, 0, :]
        return self.kv_a_layernorm(kv_latent), k_rope

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        *,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        attention: str = "materialised",
    ) -> torch.Tensor:
        """``start_pos``: an ``int`` shared by the batch, or a ``[B]`` tensor of per-sequence starts (then
        ``cos_SR``/``sin_SR`` are ``[B, S, R/2]``). ``attention``: one of :data:`ATTENTION_MODES`."""
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        c = self.config
        q_BSHD = self.project_queries(x_BSD)
        q_nope, q_rope = q_BSHD.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_rope = rotate(q_rope, cos_SR, sin_SR)
        kv_latent_BTC, k_rope_BTR = self.compress_kv(x_BSD, cos_SR, sin_SR)
        if cache is not None:
            kv_latent_BTC, k_rope_BTR = cache.write(self.layer_idx, start_pos, kv_latent_BTC, k_rope_BTR)
        S, T = x_BSD.shape[1], kv_latent_BTC.shape[1]
        mask_BST = None
        if isinstance(start_pos, torch.Tensor) and not (S == T and not bool(start_pos.any())):
            mask_BST = start_positions_mask(start_pos, S, T)  # (all starting at 0 with S == T: plain causal)
        if attention == "auto":
            attention = "absorbed" if absorbed_is_cheaper(c, S, T) else "materialised"
        attend = self.attend_absorbed if attention == "absorbed" else self.attend
        out_BSHV = attend(q_nope, q_rope, kv_latent_BTC, k_rope_BTR, attn_mask_BST=mask_BST)
        return self.o_proj(out_BSHV.flatten(-2))

    def attend(
        self,
        q_nope_BSHN: torch.Tensor,
        q_rope_BSHR: torch.Tensor,
        kv_latent_BTC: torch.Tensor,
        k_rope_BTR: torch.Tensor,
        *,
        attn_mask_BST: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Materialised attention: expand per-head K^C and V from the latent; queries are the last S of T
        (or, with ``attn_mask_BST``, wherever that boolean mask — True = may attend — puts them).

        Returns ``[B, S, H, v_head_dim]``. The reference for :meth:`attend_absorbed`.
        """
        c = self.config
        B, S, H, _ = q_nope_BSHN.shape
        T = kv_latent_BTC.shape[1]
        kv_BTHX = self.kv_b_proj(kv_latent_BTC.to(q_nope_BSHN.dtype)).unflatten(-1, (H, -1))
        k_nope_BTHN, v_BTHV = kv_BTHX.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_BTHD = torch.cat([k_nope_BTHN, k_rope_BTR.to(k_nope_BTHN.dtype)[:, :, None, :].expand(B, T, H, -1)], dim=-1)
        q_BSHD = torch.cat([q_nope_BSHN, q_rope_BSHR], dim=-1)
        V = v_BTHV.shape[-1]
        if V < q_BSHD.shape[-1]:
            # SDPA's fused (flash) kernels need one head size for q, k and v; without them the math fallback
            # materialises the [S, T] scores of every head. Zero columns of v add nothing and are dropped after.
            v_BTHV = F.pad(v_BTHV, (0, q_BSHD.shape[-1] - V))
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BTHD, v_BTHV))
        if attn_mask_BST is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask_BST[:, None], scale=self.softmax_scale)
        elif S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        elif S == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        else:
            mask = causal_mask(S, T, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)[..., :V]

    def attend_absorbed(
        self,
        q_nope_BSHN: torch.Tensor,
        q_rope_BSHR: torch.Tensor,
        kv_latent_BTC: torch.Tensor,
        k_rope_BTR: torch.Tensor,
        *,
        attn_mask_BST: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Absorbed attention straight against the latent cache (docs/mla-absorb.md); same contract and
        result as :meth:`attend`, but K^C and V are never expanded per head:

            q^C·k^C = q^C·(W^UK c) = (W^UKᵀ q^C)·c          — W^UK folded into the query, ``q_latent [B,S,H,C]``
            Σ_t p_t v_t = W^UV (Σ_t p_t c_t)                — W^UV applied once to the attended latent

        All heads share the one latent key ``[c; k^R]``, so the scores are one ``[S·H, C+R] × [C+R, T]``
        product per sequence (multi-query attention with head dim C + R).
        """
        c = self.config
        B, S, H, _ = q_nope_BSHN.shape
        T = kv_latent_BTC.shape[1]
        w_kv_HXC = self.kv_b_proj.weight.view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_kv_HXC.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        kv_latent_BTC = kv_latent_BTC.to(q_nope_BSHN.dtype)
        k_rope_BTR = k_rope_BTR.to(q_nope_BSHN.dtype)
        q_latent_BSHC = torch.einsum("bshn,hnc->bshc", q_nope_BSHN, w_uk_HNC)
        scores_BMT = torch.bmm(q_latent_BSHC.reshape(B, S * H, -1), kv_latent_BTC.transpose(1, 2))
        scores_BMT = scores_BMT.baddbmm_(q_rope_BSHR.reshape(B, S * H, -1), k_rope_BTR.transpose(1, 2))
        scores_BSHT = scores_BMT.view(B, S, H, T) * self.softmax_scale
        if attn_mask_BST is None and S > 1:
            attn_mask_BST = causal_mask(S, T, scores_BSHT.device)[None]
        if attn_mask_BST is not None:
            scores_BSHT = scores_BSHT.masked_fill(~attn_mask_BST[:, :, None, :], float("-inf"))
        softmax_dtype = torch.promote_types(scores_BSHT.dtype, torch.float32)
        probs_BMT = scores_BSHT.to(softmax_dtype).softmax(dim=-1).to(kv_latent_BTC.dtype).view(B, S * H, T)
        out_latent_BSHC = torch.bmm(probs_BMT, kv_latent_BTC).view(B, S, H, -1)
        return torch.einsum("bshc,hvc->bshv", out_latent_BSHC, w_uv_HVC)
