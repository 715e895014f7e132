"""Memory per device for a training layout, what fits, and the KV capacity of a serving group.

Training layout. ``world = dp x tp x pp``. Pipeline parallelism (PP) gives stage s the layers
``[s*L//pp, (s+1)*L//pp)``; the embedding sits on the first stage, the final norm, output head and MTP
modules on the last (as DeepSeek-V3 places MTP, TR §2.2). Inside a stage, tensor parallelism (TP) splits
every non-expert weight and (with sequence parallelism) every activation by ``tp``. Expert parallelism (EP)
splits each MoE layer's routed experts over ``ep`` ranks carved out of the ``dp x tp`` ranks of a stage, so
a routed expert is replicated over ``dp x tp / ep`` ranks (its data-parallel degree); experts are not also
split by TP here.

Training state per parameter (TR §3.3.3 defaults): BF16 weights, FP32 gradients, FP32 master weights and
two BF16 AdamW moments. ZeRO (Rajbhandari et al. 2020) shards over each parameter's data-parallel degree:
stage 1 the master weights and moments (DeepSeek-V3 uses ZeRO-1, TR §3.2), stage 2 also the gradients,
stage 3 also the weights.

Activations (what backward needs, per token per layer, in the activation dtype; a FlashAttention kernel is
assumed, so no S x S score matrix is stored, only a per-head FP32 log-sum-exp):

* attention: block input (h), normed input (h), query/key/value entering the kernel, the kernel output, and
  for MLA the latent projections (c_Q, c_KV + k_R) and their normed copies;
* dense SwiGLU FFN: input, normed input (2h), gate, up and gate*up products (3 x width);
* MoE FFN: input, normed input (2h), router logits (experts), per activated routed expert the dispatched
  input and expert output (2h) and 3 x expert width; 3 x width for the shared experts.

Selective recomputation (TR §3.2.3) stores neither RMSNorm outputs nor MLA's per-head q, k, v (recomputed
from the stored latents). With full recomputation only each layer's input (h per token) is kept, plus one
layer's activations while that layer is recomputed in backward. Under 1F1B, stage s holds ``pp - s``
micro-batches in flight (Narayanan et al. 2021), so the first stage holds the most.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentmoe.plan.arch import ArchSpec, FFNSpec
from latentmoe.plan.arith import (
    SWIGLU_MATRICES,
    attention_params,
    dtype_bytes,
    ffn_params,
    kv_bytes_per_token,
    layer_norm_params,
    mtp_params,
    param_count,
)
from latentmoe.plan.errors import PlanError

ADAM_MOMENTS = 2  # AdamW keeps a first and a second moment per parameter
LSE_BYTES = 4  # FlashAttention keeps one FP32 log-sum-exp per head per token for backward
ZERO_STAGES = (0, 1, 2, 3)
RECOMPUTE_MODES = ("none", "selective", "full")
NO_MASTER = "none"  # no separate master copy (the weights are already the optimizer's copy)


@dataclass(frozen=True)
class ParallelLayout:
    """Data, tensor, pipeline and expert parallel degrees, and the ZeRO stage."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero_stage: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self, arch: ArchSpec) -> ParallelLayout:
        """Raise PlanError naming the degree that cannot work for ``arch``; returns self."""
        for name in ("dp", "tp", "pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"--{name} must be a positive integer, got {value!r}")
        if self.zero_stage not in ZERO_STAGES:
            raise PlanError(f"--zero must be one of {ZERO_STAGES}, got {self.zero_stage!r}")
        if self.pp > arch.num_layers:
            raise PlanError(f"--pp {self.pp} exceeds the {arch.num_layers} layers of {arch.name}")
        moe = arch.moe_ffn
        if moe is not None and self.ep > 1:
            if moe.n_routed_experts % self.ep:
                raise PlanError(
                    f"--ep {self.ep} does not divide the {moe.n_routed_experts} routed experts of {arch.name}"
                )
            if (self.dp * self.tp) % self.ep:
                raise PlanError(
                    f"--ep {self.ep} must divide dp x tp = {self.dp * self.tp} (EP ranks come from DP x TP)"
                )
        return self


@dataclass(frozen=True)
class Precision:
    """Storage types of the training state (TR §3.3.3: BF16 moments, FP32 master weights and gradients)."""

    weight: str = "bf16"
    grad: str = "fp32"
    master: str = "fp32"
    moment: str = "bf16"
    activation: str = "bf16"

    def master_bytes(self) -> int:
        return 0 if self.master == NO_MASTER else dtype_bytes(self.master)


@dataclass(frozen=True)
class StageMemory:
    """Bytes one device of a pipeline stage holds during training."""

    stage: int
    layers: int
    params: int  # parameters resident on the device (its shards)
    weights_bytes: int
    grads_bytes: int
    master_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    micro_batches_in_flight: int

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.grads_bytes
            + self.master_bytes
            + self.optimizer_bytes
            + self.activations_bytes
        )

    @property
    def static_bytes(self) -> int:
        """Everything but activations (what does not grow with the batch)."""
        return self.total_bytes - self.activations_bytes


