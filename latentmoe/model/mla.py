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
layer and token. This module implements the *materialised* path (per-head K and V are expanded, used
for training and prefill) on top of :class:`LatentCache`; the absorbed decode path, which never expands
K and V, plugs in at :meth:`MLA.attend` (see docs/architecture.md).
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
        k_rope = apply_rotary(k_rope[:, :, None, :], cos_SR, sin_SR)[:, :, 0, :]
        return self.kv_a_layernorm(kv_latent), k_rope

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        *,
        cache: LatentCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        c = self.config
        q_BSHD = self.project_queries(x_BSD)
        q_nope, q_rope = q_BSHD.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_rope = apply_rotary(q_rope, cos_SR, sin_SR)
        kv_latent_BTC, k_rope_BTR = self.compress_kv(x_BSD, cos_SR, sin_SR)
        if cache is not None:
            kv_latent_BTC, k_rope_BTR = cache.write(self.layer_idx, start_pos, kv_latent_BTC, k_rope_BTR)
        out_BSHV = self.attend(q_nope, q_rope, kv_latent_BTC, k_rope_BTR)
        return self.o_proj(out_BSHV.flatten(-2))

    def attend(
        self,
        q_nope_BSHN: torch.Tensor,
        q_rope_BSHR: torch.Tensor,
        kv_latent_BTC: torch.Tensor,
        k_rope_BTR: torch.Tensor,
    ) -> torch.Tensor:
        """Materialised attention: expand per-head K^C and V from the latent; queries are the last S of T.

        Returns ``[B, S, H, v_head_dim]``. (The absorbed decode path replaces this method's body.)
        """
        c = self.config
        B, S, H, _ = q_nope_BSHN.shape
        T = kv_latent_BTC.shape[1]
        kv_BTHX = self.kv_b_proj(kv_latent_BTC.to(q_nope_BSHN.dtype)).unflatten(-1, (H, -1))
        k_nope_BTHN, v_BTHV = kv_BTHX.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_BTHD = torch.cat([k_nope_BTHN, k_rope_BTR.to(k_nope_BTHN.dtype)[:, :, None, :].expand(B, T, H, -1)], dim=-1)
        q_BSHD = torch.cat([q_nope_BSHN, q_rope_BSHR], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BTHD, v_BTHV))
        if S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        elif S == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        else:
            mask = causal_mask(S, T, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)
