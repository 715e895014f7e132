"""Pipeline parallelism on paper: the bubble and memory of 1F1B, ZB1P, DualPipe and DualPipeV, per-layer costs,
and the split of the layers into stages that balances them. Pure functions, no torch.

**Bubbles** (TR Table 2 and the DualPipe README, paper.md §16 check 19). ``PP`` is the number of pipeline
*stages*; F is the time of one stage's forward chunk, B of its full backward chunk (input + weight gradients),
W of the weight-gradient part alone, F&B of a forward and a backward chunk run overlapped on one device::

    1F1B       (PP − 1)(F + B)                 params 1x   activations PP      PP devices
    ZB1P       (PP − 1)(F + B − 2W)            params 1x   activations PP      PP devices
    DualPipe   (PP/2 − 1)(F&B + B − 3W)        params 2x   activations PP + 1  PP devices
    DualPipeV  (PP/2 − 1)(F&B + B − 3W)        params 2x   activations PP + 1  PP/2 devices

"params" is in units of one stage's parameters and "activations" in units of one stage's activations for one
micro-batch, both for the most loaded device. DualPipe keeps two copies of the model (one per direction), so a
device holds two stages; DualPipeV folds the same schedule into a V over PP/2 devices, each holding stage i and
stage PP−1−i, so its device holds the same parameters as a 1F1B device with PP/2 stages.

Interleaved 1F1B (Narayanan et al. 2021; ``--pp-schedule interleaved``) with two stages per device has the 1F1B
bubble in chunk times: ``(PP/2 − 1)(F + B)`` on PP/2 devices.

**Bubble fraction.** A device is busy for ``n`` micro-batches × its stages × (F + B) and idle for the bubble, so
its idle fraction is ``bubble / (bubble + work)``. With F, B, W measured by the trainer the formula predicts the
idle fraction the run should show (``latentmoe plan pipeline --measured RUN_DIR``).

**Stage split.** :func:`layer_costs` gives the forward FLOPs per token of every decoder layer (the planner's
training-FLOP rule, ``latentmoe.plan.arith``, forward third) and of the pieces pinned to the ends: the
embedding lookup on the first stage, the final norm + output head + MTP modules on the last.
:func:`balanced_split` cuts the layers into contiguous stages minimising the most expensive stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from latentmoe.plan.arch import ArchSpec
from latentmoe.plan.arith import (
    CAUSAL_FRACTION,
    FLOPS_PER_MAC,
    attention_params,
    ffn_params,
    layer_norm_params,
    mtp_params,
)
from latentmoe.plan.errors import PlanError
from latentmoe.plan.memory import Precision, layer_activation_bytes_per_token, stage_layers

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")  # the paper's table (TR Table 2, DualPipe README)
INTERLEAVED = "interleaved"  # Narayanan et al. 2021, two stages per device: not in the paper, run by the trainer
BIDIRECTIONAL = ("dualpipe", "dualpipev")  # PP must be even; F&B overlap; 2 stages per device
PARAMS_MULTIPLIER = {"1f1b": 1, "zb1p": 1, "dualpipe": 2, "dualpipev": 2, INTERLEAVED: 2}


# ---------------------------------------------------------------------------------------------- bubbles
@dataclass(frozen=True)
class ChunkTimes:
    """Times (any unit) of one stage's chunks: forward F, full backward B, weight-gradient part W (W ≤ B), and
    F&B, a forward and a backward overlapped on one device (None: no overlap, F&B = F + B)."""

    forward: float
    backward: float
    weight: float = 0.0
    overlapped: float | None = None

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "weight"):
            if getattr(self, name) < 0:
                raise PlanError(f"chunk time {name} must be >= 0, got {getattr(self, name)}")
        if self.weight > self.backward:
            raise PlanError(f"W ({self.weight}) cannot exceed the full backward B ({self.backward})")
        if self.overlapped is not None and self.overlapped < 0:
            raise PlanError(f"F&B must be >= 0, got {self.overlapped}")

    @property
    def f_and_b(self) -> float:
        return self.forward + self.backward if self.overlapped is None else self.overlapped


def _check_pp(pp: int, schedule: str) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise PlanError(f"PP must be a positive integer, got {pp!r}")
    if schedule in (*BIDIRECTIONAL, INTERLEAVED) and pp % 2:
        raise PlanError(f"{schedule} needs an even number of stages, got PP = {pp}")


def bubble_1f1b(pp: int, t: ChunkTimes) -> float:
    """``(PP − 1)(F + B)`` (TR Table 2)."""
    _check_pp(pp, "1f1b")
    return (pp - 1) * (t.forward + t.backward)


def bubble_zb1p(pp: int, t: ChunkTimes) -> float:
    """``(PP − 1)(F + B − 2W)`` (TR Table 2): the weight gradients fill two chunks' worth of each bubble."""
    _check_pp(pp, "zb1p")
    return (pp - 1) * (t.forward + t.backward - 2 * t.weight)


