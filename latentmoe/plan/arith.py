"""Model arithmetic: parameters, KV cache per token, training FLOPs per token, training cost.

All functions are pure and take an :class:`~latentmoe.plan.arch.ArchSpec`. Integers stay integers (parameter
and byte counts are exact), so the paper's figures compare with ``==``.

Parameters. Every matrix is counted from the config: attention projections, the SwiGLU FFNs (3 matrices of
hidden x width per expert), the router (hidden x experts), RMSNorm weights, biases, and DeepSeek-V3's
per-expert routing bias. The input embedding, the output head and the MTP modules are reported separately:
``total`` counts embedding + head but not MTP (the "671B" convention of TR §4.2), ``active`` is what one
token touches (top-k of the routed experts), and ``mtp`` is the extra weight of the MTP modules, which
share the embedding and head with the main model (README_WEIGHTS).

KV cache (ISCA §2.1.2). GQA caches a key and a value per KV head: 2 x kv_heads x head_dim x layers
elements per token. MLA caches only the compressed latent c_KV (kv_lora_rank) and the shared RoPE key k_R
(qk_rope_head_dim): (kv_lora_rank + qk_rope_head_dim) x layers. The "materialised" MLA cache -- keys and
values decompressed per head, as a naive implementation would store them -- is heads x (qk_head_dim +
v_head_dim) x layers. MTP layers are not counted (they are not part of the served main model).

Training FLOPs (ISCA Table 2 at sequence length 4096; the counting rule is not stated in the paper, this is
the one that reproduces both DeepSeek rows to 0.2%, paper.md §3 formula F):

    FLOP/token = 6 x (activated matmul parameters + vocab x hidden)
               + 3 x layers x 2 x S_eff x heads x (qk_head_dim + v_head_dim)

6 = 2 FLOP per multiply-add in the forward pass + twice that in the backward pass; the matmul parameters are
every activated weight matrix in the layers (attention projections, dense FFN, shared + top-k experts,
router), excluding the embedding lookup, norms and biases; vocab x hidden is the output head. The attention
term is QK^T plus AV against S_eff keys, where S_eff = S/2 for causal attention (half the score matrix) and S
otherwise; x3 for forward + backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from latentmoe.io import GIGA, TERA
from latentmoe.plan.arch import ArchSpec, FFNSpec
from latentmoe.plan.errors import PlanError
from latentmoe.plan.paper import BYTES_PER_PAPER_KB

# Bytes per element of each storage type. "fp8" is E4M3 or E5M2 (both one byte).
DTYPE_BYTES = MappingProxyType({"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1})

SWIGLU_MATRICES = 3  # gate, up and down projections of a SwiGLU FFN
FLOPS_PER_MAC = 2  # one multiply-accumulate is two floating-point operations
TRAIN_FLOPS_PER_PARAM = 6  # forward 2 + backward 4 FLOP per weight per token (Kaplan et al. 2020)
TRAIN_PASSES = 3  # forward + backward (input gradient + weight gradient) for the attention term
CAUSAL_FRACTION = 0.5  # a causal mask keeps half of the S x S score matrix (FlashAttention's convention)
SECONDS_PER_DAY = 86_400
FLOPS_RULE = (
    "6 x (activated matmul params + vocab x hidden) + 3 x layers x 2 x S_eff x heads x (d_qk + d_v); "
    "S_eff = S/2 if causal; embedding lookup, norms, biases and MTP excluded"
)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (fp32, bf16, fp16, fp8, int8)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise PlanError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}") from None


# ---------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class AttentionParams:
    """One layer's attention weights: ``matmul`` (projection matrices) and ``other`` (norms, biases)."""

    matmul: int
    other: int

    @property
    def total(self) -> int:
        return self.matmul + self.other


