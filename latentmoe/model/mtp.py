"""Multi-Token Prediction (TR §2.2, eq. 21–25); the label shift is tabulated in docs/mtp.md.

Module k (1-based, D modules in sequence) at position i combines

    h'_i^k = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1}) ]        (``enorm``, ``hnorm``, ``eh_proj``)

runs one transformer block over h'^k (causal over positions), and predicts t_{i+k+1} with the output
head shared with the main model, after its own ``shared_head.norm``. The concatenation order
[embedding; hidden] is the one the official checkpoints are laid out in (vLLM/SGLang read them so);
the TR's eq. 21 writes the two halves the other way round. h^0 is the main model's final hidden state
after its last RMSNorm (what its head reads); h^k for k ≥ 1 is module k's block output.

Losses: L_main = CE(logits_i, t_{i+1}); L_MTP^k = CE(mtp_logits^k_i, t_{i+k+1}) over the positions that
have such a target; L = L_main + λ/D · Σ_k L_MTP^k (λ = 0.3 in the TR's first 10T tokens).

A loss mask (chat fine-tuning: only the assistant's tokens count) marks *target tokens*: every head scores a
position only when the token it predicts is marked, so the main head at i counts iff ``mask[i + 1]`` and MTP
depth k at i iff ``mask[i + k + 1]`` — each head learns exactly the marked tokens (docs/mtp.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.config import ModelConfig
from latentmoe.model.norm import RMSNorm


class SharedHead(nn.Module):
    """The MTP module's own final norm; the projection itself is the main model's ``lm_head``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Module):
    """One MTP depth: ``enorm``, ``hnorm``, ``eh_proj`` [D, 2D], a transformer ``block``, ``shared_head.norm``."""

    def __init__(self, config: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = block
        self.shared_head = SharedHead(config)

    def combine(self, prev_hidden_BSD: torch.Tensor, future_embed_BSD: torch.Tensor) -> torch.Tensor:
        """h' = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]."""
        return self.eh_proj(torch.cat([self.enorm(future_embed_BSD), self.hnorm(prev_hidden_BSD)], dim=-1))


def shift_tokens_left(input_ids_BS: torch.Tensor, k: int, pad_id: int = 0) -> torch.Tensor:
    """``out[:, i] = input_ids[:, i + k]``; the last k positions (no such token) hold ``pad_id``."""
    if k == 0:
        return input_ids_BS
    return F.pad(input_ids_BS[:, k:], (0, k), value=pad_id)


@dataclass
class LMLoss:
    """total = main + λ/D·Σ mtp (scalar tensors; ``mtp`` has one entry per depth)."""

    total: torch.Tensor
    main: torch.Tensor
    mtp: list[torch.Tensor]


IGNORE_INDEX = -100  # F.cross_entropy's marker for positions without a target


def next_token_loss(
    logits_BSV: torch.Tensor,
    input_ids_BS: torch.Tensor,
    ahead: int = 1,
    *,
    loss_mask_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean CE of ``logits[:, i]`` against ``t[:, i + ahead]`` over the positions that have that target.

    ``loss_mask_BS`` (bool ``[B, S]``, optional) marks the tokens that count as targets: position ``i`` is
    scored only when ``loss_mask[:, i + ahead]`` is set, and the mean is over those positions (0 when there is
    none, so a batch without a marked token adds nothing rather than NaN).

    The last ``ahead`` positions get IGNORE_INDEX instead of being sliced off: slicing the logits
    would cost a full-size zero-filled gradient in backward.
    """
    S = input_ids_BS.shape[1]
    if S <= ahead:
        raise ValueError(f"a sequence of {S} tokens has no target {ahead} positions ahead")
    targets_BS = F.pad(input_ids_BS[:, ahead:], (0, ahead), value=IGNORE_INDEX)
    if loss_mask_BS is None:
        return F.cross_entropy(
            logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=IGNORE_INDEX
        )
    if loss_mask_BS.shape != input_ids_BS.shape:
        raise ValueError(f"loss_mask_BS has shape {tuple(loss_mask_BS.shape)}, expected {tuple(input_ids_BS.shape)}")
    counted_BS = F.pad(loss_mask_BS[:, ahead:].bool(), (0, ahead), value=False)
    targets_BS = targets_BS.masked_fill(~counted_BS, IGNORE_INDEX)
    summed = F.cross_entropy(
        logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / counted_BS.sum().clamp(min=1)


def causal_lm_loss(
    out, input_ids_BS: torch.Tensor, *, mtp_lambda: float = 0.3, loss_mask_BS: torch.Tensor | None = None
) -> LMLoss:
    """Main next-token loss plus the λ/D-weighted MTP losses (depth k predicts k+1 tokens ahead).

    ``loss_mask_BS`` (optional bool ``[B, S]``): only marked target tokens count, in every head alike."""
    main = next_token_loss(out.logits, input_ids_BS, ahead=1, loss_mask_BS=loss_mask_BS)
    mtp = [
        next_token_loss(logits, input_ids_BS, ahead=k + 1, loss_mask_BS=loss_mask_BS)
        for k, logits in enumerate(out.mtp_logits, 1)
    ]
    total = main
    if mtp:
        total = main + mtp_lambda / len(mtp) * torch.stack(mtp).sum()
    return LMLoss(total=total, main=main, mtp=mtp)
