"""The measured schedule: chunk events per rank → busy time, idle (bubble) fraction, mean F / B / W chunk times,
and a timeline plot.

Every step each rank records the chunks it ran (``schedules.ChunkEvent``: F, B, I, W with start and end relative
to the step's start, and the expert-parallel communication left exposed inside). For one step on one rank::

    step_s          wall time of schedule.step (from the same starting line on every rank: the previous step's
                    collectives synchronise the ranks)
    busy_s          the union of the chunk intervals (an overlapped forward/backward pair counts once)
    idle fraction   1 − busy_s / step_s        what the planner's bubble formulas predict (plan/pipeline.py)

F is the mean forward chunk time; B the mean full backward (B events, or I + W of the same micro-batch when the
schedule splits it); W the mean weight-gradient chunk. They are the inputs of the formulas, so ``latentmoe plan
pipeline --measured RUN_DIR`` can put the measured idle fraction beside the one the formula predicts from the
run's own chunk times.

**Replayed bubble.** Wall-clock gaps on a shared CPU mix the schedule's bubble with everything else the machine
does. :func:`replay_idle` takes only the *order* in which every rank ran its chunks (what torch's schedule
actually did, as recorded) and replays it with the formulas' cost model — F = 1, B = 2 (I = W = 1), no
communication time — honouring the pipeline's dependencies (a stage's forward after the previous stage's, its
backward after the next stage's, W after I). The idle fraction it gives is the one the formulas describe, for the
schedule that really ran: 1F1B on 2 ranks with 4 micro-batches replays to exactly (PP−1)(F+B) / ((PP−1)(F+B) +
4(F+B)) = 20%.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("F", "B", "I", "W")
COLOURS = {"F": "#4c72b0", "B": "#dd8452", "I": "#c44e52", "W": "#55a868", "comm": "#222222"}


@dataclass
class StepTiming:
    """One step on one rank."""

    step_s: float
    busy_s: float
    f_s: list[float]
    b_s: list[float]
    w_s: list[float]

    @property
    def idle_fraction(self) -> float:
        return max(0.0, 1.0 - self.busy_s / self.step_s) if self.step_s > 0 else 0.0


def step_timing(events: Sequence, step_s: float) -> StepTiming:
    """Busy time and chunk times of one step's events (I + W of one micro-batch count as one B)."""
    f = [e.end - e.start for e in events if e.kind == "F"]
    b = [e.end - e.start for e in events if e.kind == "B"]
    split: dict[tuple[int, int], float] = {}
    for e in events:
        if e.kind in ("I", "W"):
            split[(e.stage, e.mb)] = split.get((e.stage, e.mb), 0.0) + e.end - e.start
    w = [e.end - e.start for e in events if e.kind == "W"]
    busy = union_length([(e.start, e.end) for e in events])
    return StepTiming(step_s=step_s, busy_s=busy, f_s=f, b_s=b + list(split.values()), w_s=w)


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class TimelineWindow:
    """Step timings since the last metrics record (one rank)."""

    steps: list[StepTiming] = field(default_factory=list)

    def add(self, events: Sequence, step_s: float) -> None:
        self.steps.append(step_timing(events, step_s))

    def summary(self) -> dict[str, float]:
        steps = self.steps
        step_s = sum(s.step_s for s in steps)
        busy = sum(s.busy_s for s in steps)
        return {
            "step_s": step_s,
            "busy_s": busy,
            "idle_fraction": max(0.0, 1.0 - busy / step_s) if step_s > 0 else 0.0,
            "f_s": _mean([x for s in steps for x in s.f_s]),
            "b_s": _mean([x for s in steps for x in s.b_s]),
            "w_s": _mean([x for s in steps for x in s.w_s]),
        }


def plot_timeline(events_per_rank: Sequence[Sequence[dict]], path: str | os.PathLike, *, title: str) -> Path:
    """One row per rank: F / B / I / W chunks as coloured bars (micro-batch number inside), a black tick below
    each for the EP communication it left exposed; gaps are the bubble."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(12, 1.6 + 0.7 * len(events_per_rank)))
    ax = fig.add_subplot()
    for rank, events in enumerate(events_per_rank):
        for e in events:
            ax.barh(rank, e["end"] - e["start"], left=e["start"], height=0.6, color=COLOURS[e["kind"]],
                    edgecolor="white", linewidth=0.5)
            ax.text((e["start"] + e["end"]) / 2, rank, str(e["mb"]), ha="center", va="center", fontsize=6,
                    color="white")
            if e.get("exposed_comm", 0) > 0:
                ax.barh(rank + 0.38, e["exposed_comm"], left=e["start"], height=0.12, color=COLOURS["comm"])
    ax.set_yticks(range(len(events_per_rank)), [f"rank {r}" for r in range(len(events_per_rank))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the step began")
    ax.set_title(title)
    labels = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weights)",
              "comm": "exposed EP all-to-all"}
    ax.legend(handles=[Patch(color=COLOURS[k], label=v) for k, v in labels.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.18), fontsize=7, ncols=5, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


UNIT_COSTS = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # the formulas' model: B = 2F, W = B/2


def replay_idle(events_per_rank: Sequence[Sequence[dict]], n_stages: int,
                costs: dict[str, float] = UNIT_COSTS) -> list[float]:
    """Idle fraction of every rank when its recorded chunk order is replayed with ``costs`` (see the module
    docstring). ``events_per_rank[r]``: rank r's events (``ChunkEvent.to_dict``), in any order (sorted by start).
    The step ends when the last rank finishes; a rank's idle fraction is 1 − its busy time / that."""
    queues = [sorted(evs, key=lambda e: (e["start"], e["end"])) for evs in events_per_rank]
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(queues)
    busy = [0.0] * len(queues)
    heads = [0] * len(queues)

    def ready(e: dict) -> float | None:
        """When ``e``'s inputs exist, or None if a dependency has not run yet."""
        kind, s, mb = e["kind"], e["stage"], e["mb"]
        deps = []
        if kind == "F" and s > 0:
            deps.append(("F", s - 1, mb))
        if kind in ("B", "I"):
            deps.append(("F", s, mb))
            if s < n_stages - 1:
                deps.append(("dI", s + 1, mb))
        if kind == "W":
            deps.append(("I", s, mb))
        times = []
        for d in deps:
            if d not in done:
                return None
            times.append(done[d])
        return max(times, default=0.0)

    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r, q in enumerate(queues):
            if heads[r] == len(q):
                continue
            e = q[heads[r]]
            t = ready(e)
            if t is None:
                continue
            start = max(free[r], t)
            end = start + costs[e["kind"]]
            free[r], busy[r] = end, busy[r] + costs[e["kind"]]
            key = (e["kind"], e["stage"], e["mb"])
            done[key] = end
            if e["kind"] in ("B", "I"):
                done[("dI", e["stage"], e["mb"])] = end  # the input gradient the previous stage waits for
            heads[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ValueError("the recorded chunk order cannot be replayed (a dependency never runs)")
    makespan = max(free)
    return [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]