def attention_params(arch: ArchSpec) -> AttentionParams:
    """Weights of one attention block (its input RMSNorm is counted in :func:`layer_norm_params`)."""
    h, nh = arch.hidden_size, arch.num_heads
    if arch.is_mla:
        qk, rope, lat = arch.qk_head_dim, arch.qk_rope_head_dim, arch.kv_lora_rank
        if arch.q_lora_rank:
            # W^DQ (h -> q_lora), q_a_norm, W^UQ + W^QR (q_lora -> heads x qk)
            q_matmul = h * arch.q_lora_rank + arch.q_lora_rank * nh * qk
            q_norm = arch.q_lora_rank
        else:
            q_matmul, q_norm = h * nh * qk, 0
        # W^DKV + W^KR (h -> latent + rope), kv_a_norm, W^UK + W^UV (latent -> heads x (nope + v)), W^O
        kv_matmul = h * (lat + rope) + lat * nh * (arch.qk_nope_head_dim + arch.v_head_dim)
        out = nh * arch.v_head_dim * h
        bias = (nh * qk + lat + rope) * arch.qkv_bias + h * arch.o_bias
        return AttentionParams(matmul=q_matmul + kv_matmul + out, other=q_norm + lat + bias)
    hd, kv = arch.head_dim, arch.num_kv_heads
    matmul = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    bias = (nh * hd + 2 * kv * hd) * arch.qkv_bias + h * arch.o_bias
    qk_norm = 2 * hd * arch.qk_norm
    return AttentionParams(matmul=matmul, other=bias + qk_norm)


@dataclass(frozen=True)
class FFNParams:
    """One layer's FFN weights, split the way activation (top-k routing) needs them."""

    dense: int = 0  # dense SwiGLU (incl. its biases)
    routed: int = 0  # all routed experts
    routed_active: int = 0  # the top-k a token uses
    shared: int = 0  # always-active shared experts (+ Qwen-MoE's shared-expert gate)
    router: int = 0  # router matrix
    router_bias: int = 0  # DeepSeek-V3 e_score_correction_bias (selection only, not a matmul)
    dense_matmul: int = 0  # the dense FFN's matrices alone (no biases)

    @property
    def total(self) -> int:
        return self.dense + self.routed + self.shared + self.router + self.router_bias

    @property
    def active(self) -> int:
        return self.dense + self.routed_active + self.shared + self.router + self.router_bias

    @property
    def active_matmul(self) -> int:
        """Activated weight-matrix parameters (biases and the routing bias are not matmuls)."""
        return self.dense_matmul + self.routed_active + self.shared + self.router


def ffn_params(hidden: int, ffn: FFNSpec) -> FFNParams:
    """Weights of one FFN block (its input RMSNorm is counted in :func:`layer_norm_params`)."""
    if not ffn.is_moe:
        matmul = SWIGLU_MATRICES * hidden * ffn.intermediate_size
        bias = (2 * ffn.intermediate_size + hidden) * ffn.bias
        return FFNParams(dense=matmul + bias, dense_matmul=matmul)
    expert = SWIGLU_MATRICES * hidden * ffn.intermediate_size
    return FFNParams(
        routed=ffn.n_routed_experts * expert,
        routed_active=ffn.top_k * expert,
        shared=SWIGLU_MATRICES * hidden * ffn.shared_intermediate_size + hidden * ffn.shared_expert_gate,
        router=hidden * ffn.n_routed_experts,
        router_bias=ffn.n_routed_experts * ffn.router_bias,
    )


def layer_norm_params(arch: ArchSpec) -> int:
    """The two RMSNorm weight vectors of a block (before attention, before the FFN)."""
    return 2 * arch.hidden_size


