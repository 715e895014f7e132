"""Traffic accounting of the expert-parallel all-to-all, per rank, by link class.

Every exchange the EP layer issues is charged to the rank that *sends* it, split by where the bytes go:

* ``local``: to itself (a memory copy, no link);
* ``intra``: to another rank on the same node (NVLink on a real machine);
* ``inter``: to a rank on another node (the scale-out network, IB; the slow link of ISCA §4.3).

Phases are counted apart: ``dispatch`` (tokens to experts) and ``combine`` (weighted expert outputs back)
in the forward, and ``backward`` (the two reverse exchanges of the gradients). ``meta`` is the routing
metadata (split sizes, expert slots, gate weights), charged separately so that payload bytes compare with
the planner's formula (hidden × bytes per element per message).

**DeepEP-style two-hop count.** Our all-to-all sends a token once to *every* destination rank; DeepEP's
internode kernels send it once per destination *node* over IB and fan it out inside that node over NVLink.
``two_hop_inter`` counts what the inter-node link would carry that way: one row per (token, remote node)
pair, for dispatch and for combine (whose partial sums are reduced inside the remote node first). It is
charged to the token's home rank. Node-limited routing (at most M nodes per token, TR §2.1.2) bounds it
by ``tokens × (M − [own node among them]) × row bytes``.

``tokens_by_nodes[n]`` counts dispatched tokens whose experts lie on exactly ``n`` distinct nodes; with
node-limited routing every entry above M is zero — the tests read it from here, not from the router.

:func:`link_bytes` and :func:`node_fanout` are pure; :class:`TrafficCounters` is a flat, summable record
(``to_tensor`` / ``from_tensor`` for the all-reduce over ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from latentmoe.device import HOST

PHASES = ("dispatch", "combine", "backward")
LINKS = ("local", "intra", "inter")


@dataclass
class LinkBytes:
    """Bytes sent to this rank itself, to ranks on its node, and to other nodes."""

    local: int = 0
    intra: int = 0
    inter: int = 0

    @property
    def wire(self) -> int:
        """Bytes that cross a link (everything but the copy to itself)."""
        return self.intra + self.inter

    @property
    def total(self) -> int:
        return self.local + self.intra + self.inter


def link_bytes(bytes_per_peer: Sequence[int], *, my_ep_rank: int, peer_nodes: Sequence[int]) -> LinkBytes:
    """Classify the bytes sent to each EP peer (``bytes_per_peer[r]`` to EP rank r, whose node is
    ``peer_nodes[r]``) as local / intra-node / inter-node."""
    if len(bytes_per_peer) != len(peer_nodes):
        raise ValueError(f"{len(bytes_per_peer)} byte counts for {len(peer_nodes)} peers")
    my_node = peer_nodes[my_ep_rank]
    out = LinkBytes()
    for r, (b, node) in enumerate(zip(bytes_per_peer, peer_nodes, strict=True)):
        if r == my_ep_rank:
            out.local += int(b)
        elif node == my_node:
            out.intra += int(b)
        else:
            out.inter += int(b)
    return out


@dataclass
class NodeFanout:
    """Per dispatched token: ``nodes_T`` distinct nodes its rows go to, ``remote_T`` of them not its own."""

    nodes_T: torch.Tensor
    remote_T: torch.Tensor


def node_fanout(
    token_N: torch.Tensor, dest_N: torch.Tensor, *, n_tokens: int, peer_nodes: Sequence[int], my_node: int
) -> NodeFanout:
    """Distinct destination nodes per token from the rows of a dispatch (``token_N``, ``dest_N`` int64 ``[N]``:
    source token and destination EP rank of each row)."""
    node_of_rank = torch.as_tensor(list(peer_nodes), dtype=torch.int64, device=dest_N.device)
    n_nodes = int(node_of_rank.max()) + 1 if len(peer_nodes) else 1
    node_N = node_of_rank[dest_N]
    hit_TM = torch.zeros(n_tokens, n_nodes, dtype=torch.bool, device=dest_N.device)
    hit_TM[token_N, node_N] = True
    nodes_T = hit_TM.sum(dim=1)
    remote_T = nodes_T - hit_TM[:, my_node].to(nodes_T.dtype) if my_node < n_nodes else nodes_T
    return NodeFanout(nodes_T, remote_T)


@dataclass
class TrafficCounters:
    """Bytes and rows one rank sent, accumulated over any number of EP exchanges (see module docstring).

    ``tokens``: tokens dispatched; ``rows``: rows dispatched (one per token and destination rank);
    ``max_nodes_per_token``: the largest ``n`` with ``tokens_by_nodes[n] > 0``.
    """

    dispatch: LinkBytes = field(default_factory=LinkBytes)
    combine: LinkBytes = field(default_factory=LinkBytes)
    backward: LinkBytes = field(default_factory=LinkBytes)
    meta: int = 0
    two_hop_inter_dispatch: int = 0
    two_hop_inter_combine: int = 0
    tokens: int = 0
    rows: int = 0
    tokens_by_nodes: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ accumulation
    def add_links(self, phase: str, links: LinkBytes) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        mine: LinkBytes = getattr(self, phase)
        mine.local += links.local
        mine.intra += links.intra
        mine.inter += links.inter

    def add_fanout(self, fanout: NodeFanout, *, dispatch_row_bytes: int, combine_row_bytes: int) -> None:
        remote = int(fanout.remote_T.sum())
        self.two_hop_inter_dispatch += remote * dispatch_row_bytes
        self.two_hop_inter_combine += remote * combine_row_bytes
        self.tokens += int(fanout.nodes_T.numel())
        self.tokens_by_nodes = _add_lists(self.tokens_by_nodes, torch.bincount(fanout.nodes_T).tolist())

    def merge(self, other: TrafficCounters) -> None:
        for phase in PHASES:
            self.add_links(phase, getattr(other, phase))
        self.meta += other.meta
        self.two_hop_inter_dispatch += other.two_hop_inter_dispatch
        self.two_hop_inter_combine += other.two_hop_inter_combine
        self.tokens += other.tokens
        self.rows += other.rows
        self.tokens_by_nodes = _add_lists(self.tokens_by_nodes, other.tokens_by_nodes)

    def reset(self) -> None:
        fresh = TrafficCounters()
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    # ------------------------------------------------------------------ derived
    @property
    def max_nodes_per_token(self) -> int:
        nonzero = [n for n, c in enumerate(self.tokens_by_nodes) if c]
        return max(nonzero) if nonzero else 0

    @property
    def mean_nodes_per_token(self) -> float:
        tokens = sum(self.tokens_by_nodes)
        return sum(n * c for n, c in enumerate(self.tokens_by_nodes)) / tokens if tokens else 0.0

    @property
    def intra(self) -> int:
        """Intra-node bytes over all phases."""
        return sum(getattr(self, p).intra for p in PHASES)

    @property
    def inter(self) -> int:
        """Inter-node bytes over all phases."""
        return sum(getattr(self, p).inter for p in PHASES)

    @property
    def wire(self) -> int:
        return self.intra + self.inter

    @property
    def forward_total(self) -> int:
        """Dispatch + combine payload bytes including the copy to itself: the planner's per-device quantity."""
        return self.dispatch.total + self.combine.total

    # ------------------------------------------------------------------ (de)serialisation for all-reduce
    def to_tensor(self, n_bins: int) -> torch.Tensor:
        """Flat int64 vector (fixed layout for ``n_bins`` histogram bins), summable across ranks."""
        hist = (self.tokens_by_nodes + [0] * n_bins)[:n_bins]
        values = [getattr(getattr(self, p), link) for p in PHASES for link in LINKS]
        values += [self.meta, self.two_hop_inter_dispatch, self.two_hop_inter_combine, self.tokens, self.rows]
        return torch.tensor(values + hist, dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TrafficCounters:
        v = [int(x) for x in t.tolist()]
        out = cls()
        i = 0
        for p in PHASES:
            setattr(out, p, LinkBytes(*v[i : i + len(LINKS)]))
            i += len(LINKS)
        out.meta, out.two_hop_inter_dispatch, out.two_hop_inter_combine, out.tokens, out.rows = v[i : i + 5]
        out.tokens_by_nodes = v[i + 5 :]
        return out

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["max_nodes_per_token"] = self.max_nodes_per_token
        return data


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)), strict=True)]


