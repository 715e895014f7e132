"""A flow-level network simulator: max-min fair sharing of link bandwidth, run until every flow finishes.

Model. A network is a set of directed links with capacities (bytes/s). A flow is a fixed number of bytes
on a fixed path (a sequence of links). At every instant the rates are the max-min fair allocation
(Bertsekas & Gallager, "Data Networks", §6.5.2), computed by progressive filling: all unfinished flows'
rates rise together; when a link fills up, the flows crossing it are frozen at their current rate; repeat
with the remaining flows until every flow is frozen. Between events the rates are constant, so the
simulator jumps straight to the next flow completion, removes the finished flows, and recomputes.

What it ignores: packets, latency and propagation delay, congestion-control dynamics (it assumes a
transport that converges instantly to max-min fairness), switch buffers, head-of-line blocking, per-message
overheads, and the CPU/GPU cost of sending. A flow split over several paths (ECMP) is given as several
flows, each fair-shared on its own (ideal packet spraying, no hash collisions).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from latentmoe.plan.errors import PlanError

# A link is saturated when its residual capacity is below this fraction of its capacity (float round-off).
SATURATION_RTOL = 1e-9
# A flow is finished when its remaining bytes are below this fraction of its size.
COMPLETION_RTOL = 1e-9


@dataclass(frozen=True)
class Flow:
    """``size_bytes`` to send along ``path`` (link ids, in order)."""

    path: tuple[Hashable, ...]
    size_bytes: float


@dataclass(frozen=True)
class FlowSimResult:
    """Completion time of each flow (seconds, in input order) and of the last one."""

    finish_s: tuple[float, ...]
    makespan_s: float
    events: int


def _incidence(
    paths: Sequence[Sequence[Hashable]], links: Mapping[Hashable, float]
) -> tuple[np.ndarray, ...]:
    """(flow index, link index) pairs for every hop, plus the capacity vector in link-index order."""
    index = {link: i for i, link in enumerate(links)}
    flows, hops = [], []
    for f, path in enumerate(paths):
        if not path:
            raise PlanError(f"flow {f} has an empty path")
        for link in path:
            if link not in index:
                raise PlanError(f"flow {f} uses link {link!r}, which is not in the network")
            flows.append(f)
            hops.append(index[link])
    capacity = np.array([float(c) for c in links.values()])
    if (capacity <= 0).any():
        bad = next(link for link, c in links.items() if c <= 0)
        raise PlanError(f"link {bad!r} has capacity {links[bad]}; capacities must be > 0")
    return np.array(flows, dtype=np.int64), np.array(hops, dtype=np.int64), capacity


def _max_min_rates(
    flow_of_hop: np.ndarray, link_of_hop: np.ndarray, capacity: np.ndarray, active: np.ndarray
) -> np.ndarray:
    """Progressive filling over the ``active`` flows; returns a rate per flow (0 for inactive ones)."""
    n_flows, n_links = active.shape[0], capacity.shape[0]
    rate = np.zeros(n_flows)
    frozen = ~active
    residual = capacity.copy()
    while not frozen.all():
        live_hop = ~frozen[flow_of_hop]
        count = np.bincount(link_of_hop[live_hop], minlength=n_links)
        used = count > 0
        share = np.full(n_links, np.inf)
        share[used] = residual[used] / count[used]
        increment = share.min()
        rate[~frozen] += increment
        residual -= increment * count
        saturated = used & (residual <= SATURATION_RTOL * capacity)
        newly = np.zeros(n_flows, dtype=bool)
        newly[flow_of_hop[live_hop & saturated[link_of_hop]]] = True
        frozen |= newly
    return rate


def max_min_fair_rates(
    paths: Sequence[Sequence[Hashable]], capacity: Mapping[Hashable, float]
) -> tuple[float, ...]:
    """Max-min fair rate (bytes/s) of each flow on ``paths`` sharing links of ``capacity`` bytes/s."""
    flow_of_hop, link_of_hop, cap = _incidence(paths, capacity)
    rates = _max_min_rates(flow_of_hop, link_of_hop, cap, np.ones(len(paths), dtype=bool))
    return tuple(float(r) for r in rates)


def simulate_flows(flows: Sequence[Flow], capacity: Mapping[Hashable, float]) -> FlowSimResult:
    """Run ``flows`` (all starting at t = 0) to completion under max-min fair sharing."""
    if not flows:
        return FlowSimResult(finish_s=(), makespan_s=0.0, events=0)
    flow_of_hop, link_of_hop, cap = _incidence([f.path for f in flows], capacity)
    size = np.array([float(f.size_bytes) for f in flows])
    if (size < 0).any():
        raise PlanError("flow sizes must be >= 0 bytes")
    remaining = size.copy()
    finish = np.zeros(len(flows))
    active = remaining > 0
    now, events = 0.0, 0
    while active.any():
        rate = _max_min_rates(flow_of_hop, link_of_hop, cap, active)
        dt = (remaining[active] / rate[active]).min()
        now += dt
        remaining[active] -= rate[active] * dt
        done = active & (remaining <= COMPLETION_RTOL * size)
        finish[done] = now
        active &= ~done
        events += 1
    return FlowSimResult(finish_s=tuple(float(t) for t in finish), makespan_s=float(now), events=events)