def mtp_params(arch: ArchSpec) -> tuple[int, int]:
    """(total, active) weights of the MTP modules, excluding the shared embedding and output head.

    Each module (TR §2.2, README_WEIGHTS layer 61) is one more Transformer block with the MoE FFN, two
    RMSNorms on its inputs (enorm, hnorm), the projection M_k of 2 x hidden -> hidden (eh_proj), and the
    RMSNorm before the shared head (shared_head.norm).
    """
    if not arch.mtp_layers:
        return 0, 0
    h = arch.hidden_size
    ffn = ffn_params(h, arch.moe_ffn or arch.ffn[-1])
    block_common = attention_params(arch).total + layer_norm_params(arch) + 2 * h * h + 3 * h
    return arch.mtp_layers * (block_common + ffn.total), arch.mtp_layers * (block_common + ffn.active)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. ``total``/``active`` include embedding and head but exclude MTP (TR convention)."""

    embedding: int
    head: int
    attention: int
    dense_ffn: int
    routed_experts: int
    shared_experts: int
    router: int
    norms: int  # RMSNorm weights inside the layers (the final norm is separate)
    final_norm: int
    total: int
    active: int
    active_matmul: int
    mtp: int
    mtp_active: int

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def layers_total(self) -> int:
        """Weights inside the Transformer layers (no embedding, head, final norm or MTP)."""
        return self.total - self.embedding - self.head - self.final_norm


def param_count(arch: ArchSpec) -> ParamCount:
    """Count every weight of ``arch`` (see the module docstring for what ``total`` and ``active`` mean).

    ``active_matmul`` is the N_act_linear of the FLOPs rule: activated weight matrices in the layers, with
    no embedding, head, norm, bias or MTP.
    """
    h = arch.hidden_size
    attn = attention_params(arch)
    embedding = arch.vocab_size * h
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    final_norm = h
    attention = norms = dense = routed = shared = router = 0
    active = active_matmul = 0
    for ffn in arch.ffn:
        f = ffn_params(h, ffn)
        attention += attn.total
        norms += layer_norm_params(arch)
        dense += f.dense
        routed += f.routed
        shared += f.shared
        router += f.router + f.router_bias
        active += attn.total + layer_norm_params(arch) + f.active
        active_matmul += attn.matmul + f.active_matmul
    total = embedding + head + attention + norms + final_norm + dense + routed + shared + router
    mtp_total, mtp_active = mtp_params(arch)
    return ParamCount(
        embedding=embedding,
        head=head,
        attention=attention,
        dense_ffn=dense,
        routed_experts=routed,
        shared_experts=shared,
        router=router,
        norms=norms,
        final_norm=final_norm,
        total=total,
        active=active + embedding + head + final_norm,
        active_matmul=active_matmul,
        mtp=mtp_total,
        mtp_active=mtp_active,
    )


# ---------------------------------------------------------------------------------------------- KV cache
def kv_elements_per_token_per_layer(arch: ArchSpec) -> int:
    """Cached elements per token per layer: latent + RoPE key for MLA, K and V per KV head for GQA."""
    if arch.is_mla:
        return arch.kv_lora_rank + arch.qk_rope_head_dim
    return 2 * arch.num_kv_heads * arch.head_dim


def kv_bytes_per_token(arch: ArchSpec, cache_dtype: str = "bf16") -> int:
    """KV-cache bytes per token over all layers (ISCA Table 1: 70,272 B for DeepSeek-V3 in BF16)."""
    return kv_elements_per_token_per_layer(arch) * arch.num_layers * dtype_bytes(cache_dtype)


def materialised_kv_bytes_per_token(arch: ArchSpec, cache_dtype: str = "bf16") -> int:
    """KV bytes per token if MLA's keys and values were decompressed per head (a naive MLA cache).

    For GQA this equals :func:`kv_bytes_per_token`. DeepSeek-V3: 128 x (192 + 128) x 61 x 2 = 4,997,120 B.
    """
    if not arch.is_mla:
        return kv_bytes_per_token(arch, cache_dtype)
    per_layer = arch.num_heads * (arch.qk_head_dim + arch.v_head_dim)
    return per_layer * arch.num_layers * dtype_bytes(cache_dtype)


def kv_cache_kb(num_bytes: int) -> float:
    """Bytes in the paper's "KB" (1000 bytes): 70,272 B -> 70.272."""
    return num_bytes / BYTES_PER_PAPER_KB


# ---------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class TrainFlops:
    """Training FLOPs per token, term by term (see the module docstring for the rule)."""

    seq_len: int
    causal: bool
    matmul_params: int
    head_params: int
    matmul_gflop: float
    attention_gflop: float
    gflop_per_token: float
    rule: str = FLOPS_RULE


def attention_flops_per_token(
    arch: ArchSpec, *, seq_len: int, causal: bool, layers: int | None = None
) -> float:
    """Training FLOPs of QK^T and AV for one token against ``seq_len`` keys (x3 for backward)."""
    if seq_len <= 0:
        raise PlanError(f"seq_len must be a positive integer, got {seq_len}")
    layers = arch.num_layers if layers is None else layers
    keys = seq_len * (CAUSAL_FRACTION if causal else 1)
    per_layer = FLOPS_PER_MAC * keys * arch.num_heads * (arch.qk_head_dim + arch.v_dim)
    return TRAIN_PASSES * layers * per_layer