# --------------------------------------------------------------------------------------------- over ranks


@dataclass
class TrafficSummary:
    """Counters of every rank of a group: ``total`` summed over ranks, ``max_rank_wire`` the straggler's
    link bytes (intra + inter, all phases), ``per_rank_wire`` each rank's. ``steps`` the counters span."""

    total: TrafficCounters
    max_rank_wire: int
    per_rank_wire: list[int]
    ranks: int
    steps: int = 1

    def metrics(self) -> dict[str, float]:
        """Per-step metrics (``a2a_*`` keys of metrics.jsonl); bytes summed over ranks unless named max."""
        t, n = self.total, max(self.steps, 1)
        return {
            "a2a_intra_node_bytes": t.intra / n,
            "a2a_inter_node_bytes": t.inter / n,
            "a2a_max_rank_bytes": self.max_rank_wire / n,
            "a2a_dispatch_intra_node_bytes": t.dispatch.intra / n,
            "a2a_dispatch_inter_node_bytes": t.dispatch.inter / n,
            "a2a_combine_intra_node_bytes": t.combine.intra / n,
            "a2a_combine_inter_node_bytes": t.combine.inter / n,
            "a2a_backward_bytes": t.backward.wire / n,
            "a2a_local_bytes": (t.dispatch.local + t.combine.local + t.backward.local) / n,
            "a2a_meta_bytes": t.meta / n,
            "a2a_two_hop_inter_node_bytes": (t.two_hop_inter_dispatch + t.two_hop_inter_combine) / n,
            "a2a_tokens": t.tokens / n,
            "a2a_rows_per_token": t.rows / t.tokens if t.tokens else 0.0,
            "a2a_nodes_per_token": t.mean_nodes_per_token,
            "a2a_max_nodes_per_token": t.max_nodes_per_token,
        }


