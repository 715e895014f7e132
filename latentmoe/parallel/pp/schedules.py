"""Which ``torch.distributed.pipelining`` schedule runs the stages, where each virtual stage lives, and what every
rank records of it.

    --pp-schedule   torch class                      stages per rank   placement (stage → pipeline rank)
    1f1b            Schedule1F1B                     1                 s
    interleaved     ScheduleInterleaved1F1B          2                 s mod Q          (loop)
    zb              ScheduleInterleavedZeroBubble    1                 s                (ZB1P: B split in I + W)
    dualpipev       ScheduleDualPipeV                2                 V: s and 2Q−1−s on rank s

All four are torch's; this module only chooses, places and times them. :class:`TimedStage` is a
:class:`~torch.distributed.pipelining.PipelineStage` that records every chunk it runs — (kind, stage, micro-batch,
start, end, exposed EP communication) with kind F (forward), B (full backward), I (input-gradient backward), W
(weight-gradient backward) — the events the bubble measurement and the timeline plot are drawn from
(``latentmoe.parallel.pp.timeline``).

**DualPipe's overlap.** ScheduleDualPipeV's steady state is ``OVERLAP_F_B`` actions: the forward of one
micro-batch through one of the rank's stages paired with the backward of another micro-batch through its other
stage. torch runs the two one after the other; :func:`overlapped_f_b` (registered for that action with
``--ep-overlap``) runs them the way DeepSeek pairs them (TR §3.2.1): the backward runs while the forward's
expert-parallel all-to-alls are in flight. See ``latentmoe.parallel.pp.overlap``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    _Action,
    _add_send_recv,
    _ComputationType,
    _PipelineScheduleRuntime,
)

from latentmoe.config import ConfigError

SCHEDULE_NAMES = ("1f1b", "interleaved", "zb", "dualpipev")
PLANNER_NAME = {"1f1b": "1f1b", "interleaved": "1f1b", "zb": "zb1p", "dualpipev": "dualpipev"}


@dataclass(frozen=True)
class ScheduleKind:
    """How a schedule lays stages over ranks: ``per_rank`` virtual stages each, ``style`` "loop" or "v"."""

    name: str
    torch_class: type
    per_rank: int
    style: str
    min_microbatches_per_stage: int = 1  # micro-batches needed per virtual stage
    takes_list: bool = True  # constructed with the list of the rank's stages (PipelineScheduleMulti)


SCHEDULES = {
    "1f1b": ScheduleKind("1f1b", Schedule1F1B, 1, "loop", takes_list=False),
    "interleaved": ScheduleKind("interleaved", ScheduleInterleaved1F1B, 2, "loop"),
    "zb": ScheduleKind("zb", ScheduleInterleavedZeroBubble, 1, "loop"),
    "dualpipev": ScheduleKind("dualpipev", ScheduleDualPipeV, 2, "v"),
}


def schedule_kind(name: str) -> ScheduleKind:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ConfigError(f"--pp-schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {name!r}") from None


def stage_to_rank(n_stages: int, pp: int, style: str) -> list[int]:
    """Pipeline rank of every virtual stage: ``s mod Q`` (loop) or the V (0, 1, …, Q−1, Q−1, …, 0)."""
    if style == "loop":
        return [s % pp for s in range(n_stages)]
    return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]


def default_microbatches(rows: int, kind: ScheduleKind, pp: int) -> int:
    """The fewest micro-batches that divide ``rows`` and keep every virtual stage busy (≥ the stage count); all
    rows as micro-batches of one when that is not possible (an error follows if it is still too few)."""
    need = kind.per_rank * pp * kind.min_microbatches_per_stage
    for n in range(need, rows + 1):
        if rows % n == 0:
            return n
    return rows


def check_microbatches(n: int, rows: int, kind: ScheduleKind, pp: int) -> None:
    """One-line :class:`ConfigError` for a micro-batch count the schedule or the batch cannot take."""
    if n < 1 or rows % n:
        raise ConfigError(
            f"--microbatches {n} must divide the {rows} rows each pipeline gets (--batch-size over "
            "the data-parallel ranks of a stage)"
        )
    stages = kind.per_rank * pp
    if kind.name == "dualpipev" and n < stages:
        raise ConfigError(
            f"dualpipev needs at least as many micro-batches as virtual stages ({stages}), got {n}: raise "
            "--batch-size or --microbatches"
        )
    if kind.name in ("1f1b", "zb") and n < pp:
        raise ConfigError(f"--pp-schedule {kind.name} with --pp {pp} needs at least {pp} micro-batches, got {n}")
    if kind.name == "interleaved" and n % pp and n >= pp:
        raise ConfigError(f"interleaved needs micro-batches a multiple of --pp {pp} (or fewer), got {n}")


class ForwardOnlySchedule(_PipelineScheduleRuntime):
    """Validation through the pipeline: every micro-batch forward through each virtual stage in stage order (the
    forward half of GPipe / looped BFS), as an action table for torch's schedule runtime, which adds the sends and
    receives. torch's training schedules cannot run forward-only when stages share a rank (their ``eval`` trips
    over the V's local backward hand-off), whatever the placement this one can."""

    def __init__(self, stages: list[PipelineStage], n_microbatches: int, *, placement: list[int], loss_fn) -> None:
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self._has_backward = False
        order: dict[int, list[_Action | None]] = {r: [] for r in range(self.pp_group_size)}
        for stage, rank in enumerate(placement):
            order[rank] += [_Action(stage, _ComputationType.FORWARD, mb) for mb in range(n_microbatches)]
        self.pipeline_order = order
        # torch's lowering adds the sends and receives; its validation (a backward per forward) does not apply.
        self.stage_index_to_group_rank = dict(enumerate(placement))
        for stage in self._stages:
            stage.stage_index_to_group_rank = self.stage_index_to_group_rank
        self.pipeline_order_with_comms = _add_send_recv(
            order, stage_to_rank=lambda s: placement[s], num_stages=len(placement)
        )