def train_flops_per_token(
    arch: ArchSpec, *, seq_len: int = 4096, causal: bool = True, include_mtp: bool = False
) -> TrainFlops:
    """Training FLOPs per token, term by term; ``include_mtp`` adds the MTP modules (a layer + head each)."""
    params = param_count(arch)
    matmul = params.active_matmul
    head = arch.vocab_size * arch.hidden_size
    attention = attention_flops_per_token(arch, seq_len=seq_len, causal=causal)
    if include_mtp and arch.mtp_layers:
        attn = attention_params(arch)
        moe = ffn_params(arch.hidden_size, arch.moe_ffn or arch.ffn[-1])
        eh_proj = 2 * arch.hidden_size * arch.hidden_size
        matmul += arch.mtp_layers * (attn.matmul + moe.active_matmul + eh_proj)
        head += arch.mtp_layers * arch.vocab_size * arch.hidden_size
        attention += attention_flops_per_token(arch, seq_len=seq_len, causal=causal, layers=arch.mtp_layers)
    matmul_gflop = TRAIN_FLOPS_PER_PARAM * (matmul + head) / GIGA
    attention_gflop = attention / GIGA
    return TrainFlops(
        seq_len=seq_len,
        causal=causal,
        matmul_params=matmul,
        head_params=head,
        matmul_gflop=matmul_gflop,
        attention_gflop=attention_gflop,
        gflop_per_token=matmul_gflop + attention_gflop,
    )


def train_gflops_per_token(
    arch: ArchSpec, *, seq_len: int = 4096, causal: bool = True, include_mtp: bool = False
) -> float:
    """Training GFLOP per token (ISCA Table 2: DeepSeek-V3 ~250, V2 155 at S = 4096, causal)."""
    return train_flops_per_token(
        arch, seq_len=seq_len, causal=causal, include_mtp=include_mtp
    ).gflop_per_token


def implied_gflops_per_token(*, tflops_per_gpu: float, gpus: int, tokens_per_day: float) -> float:
    """GFLOP per token implied by a measured throughput: TFLOPS x GPUs x seconds per day / tokens per day.

    ISCA Table 4 (MPFT): 385 TFLOPS (causal) x 2048 GPUs x 86400 s / 272.80e9 tokens = 249.7 GFLOP/token.
    """
    return tflops_per_gpu * TERA * gpus * SECONDS_PER_DAY / tokens_per_day / GIGA


# ---------------------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class TrainingCost:
    """GPU-hours and dollars per training stage (TR Table 1 layout)."""

    stages: tuple[tuple[str, int], ...]
    usd_per_gpu_hour: float

    @property
    def total_gpu_hours(self) -> int:
        return sum(hours for _, hours in self.stages)

    def stage_usd(self, stage: str) -> float:
        return dict(self.stages)[stage] * self.usd_per_gpu_hour

    @property
    def total_usd(self) -> float:
        return self.total_gpu_hours * self.usd_per_gpu_hour


def training_cost(gpu_hours: dict[str, int], *, usd_per_gpu_hour: float) -> TrainingCost:
    """Dollar cost of training stages given their GPU-hours (TR Table 1: $2 per H800 GPU-hour)."""
    if usd_per_gpu_hour < 0:
        raise PlanError(f"usd_per_gpu_hour must be >= 0, got {usd_per_gpu_hour}")
    return TrainingCost(stages=tuple(gpu_hours.items()), usd_per_gpu_hour=usd_per_gpu_hour)


TOKENS_PER_TRILLION = 10**12


def gpu_hours_per_trillion_tokens(gpu_hours: int, tokens: int) -> float:
    """GPU-hours per 10^12 training tokens (TR §1: 2664K / 14.8T = 180K)."""
    if tokens <= 0:
        raise PlanError(f"tokens must be positive, got {tokens}")
    return gpu_hours * TOKENS_PER_TRILLION / tokens