def summarize_over_ranks(
    counters: TrafficCounters, group=None, *, n_bins: int, steps: int = 1, device: torch.device | None = None
) -> TrafficSummary:
    """All-reduce one rank's counters over ``group`` (collective: every rank calls it). ``n_bins`` fixes the
    histogram length (the number of nodes + 1) so every rank's vector has the same layout."""
    vec = counters.to_tensor(n_bins)
    if not dist.is_available() or not dist.is_initialized():
        return TrafficSummary(counters, counters.wire, [counters.wire], 1, steps)
    ranks = dist.get_world_size(group)
    wire = torch.zeros(ranks, dtype=torch.int64)
    wire[dist.get_rank(group)] = counters.wire
    both = torch.cat([vec, wire]).to(device or HOST)
    dist.all_reduce(both, group=group)
    both = both.cpu()
    total = TrafficCounters.from_tensor(both[: vec.numel()])
    per_rank = both[vec.numel() :].tolist()
    return TrafficSummary(total, max(per_rank), per_rank, ranks, steps)


def node_limit(*, n_group: int, topk_group: int, top_k: int, ep_nodes: int) -> int:
    """Most nodes one token's experts can span when the experts are laid out contiguously over ``ep_nodes``
    nodes and the router keeps ``topk_group`` of ``n_group`` groups (TR §2.1.2's M when groups = nodes)."""
    if n_group <= 1:
        return min(top_k, ep_nodes)
    if n_group % ep_nodes == 0:  # whole groups per node
        return min(topk_group, ep_nodes, top_k)
    if ep_nodes % n_group == 0:  # each group spread over ep_nodes / n_group nodes
        return min(topk_group * (ep_nodes // n_group), top_k, ep_nodes)
    return min(top_k, ep_nodes)