# ---------------------------------------------------------------------------------------------- recording
@dataclass(frozen=True)
class ChunkEvent:
    """One chunk a rank ran: kind F | B | I | W, virtual ``stage``, micro-batch ``mb``, ``start`` / ``end`` in
    seconds since the step began, and the expert-parallel communication time left exposed inside it."""

    kind: str
    stage: int
    mb: int
    start: float
    end: float
    exposed_comm: float = 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "stage": self.stage, "mb": self.mb, "start": round(self.start, 7),
                "end": round(self.end, 7), "exposed_comm": round(self.exposed_comm, 7)}


@dataclass
class StepRecorder:
    """Events of the current step on this rank (``t0`` is the step's start); ``clock`` reads the exposed EP
    communication so far (seconds), so each event gets its own share."""

    clock: object = None
    t0: float = 0.0
    events: list[ChunkEvent] = field(default_factory=list)

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.events = []

    def exposed(self) -> float:
        return self.clock() if self.clock is not None else 0.0


class TimedStage(PipelineStage):
    """A ``PipelineStage`` that appends a :class:`ChunkEvent` for every forward / backward chunk it runs."""

    def __init__(self, *args, recorder: StepRecorder, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recorder

    def _timed(self, kind: str, mb: int, fn, *args, **kwargs):
        rec = self.recorder
        comm0, start = rec.exposed(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            rec.events.append(ChunkEvent(kind, self.stage_index, mb, start - rec.t0, end - rec.t0,
                                         rec.exposed() - comm0))

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        return self._timed("F", fwd_chunk_id, super().forward_one_chunk, fwd_chunk_id, args, kwargs,
                           save_forward_output)

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        if not self.has_backward:
            return super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        return self._timed("B" if full_backward else "I", bwd_chunk_id, super().backward_one_chunk, bwd_chunk_id,
                           loss, full_backward, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        if not self.has_backward:
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward)
        return self._timed("W", bwd_chunk_id, super().backward_weight_one_chunk, bwd_chunk_id, last_backward)


def meta_like(shape: tuple[int, ...], dtype: torch.dtype, *, requires_grad: bool = False) -> torch.Tensor:
    """An example tensor for a stage's static metadata (shape, dtype, whether a gradient flows back; no memory)."""
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)
