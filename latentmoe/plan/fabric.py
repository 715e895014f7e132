"""Multi-rail and multi-plane fat-tree clusters, and all-to-all on them with the flow simulator.

The cluster: ``nodes`` nodes of ``gpus_per_node`` GPUs. Inside a node every GPU has an NVLink port to the
node's NVSwitch; every GPU owns one NIC (GPU g's NIC is "rail" or "plane" g). Outside, radix-k switches form
two-layer fat-trees: a leaf has k/2 NIC ports and k/2 uplinks, one to each of the k/2 spines.

* Multi-rail fat-tree (MRFT): NIC g of every node goes to a rail-g leaf; all leaves share the same spines,
  so any NIC can reach any other through a spine.
* Multi-plane fat-tree (MPFT, ISCA §5.1, Fig. 3): NIC g goes to plane g, and each plane is a separate
  fat-tree with its own spines. Nothing connects two planes: traffic for GPU g of another node must leave
  through this node's NIC g, reached over NVLink first (NCCL's PXN, which MRFT also uses).

Routing: with PXN (always on MPFT) a message from GPU a of node A to GPU b of node B crosses NVLink a -> b
inside A, leaves through NIC b, and climbs to a spine only if the two NICs hang off different leaves. If a
plane (every node's NIC of that index) is down, its traffic is spread evenly over the surviving planes and
forwarded over NVLink at the receiving node. Between two leaves a flow is split evenly over all shortest
surviving paths (ideal ECMP / adaptive routing). Without PXN (MRFT only) the message leaves through NIC a and
crosses rails at a spine.

Everything the flow simulator ignores is listed in :mod:`latentmoe.plan.flowsim`; in addition NVLink is a
non-blocking switch per node here, and a NIC port and a switch-to-switch link have the same rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import networkx as nx

from latentmoe.plan.errors import PlanError
from latentmoe.plan.flowsim import Flow, simulate_flows

MULTI_PLANE = "multi-plane"
MULTI_RAIL = "multi-rail"
FABRIC_KINDS = (MULTI_PLANE, MULTI_RAIL)
SHARED_SPINES = 0  # tree index of the spines every rail shares in a multi-rail fat-tree

Node = tuple
Link = tuple[Node, Node]


def gpu(node: int, index: int) -> Node:
    return ("gpu", node, index)


def nvswitch(node: int) -> Node:
    return ("nvsw", node)


def leaf(tree: int, index: int) -> Node:
    return ("leaf", tree, index)


def spine(tree: int, index: int) -> Node:
    return ("spine", tree, index)


@dataclass(frozen=True)
class Fabric:
    """A cluster network: directed links with capacities (bytes/s) and how GPUs attach to it."""

    kind: str
    nodes: int
    gpus_per_node: int
    radix: int
    nic_bytes_per_s: float
    nvlink_bytes_per_s: float
    capacity: Mapping[Link, float]
    failed_planes: frozenset[int]
    failed_links: frozenset[frozenset[Node]]

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def nics_per_leaf(self) -> int:
        return self.radix // 2

    def leaf_of(self, node: int, nic: int) -> Node:
        """The leaf switch NIC ``nic`` of ``node`` plugs into (its rail's or plane's leaf)."""
        return leaf(nic, node // self.nics_per_leaf)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PlanError(f"{name} must be > 0, got {value!r}")


def fat_tree_fabric(
    kind: str,
    *,
    nodes: int,
    gpus_per_node: int,
    radix: int,
    nic_bytes_per_s: float,
    nvlink_bytes_per_s: float,
    failed_planes: Iterable[int] = (),
    failed_links: Iterable[Link] = (),
) -> Fabric:
    """Build a multi-plane or multi-rail two-layer fat-tree cluster (see the module docstring).

    ``failed_planes``: NIC indices that are down on every node (a whole plane or rail).
    ``failed_links``: (leaf, spine) pairs whose cable is cut (both directions), e.g.
    ``(leaf(0, 0), spine(0, 1))``.
    """
    if kind not in FABRIC_KINDS:
        raise PlanError(f"fabric kind must be one of {FABRIC_KINDS}, got {kind!r}")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(radix, bool) or not isinstance(radix, int) or radix < 2 or radix % 2:
        raise PlanError(f"switch radix must be an even integer >= 2, got {radix!r}")
    _positive("NIC bandwidth", nic_bytes_per_s)
    _positive("NVLink bandwidth", nvlink_bytes_per_s)
    failed = frozenset(failed_planes)
    bad_plane = next((p for p in sorted(failed) if not 0 <= p < gpus_per_node), None)
    if bad_plane is not None:
        raise PlanError(f"failed plane {bad_plane} does not exist (planes are 0..{gpus_per_node - 1})")
    if len(failed) == gpus_per_node:
        raise PlanError("every plane has failed: the nodes are disconnected")
    half = radix // 2
    leaves_per_rail = -(-nodes // half)
    spine_ports = leaves_per_rail if kind == MULTI_PLANE else leaves_per_rail * gpus_per_node
    if spine_ports > radix:
        raise PlanError(
            f"{nodes} nodes x {gpus_per_node} NICs need {spine_ports} leaves per spine, "
            f"more than radix {radix}"
        )
    capacity: dict[Link, float] = {}

    def connect(u: Node, v: Node, rate: float) -> None:
        capacity[(u, v)] = rate
        capacity[(v, u)] = rate

    for n in range(nodes):
        for g in range(gpus_per_node):
            connect(gpu(n, g), nvswitch(n), nvlink_bytes_per_s)
            if g not in failed:
                connect(gpu(n, g), leaf(g, n // half), nic_bytes_per_s)
    cut = frozenset(frozenset(link) for link in failed_links)
    uplinks = set()
    if leaves_per_rail > 1 or kind == MULTI_RAIL:
        for g in range(gpus_per_node):
            tree = g if kind == MULTI_PLANE else SHARED_SPINES
            uplinks.update((leaf(g, i), spine(tree, j)) for i in range(leaves_per_rail) for j in range(half))
    unknown = cut - {frozenset(link) for link in uplinks}
    if unknown:
        raise PlanError(
            f"failed link {tuple(sorted(next(iter(unknown))))!r} is not a leaf-spine link of this fabric"
        )
    for u, v in sorted(uplinks):
        if frozenset((u, v)) not in cut:
            connect(u, v, nic_bytes_per_s)
    return Fabric(
        kind=kind,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        radix=radix,
        nic_bytes_per_s=nic_bytes_per_s,
        nvlink_bytes_per_s=nvlink_bytes_per_s,
        capacity=MappingProxyType(capacity),
        failed_planes=failed,
        failed_links=cut,
    )


# ---------------------------------------------------------------------------------------------- routing
def _switch_graph(fabric: Fabric) -> nx.Graph:
    graph = nx.Graph()
    for u, v in fabric.capacity:
        if u[0] in ("leaf", "spine") and v[0] in ("leaf", "spine"):
            graph.add_edge(u, v)
    return graph


def _hops(path: list[Node]) -> tuple[Link, ...]:
    return tuple(zip(path[:-1], path[1:]))


def routes(fabric: Fabric, src: Node, dst: Node, *, pxn: bool = True, _cache: dict | None = None) -> list:
    """Paths (tuples of links) and the fraction of the message each carries, from GPU ``src`` to ``dst``."""
    (_, a_node, a_gpu), (_, b_node, b_gpu) = src, dst
    if a_node == b_node:
        return [(((src, nvswitch(a_node)), (nvswitch(a_node), dst)), 1.0)]
    cache = {} if _cache is None else _cache
    graph = cache.get("graph")
    if graph is None:
        graph = cache["graph"] = _switch_graph(fabric)
    alive = [g for g in range(fabric.gpus_per_node) if g not in fabric.failed_planes]
    if pxn or fabric.kind == MULTI_PLANE:
        planes = [b_gpu] if b_gpu in alive else alive
        pairs = [(q, q, 1.0 / len(planes)) for q in planes]
    else:
        sends = [a_gpu] if a_gpu in alive else alive
        recvs = [b_gpu] if b_gpu in alive else alive
        pairs = [(s, r, 1.0 / (len(sends) * len(recvs))) for s in sends for r in recvs]
    out = []
    for s, r, weight in pairs:
        pre = () if s == a_gpu else ((src, nvswitch(a_node)), (nvswitch(a_node), gpu(a_node, s)))
        post = () if r == b_gpu else ((gpu(b_node, r), nvswitch(b_node)), (nvswitch(b_node), dst))
        la, lb = fabric.leaf_of(a_node, s), fabric.leaf_of(b_node, r)
        key = (la, lb)
        if key not in cache:
            if la == lb:
                cache[key] = [()]
            else:
                try:
                    cache[key] = [_hops(p) for p in nx.all_shortest_paths(graph, la, lb)]
                except (nx.NetworkXNoPath, nx.NodeNotFound):
                    raise PlanError(f"no surviving path between {la} and {lb}") from None
        middles = cache[key]
        for middle in middles:
            links = pre + ((gpu(a_node, s), la),) + middle + ((lb, gpu(b_node, r)),) + post
            out.append((links, weight / len(middles)))
    return out


@dataclass(frozen=True)
class AllToAllResult:
    """One all-to-all: every GPU sends ``bytes_per_pair`` to every other GPU."""

    fabric_kind: str
    pxn: bool
    failed_planes: tuple[int, ...]
    failed_links: int
    gpus: int
    bytes_per_pair: float
    time_s: float
    flows: int

    @property
    def bytes_per_gpu(self) -> float:
        return (self.gpus - 1) * self.bytes_per_pair

    @property
    def algo_bandwidth_bytes_per_s(self) -> float:
        """Data each GPU sends divided by the time (NCCL's "algorithm bandwidth")."""
        return self.bytes_per_gpu / self.time_s


def all_to_all(fabric: Fabric, *, bytes_per_pair: float, pxn: bool = True) -> AllToAllResult:
    """Simulate one all-to-all on ``fabric`` (all messages start together; max-min fair sharing)."""
    _positive("bytes per pair", bytes_per_pair)
    cache: dict = {}
    flows = []
    gpus = [gpu(n, g) for n in range(fabric.nodes) for g in range(fabric.gpus_per_node)]
    for src in gpus:
        for dst in gpus:
            if src != dst:
                for links, fraction in routes(fabric, src, dst, pxn=pxn, _cache=cache):
                    flows.append(Flow(path=links, size_bytes=bytes_per_pair * fraction))
    result = simulate_flows(flows, fabric.capacity)
    return AllToAllResult(
        fabric_kind=fabric.kind,
        pxn=pxn or fabric.kind == MULTI_PLANE,
        failed_planes=tuple(sorted(fabric.failed_planes)),
        failed_links=len(fabric.failed_links),
        gpus=fabric.gpus,
        bytes_per_pair=bytes_per_pair,
        time_s=result.makespan_s,
        flows=len(flows),
    )
