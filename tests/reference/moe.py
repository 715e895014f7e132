"""References for DeepSeekMoE (TR §2.1.2): routed SwiGLU experts token by token, the sequence-wise balance loss.

Both are naive loops written from the equations, with their own SwiGLU (``x·σ(x)`` spelled out) and their
own matmuls, so they share no code with ``latentmoe.model.moe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [N, in], weight [out, in]) -> [N, out]


def plain_linear(x_NI: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    return x_NI @ weight_OI.T


def silu(z: torch.Tensor) -> torch.Tensor:
    """SiLU written out: z · 1 / (1 + e^(−z))."""
    return z * (1.0 / (1.0 + torch.exp(-z)))


def swiglu_expert(
    x_ND: torch.Tensor, gate_ID: torch.Tensor, up_ID: torch.Tensor, down_DI: torch.Tensor, linear: Linear = plain_linear
) -> torch.Tensor:
    """One SwiGLU expert, FFN(x) = W_down (SiLU(W_gate x) ⊙ W_up x)."""
    return linear(silu(linear(x_ND, gate_ID)) * linear(x_ND, up_ID), down_DI)


def experts_reference(
    gate_EID: torch.Tensor,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    *,
    linear: Linear = plain_linear,
) -> torch.Tensor:
    """Σ_k g_{t,k} · FFN_{idx[t,k]}(x_t), one token and one choice at a time (TR eq. 12). Returns ``[T, D]``."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k in range(topk_idx_TK.shape[1]):
            e = int(topk_idx_TK[t, k])
            y = swiglu_expert(x_TD[t : t + 1], gate_EID[e], up_EID[e], down_EDI[e], linear)[0]
            acc = acc + topk_weight_TK[t, k].to(x_TD.dtype) * y
        rows.append(acc)
    return torch.stack(rows)


def sequence_balance_loss_reference(scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, n_experts: int) -> float:
    """TR eq. 17–20 as scalar loops, averaged over the B sequences (float64 Python floats).

    L_Bal = Σ_i f_i P_i with f_i = N_r / (K_r T) Σ_t 1(expert i in token t's top-K_r),
    P_i = 1/T Σ_t s'_{i,t} and s'_{i,t} = s_{i,t} / Σ_j s_{j,t}; T = tokens of the sequence.
    """
    B, T, K = topk_idx_BSK.shape
    s = scores_BSE.double().tolist()
    chosen = topk_idx_BSK.tolist()
    total = 0.0
    for b in range(B):
        loss = 0.0
        for i in range(n_experts):
            f_i = n_experts / (K * T) * sum(1 for t in range(T) if i in chosen[b][t])
            p_i = sum(s[b][t][i] / math.fsum(s[b][t]) for t in range(T)) / T
            loss += f_i * p_i
        total += loss
    return total / B


def route_reference(
    logits_E: list[float],
    bias_E: list[float] | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    scoring_func: str,
    group_score: str,
) -> dict[int, float]:
    """One token's gating as the DeepSeek papers describe it: ``{expert: gate weight}`` (float64 Python).

    s = sigmoid(u·e) (V3, TR eq. 15) or softmax (V2); selection by s + b (V3's bias, TR eq. 16); with groups,
    only the ``topk_group`` groups with the best score stay: the sum of a group's two best selection scores
    (V3 ``noaux_tc``) or its best one (V2 ``group_limited_greedy``); the top-k experts of those; weights are
    the un-biased s of the chosen, normalised to sum 1 when ``norm_topk_prob``, times the scaling factor.
    """
    E = len(logits_E)
    if scoring_func == "sigmoid":
        s = [1.0 / (1.0 + math.exp(-u)) for u in logits_E]
    else:
        m = max(logits_E)
        z = math.fsum(math.exp(u - m) for u in logits_E)
        s = [math.exp(u - m) / z for u in logits_E]
    choice = [s[i] + (bias_E[i] if bias_E is not None else 0.0) for i in range(E)]
    allowed = list(range(E))
    if n_group > 1:
        size = E // n_group
        groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]

        def score(g):
            values = sorted((choice[i] for i in g), reverse=True)
            return values[0] if group_score == "max" else sum(values[:2])

        best = sorted(range(n_group), key=lambda g: -score(groups[g]))[:topk_group]
        allowed = [i for g in best for i in groups[g]]
    chosen = sorted(allowed, key=lambda i: -choice[i])[:top_k]
    weights = [s[i] for i in chosen]
    if norm_topk_prob:
        total = math.fsum(weights)
        weights = [w / total for w in weights]
    return {i: w * routed_scaling_factor for i, w in zip(chosen, weights, strict=True)}