# ---------------------------------------------------------------------------------------------- activations
def attention_activation_elements(arch: ArchSpec, recompute: str = "none") -> int:
    """Elements per token one attention block keeps for backward (FlashAttention).

    ``recompute="selective"`` is TR §3.2.3: RMSNorm outputs and MLA's up-projections (the per-head q, k, v
    built from the latents) are recomputed in backward instead of stored.
    """
    selective = recompute == "selective"
    h, nh = arch.hidden_size, arch.num_heads
    io = h if selective else 2 * h  # block input (residual) and its RMSNorm output
    if arch.is_mla:
        latent_norms = 0 if selective else arch.q_lora_rank + arch.kv_lora_rank
        latent = arch.q_lora_rank + arch.kv_lora_rank + arch.qk_rope_head_dim + latent_norms
        qkv = 0 if selective else nh * arch.qk_head_dim * 2 + nh * arch.v_head_dim
    else:
        latent = 0
        qkv = (nh + 2 * arch.num_kv_heads) * arch.head_dim
    out = nh * arch.v_dim
    return io + latent + qkv + out


def ffn_activation_elements(hidden: int, ffn: FFNSpec, recompute: str = "none") -> int:
    """Elements per token one FFN block keeps for backward (SwiGLU: gate, up, gate*up per expert)."""
    io = hidden if recompute == "selective" else 2 * hidden
    if not ffn.is_moe:
        return io + SWIGLU_MATRICES * ffn.intermediate_size
    routed = ffn.top_k * (2 * hidden + SWIGLU_MATRICES * ffn.intermediate_size)
    shared = SWIGLU_MATRICES * ffn.shared_intermediate_size
    return io + ffn.n_routed_experts + routed + shared


def layer_activation_bytes_per_token(
    arch: ArchSpec, ffn: FFNSpec, precision: Precision, recompute: str = "none"
) -> int:
    """Bytes per token one layer keeps for backward (before TP sharding); full recompute counts as none."""
    mode = "selective" if recompute == "selective" else "none"
    elements = attention_activation_elements(arch, mode) + ffn_activation_elements(
        arch.hidden_size, ffn, mode
    )
    return elements * dtype_bytes(precision.activation) + arch.num_heads * LSE_BYTES


# ---------------------------------------------------------------------------------------------- stages
def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Layer indices of pipeline ``stage`` (balanced split, the remainder spread over the later stages)."""
    return range(stage * num_layers // pp, (stage + 1) * num_layers // pp)


def _check_batch(*, seq_len: int, micro_batch: int, recompute: str) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if not isinstance(micro_batch, int) or micro_batch < 0:
        raise PlanError(f"--micro-batch must be a non-negative integer, got {micro_batch!r}")
    if recompute not in RECOMPUTE_MODES:
        raise PlanError(f"--recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")


def stage_memory(
    arch: ArchSpec,
    layout: ParallelLayout,
    precision: Precision,
    *,
    stage: int,
    seq_len: int,
    micro_batch: int,
    recompute: str = "none",
) -> StageMemory:
    """Memory of one device of pipeline ``stage`` (see the module docstring for every assumption)."""
    layout.validate(arch)
    _check_batch(seq_len=seq_len, micro_batch=micro_batch, recompute=recompute)
    h = arch.hidden_size
    layers = stage_layers(arch.num_layers, layout.pp, stage)
    attn = attention_params(arch).total
    dense_params = 0  # split by TP, replicated over DP
    expert_params = 0  # split by EP, replicated over dp*tp/ep
    for i in layers:
        f = ffn_params(h, arch.ffn[i])
        dense_params += attn + layer_norm_params(arch) + f.dense + f.shared + f.router + f.router_bias
        expert_params += f.routed
    if stage == 0:
        dense_params += arch.vocab_size * h
    if stage == layout.pp - 1:
        dense_params += h + (0 if arch.tie_word_embeddings else arch.vocab_size * h)
        mtp_total, _ = mtp_params(arch)
        moe = arch.moe_ffn
        mtp_routed = arch.mtp_layers * (ffn_params(h, moe).routed if moe is not None else 0)
        dense_params += mtp_total - mtp_routed
        expert_params += mtp_routed
    dense_dev = -(-dense_params // layout.tp)
    expert_dev = -(-expert_params // layout.ep)
    expert_dp = layout.dp * layout.tp // layout.ep

    def sharded(params: int, degree: int, stage_needed: int) -> int:
        return -(-params // degree) if layout.zero_stage >= stage_needed else params

    def state_bytes(per_param: int, stage_needed: int) -> int:
        return per_param * (
            sharded(dense_dev, layout.dp, stage_needed) + sharded(expert_dev, expert_dp, stage_needed)
        )

    in_flight = layout.pp - stage
    tokens = seq_len * micro_batch
    if recompute == "full":
        kept = len(layers) * h * dtype_bytes(precision.activation)
        working = max(
            (layer_activation_bytes_per_token(arch, arch.ffn[i], precision) for i in layers), default=0
        )
        activations = (kept * in_flight + working) * tokens
    else:
        per_token = sum(
            layer_activation_bytes_per_token(arch, arch.ffn[i], precision, recompute) for i in layers
        )
        activations = per_token * tokens * in_flight
    return StageMemory(
        stage=stage,
        layers=len(layers),
        params=dense_dev + expert_dev,
        weights_bytes=state_bytes(dtype_bytes(precision.weight), 3),
        grads_bytes=state_bytes(dtype_bytes(precision.grad), 2),
        master_bytes=state_bytes(precision.master_bytes(), 1),
        optimizer_bytes=state_bytes(ADAM_MOMENTS * dtype_bytes(precision.moment), 1),
        activations_bytes=-(-activations // layout.tp),
        micro_batches_in_flight=in_flight,
    )


def memory_per_device(
    arch: ArchSpec,
    layout: ParallelLayout,
    precision: Precision | None = None,
    *,
    seq_len: int = 4096,
    micro_batch: int = 1,
    recompute: str = "none",
) -> StageMemory:
    """The most loaded device's memory over all pipeline stages (the one that decides whether it fits)."""
    precision = precision or Precision()
    stages = [
        stage_memory(
            arch, layout, precision, stage=s, seq_len=seq_len, micro_batch=micro_batch, recompute=recompute
        )
        for s in range(layout.pp)
    ]
    return max(stages, key=lambda m: m.total_bytes)


