"""Token log-probabilities, as a server reports them (OpenAI ``logprobs``, ``echo``) — pure functions.

The log-probability of token t at a position is ``log_softmax(logits)[t]`` of the model's *raw* logits, before
temperature, top-k or top-p: a score then says what the model thinks of the token, whatever the request's
sampling settings (vLLM's default, and what log-likelihood evaluation needs). Logits at position i predict
token i+1, so

* a **generated** token's log-probability comes from the logits that sampled it (prefill's last position,
  a decode step, or — under speculative decoding — the verification pass at the token's position, which are
  the main model's logits for that position exactly as a plain decode step computes them);
* a **prompt** token's comes from the logits one position earlier (``lm_head`` over the prefill's hidden
  states); the first prompt token has none (nothing precedes it) and is reported as None.

``top_n`` asks for the n most likely tokens at each position besides the token itself (0: the token alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives a request may ask for per position (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the ``top`` most likely tokens at that
    position as ``(token_id, logprob)`` pairs, most likely first (empty when none were asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax_fp32(logits_NV: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the vocabulary in fp32 or wider (a bf16 model's logits are upcast first)."""
    return logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)).log_softmax(dim=-1)


def token_logprobs(logits_NV: torch.Tensor, token_ids_N: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """The log-probability of ``token_ids_N[i]`` under ``logits_NV[i]`` and the ``top_n`` best alternatives,
    for each of the N rows (see the module docstring)."""
    if logits_NV.shape[0] != len(token_ids_N):
        raise ValueError(f"token_logprobs: {logits_NV.shape[0]} logit rows for {len(token_ids_N)} tokens")
    if not token_ids_N:
        return []
    logp_NV = log_softmax_fp32(logits_NV)
    ids_N = torch.tensor(list(token_ids_N), dtype=torch.long, device=logp_NV.device)
    chosen_N = logp_NV.gather(-1, ids_N[:, None])[:, 0].tolist()
    if top_n:
        top_values, top_ids = logp_NV.topk(min(top_n, logp_NV.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen_N)
    return [TokenLogprob(int(t), float(lp), top) for t, lp, top in zip(token_ids_N, chosen_N, tops, strict=True)]
