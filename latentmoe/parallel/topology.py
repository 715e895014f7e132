"""Who is where: the world as nodes × ranks per node, and the expert-parallel (EP) / data-parallel (DP) groups.

A run of ``W`` processes (torchrun's ``WORLD_SIZE``) on ``G`` ranks per node (``--gpus-per-node``; default
all ranks on one node) has ``W / G`` nodes; rank ``r`` sits on node ``r // G``. Experts are sharded over
EP groups of ``P`` consecutive ranks (``--ep``), so an EP group spans ``ceil(P / G)`` nodes, as DeepSeek-V3's
EP64 spans 8 nodes of 8 GPUs. With ``W = D · P`` there are ``D`` EP groups, each holding every expert once::

    W = 4, G = 2, P = 4:   node 0: ranks 0 1   node 1: ranks 2 3      one EP group {0,1,2,3}, D = 1
    W = 4, G = 2, P = 2:   EP groups {0,1} {2,3}  (one per node)       expert-DP groups {0,2} {1,3}

Every rank is a data-parallel worker for the dense parameters (attention, dense FFNs, embeddings, router,
shared experts): their gradients are averaged over the whole world. A routed expert's gradient is reduced
only over its *expert-DP group* — the ``D`` ranks (one per EP group) that hold the same expert slice.

:class:`Topology` is pure arithmetic (no process groups), so layouts are tested without launching
anything. :func:`build_groups` creates the EP and expert-DP process groups for one :class:`Topology` once
``torch.distributed`` is started (``latentmoe.parallel.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class TopologyError(ValueError):
    """A world / node / EP layout that cannot work; the message names the offending quantity."""


@dataclass(frozen=True)
class Topology:
    """The layout seen from one rank.

    world_size: processes in the run; rank: this process (0-based); gpus_per_node: ranks per node (G);
    ep_size: ranks sharing one copy of every routed expert (P). ``world_size`` must be a multiple of both.
    """

    world_size: int
    rank: int
    gpus_per_node: int
    ep_size: int

    def __post_init__(self) -> None:
        for name in ("world_size", "gpus_per_node", "ep_size"):
            if getattr(self, name) < 1:
                raise TopologyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank {self.rank} is outside the world of {self.world_size} ranks")
        if self.world_size % self.gpus_per_node:
            raise TopologyError(
                f"world size {self.world_size} is not a multiple of gpus_per_node {self.gpus_per_node}"
            )
        if self.world_size % self.ep_size:
            raise TopologyError(f"world size {self.world_size} is not a multiple of the EP size {self.ep_size}")

    @classmethod
    def single(cls) -> Topology:
        """One process, no parallelism."""
        return cls(world_size=1, rank=0, gpus_per_node=1, ep_size=1)

    # ------------------------------------------------------------------ nodes
    @property
    def n_nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    def node_of(self, rank: int) -> int:
        """Node index of a global rank."""
        return rank // self.gpus_per_node

    @property
    def node(self) -> int:
        return self.node_of(self.rank)

    @property
    def local_rank(self) -> int:
        """Index of this rank inside its node (its GPU index on a real machine)."""
        return self.rank % self.gpus_per_node

    # ------------------------------------------------------------------ EP and DP
    @property
    def dp_size(self) -> int:
        """Number of EP groups = replicas of each expert = size of an expert-DP group."""
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """Position inside the EP group: which expert slice this rank holds."""
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        """Which EP group this rank belongs to."""
        return self.rank // self.ep_size

    def ep_group_ranks(self, dp_rank: int | None = None) -> list[int]:
        """Global ranks of EP group ``dp_rank`` (default: this rank's), in EP-rank order."""
        d = self.dp_rank if dp_rank is None else dp_rank
        return list(range(d * self.ep_size, (d + 1) * self.ep_size))

    def expert_dp_group_ranks(self, ep_rank: int | None = None) -> list[int]:
        """Global ranks holding the same expert slice as EP rank ``ep_rank`` (default: this rank's)."""
        e = self.ep_rank if ep_rank is None else ep_rank
        return list(range(e, self.world_size, self.ep_size))

    @property
    def ep_nodes(self) -> list[int]:
        """Node of each member of this rank's EP group, indexed by EP rank: the link-class map of traffic."""
        return [self.node_of(r) for r in self.ep_group_ranks()]

    @property
    def ep_n_nodes(self) -> int:
        """Distinct nodes an EP group spans."""
        return len(set(self.ep_nodes))

    def describe(self) -> str:
        return (
            f"{self.world_size} ranks = {self.n_nodes} nodes x {self.gpus_per_node}; "
            f"EP {self.ep_size} x DP {self.dp_size}"
        )


def experts_per_rank(n_routed_experts: int, ep_size: int) -> int:
    """Routed experts each EP rank holds; the experts must split evenly (else :class:`TopologyError`)."""
    if n_routed_experts % ep_size:
        raise TopologyError(
            f"n_routed_experts ({n_routed_experts}) is not divisible by the EP size ({ep_size}); "
            f"choose --ep among the divisors of {n_routed_experts}"
        )
    return n_routed_experts // ep_size


# ---------------------------------------------------------------------------------------------- groups


@dataclass
class ProcessGroups:
    """The groups one rank communicates in. ``ep``: its EP group (dispatch/combine); ``expert_dp``: the ranks
    holding the same experts (expert-gradient reduction); ``world``: everyone (dense gradients, metrics).
    A group of one rank is None (nothing to communicate)."""

    topology: Topology
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None
    world: dist.ProcessGroup | None


def build_groups(topology: Topology) -> ProcessGroups:
    """Create the EP and expert-DP groups (every rank must call this, in the same order)."""
    if topology.world_size == 1:
        return ProcessGroups(topology, None, None, None)
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed started first (parallel.runtime.init_distributed)")
    if dist.get_world_size() != topology.world_size or dist.get_rank() != topology.rank:
        raise TopologyError(
            f"topology says rank {topology.rank} of {topology.world_size}, torch.distributed says "
            f"rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    world = dist.group.WORLD
    ep = expert_dp = None
    for d in range(topology.dp_size):  # new_group is collective: every rank creates every group
        ranks = topology.ep_group_ranks(d)
        group = _group(ranks, topology.world_size)
        if topology.rank in ranks:
            ep = group
    for e in range(topology.ep_size):
        ranks = topology.expert_dp_group_ranks(e)
        group = _group(ranks, topology.world_size)
        if topology.rank in ranks:
            expert_dp = group
    return ProcessGroups(topology, ep=ep, expert_dp=expert_dp, world=world)


def _group(ranks: list[int], world_size: int) -> dist.ProcessGroup | None:
    if len(ranks) == 1:
        return None  # nothing to exchange with oneself
    return dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks)
