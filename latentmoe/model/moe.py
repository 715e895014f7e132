"""DeepSeekMoE: shared + routed SwiGLU experts, sigmoid gating, auxiliary-loss-free balancing (TR §2.1.2).

Routing for one token t (TR eq. 12–16; REPO ``Gate.forward``):

1. affinities ``s_{t,i} = sigmoid(u_t · e_i)`` (softmax for DeepSeek-V2 configs);
2. selection scores ``s_{t,i} + b_i`` where ``b`` is the load-balancing bias — an fp32 *buffer*,
   never a parameter, changed only by :func:`update_bias` between optimizer steps;
3. group-limited (node-limited) top-k: experts are split into ``n_group`` groups; a group's score is the
   sum of its top-2 selection scores; only the best ``topk_group`` groups stay, the others are masked
   with −inf (not 0, which could still win when every score is negative); then the top ``K_r`` experts;
4. gate weights come from the *un-biased* affinities of the chosen experts, normalised to sum 1
   (``norm_topk_prob``) and multiplied by ``routed_scaling_factor``.

Routed experts are computed grouped by expert: the (token, expert) pairs are sorted by expert and each
expert runs one matmul over its tokens, so the work is tokens × top-k, never tokens × experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.config import ModelConfig

GROUP_SCORE_TOPK = 2  # TR §2.1.2: nodes ranked by the sum of the highest K_r/M = 8/4 = 2 affinities
NORM_EPS = 1e-20  # keeps the normalisation finite when every chosen affinity is 0


@dataclass
class RouteResult:
    """Output of :func:`route` for T tokens, E experts and K = num_experts_per_tok.

    topk_idx_TK: int64 chosen expert ids; topk_weight_TK: gate weights (fp32, un-biased affinities,
    normalised, scaled); scores_TE: the fp32 affinities s (sigmoid or softmax) before the bias.
    """

    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    scores_TE: torch.Tensor


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    scoring_func: str = "sigmoid",
    group_score: str = "top2_sum",
) -> RouteResult:
    """Select experts and gate weights from router logits (pure function).

    ``group_score``: "top2_sum" (DeepSeek-V3 ``noaux_tc``) or "max" (DeepSeek-V2 ``group_limited_greedy``).
    With ``n_group == 1`` the group step is skipped.
    """
    logits_TE = logits_TE.float()
    if scoring_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
    elif scoring_func == "softmax":
        scores_TE = logits_TE.softmax(dim=-1)
    else:
        raise ValueError(f"scoring_func {scoring_func!r} is not supported")
    # The bias only changes *which* experts are chosen; the weights below use scores_TE.
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()[None, :]
    T, E = choice_TE.shape
    if n_group > 1:
        choice_TGe = choice_TE.view(T, n_group, E // n_group)
        if group_score == "top2_sum":
            k = min(GROUP_SCORE_TOPK, E // n_group)
            group_TG = choice_TGe.topk(k, dim=-1).values.sum(dim=-1)
        elif group_score == "max":
            group_TG = choice_TGe.amax(dim=-1)
        else:
            raise ValueError(f"group_score {group_score!r} is not supported")
        keep_group_TM = group_TG.topk(topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_group_TM, True)
        choice_TE = choice_TGe.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)
    topk_idx_TK = choice_TE.topk(top_k, dim=-1).indices
    weight_TK = scores_TE.gather(1, topk_idx_TK)
    if norm_topk_prob:
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + NORM_EPS)
    return RouteResult(topk_idx_TK, weight_TK * routed_scaling_factor, scores_TE)


def update_bias(bias_E: torch.Tensor, load_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free update (TR §2.1.2): b_i − γ·sign(load_i − mean load). Returns a new tensor.

    Overloaded experts become less attractive to the selection, underloaded ones more.
    """
    load_E = load_E.to(bias_E.dtype)
    return bias_E - gamma * torch.sign(load_E - load_E.mean())