def max_micro_batch(
    arch: ArchSpec,
    layout: ParallelLayout,
    precision: Precision | None = None,
    *,
    seq_len: int = 4096,
    recompute: str = "none",
    device_memory_bytes: float,
) -> int:
    """Largest micro-batch of ``seq_len`` sequences whose busiest stage fits the device (0 if none)."""
    precision = precision or Precision()
    if device_memory_bytes <= 0:
        raise PlanError(f"device memory must be > 0 bytes, got {device_memory_bytes}")
    best = None
    for s in range(layout.pp):
        static = stage_memory(
            arch, layout, precision, stage=s, seq_len=seq_len, micro_batch=0, recompute=recompute
        )
        one = stage_memory(
            arch, layout, precision, stage=s, seq_len=seq_len, micro_batch=1, recompute=recompute
        )
        per_sequence = one.activations_bytes
        free = device_memory_bytes - static.total_bytes
        fits = max(0, int(free // per_sequence))
        best = fits if best is None else min(best, fits)
    return best or 0


def max_seq_len(
    arch: ArchSpec,
    layout: ParallelLayout,
    precision: Precision | None = None,
    *,
    micro_batch: int = 1,
    recompute: str = "none",
    device_memory_bytes: float,
) -> int:
    """Longest training sequence that fits at ``micro_batch`` (activations grow linearly with length)."""
    per_token = max_micro_batch(
        arch, layout, precision, seq_len=1, recompute=recompute, device_memory_bytes=device_memory_bytes
    )
    return per_token // micro_batch if micro_batch else 0


# ---------------------------------------------------------------------------------------------- serving
@dataclass(frozen=True)
class ServingCapacity:
    """How many tokens of KV cache a group of devices holds after one copy of the weights.

    Weights are sharded evenly over all ``devices`` (the minimum any TP/EP layout can reach). Attention
    runs with ``attention_tp`` devices per sequence: GQA splits the cache by KV heads (up to the number of KV
    heads), MLA's latent cannot be split by head and is replicated on each TP rank (why DeepSeek serves MLA
    with data-parallel attention, TR §3.4).
    """

    devices: int
    weights_bytes_per_device: int
    free_bytes_per_device: int
    kv_bytes_per_token_per_device: float
    max_kv_tokens: int

    @property
    def fits(self) -> bool:
        return self.free_bytes_per_device > 0


def serving_capacity(
    arch: ArchSpec,
    *,
    devices: int,
    device_memory_bytes: float,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    attention_tp: int = 1,
) -> ServingCapacity:
    """KV tokens (summed over all sequences) that fit on ``devices`` after the weights (MTP included)."""
    if devices < 1 or attention_tp < 1 or devices % attention_tp:
        raise PlanError(
            f"serving needs devices >= 1 divisible by attention_tp, got {devices} and {attention_tp}"
        )
    if device_memory_bytes <= 0:
        raise PlanError(f"device memory must be > 0 bytes, got {device_memory_bytes}")
    weights = -(-param_count(arch).total_with_mtp * dtype_bytes(weight_dtype) // devices)
    free = int(device_memory_bytes) - weights
    shards = 1 if arch.is_mla else min(attention_tp, arch.num_kv_heads)
    kv_per_device = kv_bytes_per_token(arch, kv_dtype) / shards
    groups = devices // attention_tp
    tokens = groups * int(free // kv_per_device) if free > 0 else 0
    return ServingCapacity(
        devices=devices,
        weights_bytes_per_device=weights,
        free_bytes_per_device=free,
        kv_bytes_per_token_per_device=kv_per_device,
        max_kv_tokens=tokens,
    )