def bubble_dualpipe(pp: int, t: ChunkTimes) -> float:
    """``(PP/2 − 1)(F&B + B − 3W)`` (TR Table 2; DualPipeV the same on PP/2 devices)."""
    _check_pp(pp, "dualpipe")
    return (pp // 2 - 1) * (t.f_and_b + t.backward - 3 * t.weight)


def bubble_interleaved(pp: int, t: ChunkTimes) -> float:
    """``(PP/2 − 1)(F + B)``: 1F1B's bubble over PP/2 devices holding two stages each."""
    _check_pp(pp, INTERLEAVED)
    return (pp // 2 - 1) * (t.forward + t.backward)


def bubble(schedule: str, pp: int, t: ChunkTimes) -> float:
    """The bubble of ``schedule`` (one of :data:`SCHEDULES`, or "interleaved") with ``pp`` stages."""
    if schedule == INTERLEAVED:
        return bubble_interleaved(pp, t)
    if schedule == "1f1b":
        return bubble_1f1b(pp, t)
    if schedule == "zb1p":
        return bubble_zb1p(pp, t)
    if schedule in BIDIRECTIONAL:
        _check_pp(pp, schedule)
        return bubble_dualpipe(pp, t)
    raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def devices(schedule: str, pp: int) -> int:
    """Devices a ``pp``-stage pipeline occupies: PP, or PP/2 for DualPipeV and interleaved."""
    _check_pp(pp, schedule)
    return pp // 2 if schedule in ("dualpipev", INTERLEAVED) else pp


def stages_per_device(schedule: str) -> int:
    return 2 if schedule in (*BIDIRECTIONAL, INTERLEAVED) else 1


def activation_multiplier(schedule: str, pp: int) -> int:
    """Stage activations (for one micro-batch) the most loaded device holds: PP, or PP + 1 for DualPipe(V)."""
    _check_pp(pp, schedule)
    return pp + 1 if schedule in BIDIRECTIONAL else pp


def device_work(schedule: str, n_microbatches: int, t: ChunkTimes) -> float:
    """Busy time of one device per step: micro-batches × stage chunks it runs each × (F + B).

    DualPipe's two directions share the micro-batches (n/2 each way through two stages: n chunks per device);
    DualPipeV sends every micro-batch through both of its device's stages (2n chunks)."""
    chunks = 2 * n_microbatches if schedule in ("dualpipev", INTERLEAVED) else n_microbatches
    return chunks * (t.forward + t.backward)


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, t: ChunkTimes) -> float:
    """Idle share of one device's step: bubble / (bubble + work) (a bubble below zero — W larger than the formula's
    model allows — counts as none)."""
    b = max(0.0, bubble(schedule, pp, t))
    total = b + device_work(schedule, n_microbatches, t)
    return b / total if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class LayerCosts:
    """Forward FLOPs per token: ``layers`` (one per decoder layer), ``first`` (the embedding lookup: no FLOPs)
    and ``last`` (final norm + output head + the MTP modules, each a block, its projection and the head)."""

    layers: tuple[float, ...]
    first: float
    last: float


def _forward_attention_flops(arch: ArchSpec, seq_len: int) -> float:
    keys = seq_len * CAUSAL_FRACTION  # causal: half the score matrix
    return FLOPS_PER_MAC * keys * arch.num_heads * (arch.qk_head_dim + arch.v_dim)


def layer_costs(arch: ArchSpec, *, seq_len: int) -> LayerCosts:
    """Per-layer forward FLOPs per token (matmuls: 2 per activated weight; attention: QKᵀ and AV, causal)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"seq_len must be a positive integer, got {seq_len!r}")
    h = arch.hidden_size
    attn = attention_params(arch).matmul
    attention = _forward_attention_flops(arch, seq_len)
    layers = []
    for ffn in arch.ffn:
        f = ffn_params(h, ffn)
        matmul = f.dense_matmul + f.shared + f.router + f.routed_active
        layers.append(FLOPS_PER_MAC * (attn + matmul) + attention)
    head = FLOPS_PER_MAC * arch.vocab_size * h
    last = head
    if arch.mtp_layers:
        moe = ffn_params(h, arch.moe_ffn or arch.ffn[-1])
        eh_proj = 2 * h * h
        per_module = FLOPS_PER_MAC * (attn + moe.shared + moe.router + moe.routed_active + eh_proj) + attention
        last += arch.mtp_layers * (per_module + head)
    return LayerCosts(layers=tuple(layers), first=0.0, last=float(last))


def balanced_split(costs: LayerCosts, parts: int) -> list[int]:
    """Layers per stage (``parts`` contiguous stages, possibly empty) minimising the costliest stage, the first
    stage carrying ``costs.first`` and the last ``costs.last``; ties go to the more even split (smaller sum of
    squared stage costs), then to earlier stages holding more layers."""
    n = len(costs.layers)
    if not isinstance(parts, int) or parts < 1:
        raise PlanError(f"the number of stages must be a positive integer, got {parts!r}")
    prefix = [0.0]
    for c in costs.layers:
        prefix.append(prefix[-1] + c)

    def stage_cost(part: int, a: int, b: int) -> float:
        extra = (costs.first if part == 0 else 0.0) + (costs.last if part == parts - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[p][i]: (max cost, sum of squares, counts) for layers [0, i) in the first p + 1 stages
    best: list[list[tuple[float, float, tuple[int, ...]] | None]] = [[None] * (n + 1) for _ in range(parts)]
    for i in range(n + 1):
        c = stage_cost(0, 0, i)
        best[0][i] = (c, c * c, (i,))
    for p in range(1, parts):
        for i in range(n + 1):
            candidates = []
            for j in range(i, -1, -1):  # the last stage holds [j, i); j from i down keeps earlier stages fuller
                prev = best[p - 1][j]
                c = stage_cost(p, j, i)
                candidates.append((max(prev[0], c), prev[1] + c * c, (*prev[2], i - j)))
            best[p][i] = min(candidates, key=lambda x: (x[0], x[1], tuple(-k for k in x[2])))
    return list(best[parts - 1][n][2])


def split_cost(costs: LayerCosts, counts: Sequence[int]) -> list[float]:
    """The forward cost of each stage of a split (``counts`` layers per stage, summing to the layer count)."""
    if sum(counts) != len(costs.layers) or any(c < 0 for c in counts):
        raise PlanError(f"layer counts {list(counts)} do not split {len(costs.layers)} layers")
    out, start = [], 0
    for p, k in enumerate(counts):
        c = sum(costs.layers[start : start + k])
        c += (costs.first if p == 0 else 0.0) + (costs.last if p == len(counts) - 1 else 0.0)
        out.append(c)
        start += k
    return out


# ---------------------------------------------------------------------------------------------- one plan
@dataclass(frozen=True)
class PipelineRow:
    """One schedule's figures for a layout. ``stage_params``: parameters of one stage (of the ``pp``);
    ``device_params`` / ``device_activation_stages``: what the most loaded device holds."""

    schedule: str
    pp: int
    devices: int
    microbatches: int
    bubble: float
    bubble_fraction: float
    params_multiplier: int
    activation_multiplier: int
    device_params: int
    device_activation_bytes: int
    formula: str


FORMULAS = {
    INTERLEAVED: "(PP/2-1)(F+B)",
    "1f1b": "(PP-1)(F+B)",
    "zb1p": "(PP-1)(F+B-2W)",
    "dualpipe": "(PP/2-1)(F&B+B-3W)",
    "dualpipev": "(PP/2-1)(F&B+B-3W)",
}


def stage_params(arch: ArchSpec, pp: int) -> int:
    """Parameters of the heaviest of ``pp`` stages of the even layer split (``latentmoe.plan.memory.stage_layers``),
    the embedding on the first stage and final norm + head + MTP on the last: the unit of the 1×/2× column."""
    h = arch.hidden_size
    per_layer = [attention_params(arch).total + layer_norm_params(arch) + ffn_params(h, f).total for f in arch.ffn]
    head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    out = []
    for s in range(pp):
        params = sum(per_layer[i] for i in stage_layers(len(per_layer), pp, s))
        params += arch.vocab_size * h if s == 0 else 0
        params += h + head + mtp_params(arch)[0] if s == pp - 1 else 0
        out.append(params)
    return max(out)


def stage_activation_bytes(arch: ArchSpec, pp: int, precision: Precision, *, seq_len: int, micro_batch: int) -> int:
    """What the heaviest of ``pp`` stages keeps for backward of one micro-batch (``latentmoe.plan.memory``'s
    per-layer activation bytes × its layers × tokens): the unit of the PP / PP+1 activation column."""
    def stage(s: int) -> int:
        return sum(layer_activation_bytes_per_token(arch, arch.ffn[i], precision)
                   for i in stage_layers(arch.num_layers, pp, s))

    per_token = max(stage(s) for s in range(pp))
    return per_token * seq_len * micro_batch


def pipeline_rows(
    arch: ArchSpec,
    *,
    pp: int,
    microbatches: int,
    times: ChunkTimes,
    stage_activation_bytes: int,
    schedules: Sequence[str] = SCHEDULES,
) -> list[PipelineRow]:
    """Bubble, parameters and activations per device of every schedule for ``pp`` stages and ``microbatches``.

    ``stage_activation_bytes``: what one stage keeps for backward of one micro-batch (``latentmoe.plan.memory``).
    """
    if not isinstance(microbatches, int) or microbatches < 1:
        raise PlanError(f"micro-batches must be a positive integer, got {microbatches!r}")
    one_stage = stage_params(arch, pp)
    rows = []
    for s in schedules:
        if s not in SCHEDULES:
            raise PlanError(f"unknown schedule {s!r}; choose one of {', '.join(SCHEDULES)}")
        if s in BIDIRECTIONAL and pp % 2:
            continue  # DualPipe(V) needs an even PP; the caller sees which rows exist
        act = activation_multiplier(s, pp)
        rows.append(PipelineRow(
            schedule=s,
            pp=pp,
            devices=devices(s, pp),
            microbatches=microbatches,
            bubble=bubble(s, pp, times),
            bubble_fraction=bubble_fraction(s, pp, microbatches, times),
            params_multiplier=PARAMS_MULTIPLIER[s],
            activation_multiplier=act,
            device_params=PARAMS_MULTIPLIER[s] * one_stage,
            device_activation_bytes=act * stage_activation_bytes,
            formula=FORMULAS[s],
        ))
    return rows


# ---------------------------------------------------------------------------------------------- measured
TRAINER_SCHEDULES = {"1f1b": "1f1b", "interleaved": INTERLEAVED, "zb": "zb1p", "dualpipev": "dualpipev"}


@dataclass(frozen=True)
class MeasuredPipeline:
    """A trainer run's pipeline beside the formula: ``schedule`` (planner name), ``pp`` stages, chunk ``times``
    measured by the trainer (mean over ranks and logged windows), the wall-clock idle fraction ``measured`` per
    rank and the one the formula ``predicted`` from those times; ``replayed_per_rank``: the run's chunk order
    replayed with F = 1, B = 2, W = 1 (``latentmoe.parallel.pp.timeline.replay_idle``), beside the formula at those
    costs (``unit_predicted``)."""

    schedule: str
    pp: int
    devices: int
    microbatches: int
    times: ChunkTimes
    measured_per_rank: tuple[float, ...]
    predicted: float
    formula: str
    replayed_per_rank: tuple[float, ...] = ()
    unit_predicted: float = 0.0

    @property
    def measured_mean(self) -> float:
        return sum(self.measured_per_rank) / len(self.measured_per_rank) if self.measured_per_rank else 0.0


def measured_pipeline(layout: dict, records: Sequence[dict], *, skip_first: bool = True) -> MeasuredPipeline:
    """The bubble a run recorded (``pp_layout.json`` + the ``pp_*`` metrics of ``metrics.jsonl``) and the formula's
    prediction from the run's own chunk times. The first logged window holds the first step's one-off set-up (the
    pipeline's connections), so it is left out when there are others."""
    rows = [r for r in records if isinstance(r.get("pp_idle_fraction"), list)]
    if not rows:
        raise PlanError("the run has no pp_* metrics (not a --pp run, or no step was logged)")
    if skip_first and len(rows) > 1:
        rows = rows[1:]
    try:
        schedule = TRAINER_SCHEDULES[layout["schedule"]]
        pp = int(layout["virtual_stages"])
        microbatches = int(rows[-1]["pp_microbatches"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"pp_layout.json / metrics are missing a field ({exc})") from None

    def mean_of(key: str) -> float:
        values = [x for r in rows for x in r.get(key, []) if x > 0]
        return sum(values) / len(values) if values else 0.0

    f, b, w = mean_of("pp_forward_chunk_s"), mean_of("pp_backward_chunk_s"), mean_of("pp_weight_chunk_s")
    # torch runs the first stage's whole backward as its "W" (no input gradient to split off): W ≤ B/2 keeps the
    # formula's W the weight half it means
    times = ChunkTimes(forward=f, backward=b, weight=min(w, b / 2))
    n_ranks = len(rows[0]["pp_idle_fraction"])
    per_rank = tuple(sum(r["pp_idle_fraction"][i] for r in rows) / len(rows) for i in range(n_ranks))
    replayed = tuple(rows[-1].get("pp_replayed_idle_fraction") or ())
    unit = ChunkTimes(forward=1.0, backward=2.0, weight=1.0)
    return MeasuredPipeline(
        schedule=schedule,
        pp=pp,
        devices=devices(schedule, pp),
        microbatches=microbatches,
        times=times,
        measured_per_rank=per_rank,
        predicted=bubble_fraction(schedule, pp, microbatches, times),
        formula=FORMULAS[schedule],
        replayed_per_rank=replayed,
        unit_predicted=bubble_fraction(schedule, pp, microbatches, unit),
    )