def expert_counts(topk_idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Number of (token, expert) assignments per expert, fp32 ``[E]``."""
    return torch.bincount(topk_idx_TK.reshape(-1), minlength=n_experts).float()


def sequence_balance_loss(
    scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """Complementary sequence-wise balance loss Σ_i f_i·P_i, averaged over sequences (TR eq. 17–20).

    f_i = N_r / (K_r·T) · #{t : i ∈ TopK(t)} (no gradient); P_i = mean_t s'_{t,i} with s' = s / Σ_j s_j.
    The caller multiplies by α (1e-4 in the TR).
    """
    B, S, K = topk_idx_BSK.shape
    counts_BE = torch.zeros(B, n_experts, device=scores_BSE.device)
    counts_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), torch.ones(B, S * K, device=scores_BSE.device))
    f_BE = counts_BE * (n_experts / (K * S))
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True).clamp_min(NORM_EPS)).mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()


Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [N, in], weight [out, in]) -> [N, out]


def swiglu(
    x_ND: torch.Tensor,
    gate_ID: torch.Tensor,
    up_ID: torch.Tensor,
    down_DI: torch.Tensor,
    linear: Linear = F.linear,
) -> torch.Tensor:
    """down(silu(gate x) * up x) for one expert's weights; ``linear`` computes each x·Wᵀ."""
    return linear(F.silu(linear(x_ND, gate_ID)) * linear(x_ND, up_ID), down_DI)


class Router(nn.Module):
    """The gate: ``weight [E, D]`` (HF ``mlp.gate.weight``) and the selection bias buffer.

    ``e_score_correction_bias`` (HF name) is fp32 state updated by the trainer outside autograd.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        uses_bias = config.topk_method == "noaux_tc"
        bias = torch.zeros(config.n_routed_experts, dtype=torch.float32) if uses_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x_TD: torch.Tensor) -> RouteResult:
        c = self.config
        # The router runs in fp32 even under autocast (TR §3.3.1: gating stays in high precision).
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        return route(
            logits_TE,
            self.e_score_correction_bias,
            top_k=c.num_experts_per_tok,
            n_group=1 if c.topk_method == "greedy" else c.n_group,  # DeepSeek-V2 "greedy" ignores the groups
            topk_group=c.topk_group,
            routed_scaling_factor=c.routed_scaling_factor,
            norm_topk_prob=c.norm_topk_prob,
            scoring_func=c.scoring_func,
            group_score="max" if c.topk_method == "group_limited_greedy" else "top2_sum",
        )


EXPERT_PARAMETERS = ("gate_proj", "up_proj", "down_proj")  # the stacked [E, ...] tensors of Experts


def is_expert_parameter(name: str) -> bool:
    """Whether a state-dict name is a routed-expert tensor (``...mlp.experts.{gate,up,down}_proj``): the tensors
    expert parallelism shards and checkpoints store per rank."""
    return ".experts." in name and name.rsplit(".", 1)[-1] in EXPERT_PARAMETERS


class Experts(nn.Module):
    """E routed SwiGLU experts with stacked weights: gate/up ``[E, I, D]``, down ``[E, D, I]``."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        # The x·Wᵀ of every expert projection; latentmoe.fp8.convert_to_fp8 swaps in an FP8 matmul here.
        self.expert_linear: Linear = F.linear

    def forward(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
    ) -> torch.Tensor:
        """Σ_k weight[t,k] · FFN_{idx[t,k]}(x_t), computed grouped by expert. Returns ``[T, D]``."""
        T, K = topk_idx_TK.shape
        expert_A = topk_idx_TK.reshape(-1)  # A = T*K assignments
        order_A = expert_A.argsort(stable=True)
        token_A = order_A // K
        counts = torch.bincount(expert_A, minlength=self.n_experts).tolist()
        x_AD = x_TD[token_A]
        # unbind once: indexing the stacked weight per expert would cost a full-size zero gradient each.
        weights = zip(self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0), strict=True)
        outputs, start = [], 0
        for (gate_ID, up_ID, down_DI), n in zip(weights, counts, strict=True):
            if n:
                outputs.append(swiglu(x_AD[start : start + n], gate_ID, up_ID, down_DI, self.expert_linear))
                start += n
        if not outputs:
            return torch.zeros_like(x_TD)
        y_AD = torch.cat(outputs) * topk_weight_TK.reshape(-1)[order_A, None].to(x_TD.dtype)
        return torch.zeros_like(x_TD, dtype=y_AD.dtype).index_add_(0, token_A, y_AD).to(x_TD.dtype)


class MLP(nn.Module):
    """Dense SwiGLU FFN (first ``first_k_dense_replace`` layers, and the shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class MoEOutput:
    """hidden_BSD: the FFN output; load_E: assignments per expert (fp32, detached);
    balance_loss: unweighted sequence-wise balance loss (scalar)."""

    hidden_BSD: torch.Tensor
    load_E: torch.Tensor
    balance_loss: torch.Tensor


# (moe, x_TD [T, D], routing) -> routed + shared expert output [T, D]; see latentmoe.parallel.ep.ExpertParallel.
ExpertParallelHook = Callable[["MoE", torch.Tensor, RouteResult], torch.Tensor]


class MoE(nn.Module):
    """Shared experts (always active, one SwiGLU of width n_shared·moe_intermediate) + routed experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Expert parallelism (latentmoe.parallel.ep) plugs in here: same routing, but the routed experts live
        # on other ranks; the hook dispatches, runs the local experts, combines and adds the shared experts.
        self.expert_parallel: ExpertParallelHook | None = None

    def forward(self, x_BSD: torch.Tensor) -> MoEOutput:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.gate(x_TD)
        if self.expert_parallel is not None:
            y_TD = self.expert_parallel(self, x_TD, routing)
        else:
            y_TD = self.experts(x_TD, routing.topk_idx_TK, routing.topk_weight_TK)
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD)
        E, K = self.config.n_routed_experts, self.config.num_experts_per_tok
        balance = (
            sequence_balance_loss(routing.scores_TE.view(B, S, E), routing.topk_idx_TK.view(B, S, K), E)
            if self.training
            else x_BSD.new_zeros((), dtype=torch.float32)
        )
        return MoEOutput(y_TD.view(B, S, D), expert_counts(routing.topk_idx_TK, E), balance)


# ---------------------------------------------------------------------------------------------- static shapes
# The two routed-expert computations below have shapes that do not depend on the routing (what a compiled,
# static-shape decode step needs; latentmoe.infer.decode_step). Both equal Experts.forward (the reference: a
# Python loop over the experts) and the per-token loop in tests/reference/moe.py.


def gathered_experts(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gate_EID: torch.Tensor,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
) -> torch.Tensor:
    """Σ_k weight[t,k] · FFN_{idx[t,k]}(x_t) with each (token, expert) pair reading its expert's weights by index.

    Written as products and sums over the indexed weights, so a compiler fuses the gather into the reduction
    and reads only the T·K chosen experts' weights, once (eagerly it materialises ``[T, K, I, D]``): the choice
    when T·K is below the number of experts. Returns ``[T, D]`` in x's dtype."""
    x_T11D = x_TD[:, None, None, :]
    gate_TKI = (x_T11D * gate_EID[topk_idx_TK]).sum(-1)
    up_TKI = (x_T11D * up_EID[topk_idx_TK]).sum(-1)
    h_TK1I = (F.silu(gate_TKI) * up_TKI)[:, :, None, :]
    y_TKD = (h_TK1I * down_EDI[topk_idx_TK]).sum(-1)
    return (y_TKD * topk_weight_TK[:, :, None].to(y_TKD.dtype)).sum(1).to(x_TD.dtype)


# what F.grouped_mm computes on the CPU: these dtypes, rows a multiple of 16 bytes; anything else (float64: the
# tests' references) takes a loop of products
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_MM_ALIGN_BYTES = 16


@torch.library.custom_op("latentmoe::grouped_linear", mutates_args=())
def grouped_linear(x_AD: torch.Tensor, weight_END: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """Rows ``[ends_E[e-1], ends_E[e])`` of ``x_AD`` times ``weight_END[e]ᵀ`` for each group e: ``[A, N]``.

    ``F.grouped_mm`` (one call, aten's loop of products per group) wrapped as an op of our own: its shape
    function accepts only bf16 (what its CUDA kernel takes), while the CPU computes fp32 too; a compiled graph
    sees only this op's static output shape. ``ends_E[-1]`` must be A (every row in a group)."""
    aligned = all(n * x_AD.element_size() % GROUPED_MM_ALIGN_BYTES == 0 for n in weight_END.shape[1:])
    if x_AD.dtype in GROUPED_MM_DTYPES and aligned:
        return F.grouped_mm(x_AD, weight_END.transpose(1, 2), offs=ends_E.to(torch.int32))
    out_AN = x_AD.new_empty(x_AD.shape[0], weight_END.shape[1])
    start = 0
    for e, end in enumerate(ends_E.tolist()):
        out_AN[start:end] = x_AD[start:end] @ weight_END[e].t()
        start = end
    return out_AN


@grouped_linear.register_fake
def _grouped_linear_shape(x_AD, weight_END, ends_E):
    return x_AD.new_empty(x_AD.shape[0], weight_END.shape[1])


def grouped_experts(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    gate_EID: torch.Tensor,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
) -> torch.Tensor:
    """The same sum with the T·K (token, expert) pairs sorted by expert and each expert's rows run as one
    product (:func:`grouped_linear`): every chosen expert's weights read once and T·K FFNs of work, the choice
    once T·K reaches the number of experts (a decode batch of 16 with top-4 of 16). The sort, the group ends
    and the un-sort are shape-static; only the ends' values depend on the routing. Returns ``[T, D]``."""
    T, K = topk_idx_TK.shape
    D, E = x_TD.shape[1], gate_EID.shape[0]
    expert_A = topk_idx_TK.reshape(-1)
    order_A = expert_A.argsort(stable=True)
    # assignments per expert without bincount (whose output length would depend on the data)
    ends_E = (expert_A[:, None] == torch.arange(E, device=x_TD.device)).sum(0).cumsum(0)
    x_AD = x_TD[order_A // K]
    h_AI = F.silu(grouped_linear(x_AD, gate_EID, ends_E)) * grouped_linear(x_AD, up_EID, ends_E)
    y_AD = grouped_linear(h_AI, down_EDI, ends_E)
    y_TKD = y_AD[order_A.argsort()].view(T, K, D)
    return (y_TKD * topk_weight_TK[:, :, None].to(y_TKD.dtype)).sum(1).to(x_TD.dtype)


def static_experts(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    experts: Experts,
) -> torch.Tensor:
    """:func:`gathered_experts` when T·K < E (fewer chosen pairs than experts: fewer weight bytes), else
    :func:`grouped_experts`; the choice depends on shapes only, never on the routing."""
    T, K = topk_idx_TK.shape
    compute = gathered_experts if T * K < experts.n_experts else grouped_experts
    return compute(x_TD, topk_idx_TK, topk_weight_TK, experts.gate_proj, experts.up_proj, experts.down_proj)
