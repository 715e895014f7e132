"""Who is where: the world as nodes × ranks per node, and the pipeline (PP), expert-parallel (EP) and data-parallel
(DP) groups — the one place every process group of a run is derived.

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

**Pipeline parallelism** (``--pp Q``) adds the outermost axis: ``W = Q · D · P`` and rank
``r = q·(D·P) + d·P + p`` holds pipeline stage ``q``, EP slice ``p`` of DP replica ``d``. The ``D·P`` ranks of one
stage are a *stage group*: they hold the same layers, and the EP/expert-DP groups above live inside it. The ``Q``
ranks with the same ``(d, p)`` form a *pipeline group* (activations flow along it, point to point). With the
stage index outermost, EP groups (the heavy all-to-all traffic) are consecutive ranks and stay inside a node
whenever ``P ≤ G``, while pipeline neighbours are ``D·P`` ranks apart and cross nodes first — the layout
DeepSeek-V3 trains with (TR §3.2: PP16 across nodes, EP64 over 8 nodes, ZeRO-1 DP)::

    W = 4, G = 2, Q = 2, P = 2:   stage 0: ranks 0 1 (node 0)   stage 1: ranks 2 3 (node 1)
                                  EP groups {0,1} {2,3}; pipeline groups {0,2} {1,3}
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
    ep_size: ranks sharing one copy of every routed expert (P); pp_size: pipeline stages over ranks (Q).
    ``world_size`` must be a multiple of G and of Q·P.
    """

    world_size: int
    rank: int
    gpus_per_node: int
    ep_size: int
    pp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "gpus_per_node", "ep_size", "pp_size"):
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
        if self.world_size % (self.ep_size * self.pp_size):
            raise TopologyError(
                f"world size {self.world_size} is not a multiple of PP x EP = {self.pp_size} x {self.ep_size}"
            )

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

    # ------------------------------------------------------------------ PP
    @property
    def stage_size(self) -> int:
        """Ranks holding one pipeline stage (D · P): they hold the same layers."""
        return self.world_size // self.pp_size

    @property
    def pp_rank(self) -> int:
        """Which pipeline stage (position in the pipeline group) this rank holds."""
        return self.rank // self.stage_size

    @property
    def stage_rank(self) -> int:
        """Position inside the stage group: this rank's share of the batch rows (0 .. D·P − 1)."""
        return self.rank % self.stage_size

    def stage_group_ranks(self, pp_rank: int | None = None) -> list[int]:
        """Global ranks of stage ``pp_rank`` (default: this rank's)."""
        q = self.pp_rank if pp_rank is None else pp_rank
        return list(range(q * self.stage_size, (q + 1) * self.stage_size))

    def pp_group_ranks(self, stage_rank: int | None = None) -> list[int]:
        """Global ranks of the pipeline through stage-rank ``stage_rank`` (default: this rank's), by stage."""
        i = self.stage_rank if stage_rank is None else stage_rank
        return [q * self.stage_size + i for q in range(self.pp_size)]

    # ------------------------------------------------------------------ EP and DP
    @property
    def dp_size(self) -> int:
        """Number of EP groups in a stage = replicas of each expert = size of an expert-DP group."""
        return self.stage_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        """Position inside the EP group: which expert slice this rank holds."""
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        """Which EP group of its stage this rank belongs to."""
        return self.stage_rank // self.ep_size

    def ep_group_ranks(self, dp_rank: int | None = None) -> list[int]:
        """Global ranks of EP group ``dp_rank`` of this rank's stage (default: this rank's), in EP-rank order."""
        d = self.dp_rank if dp_rank is None else dp_rank
        base = self.pp_rank * self.stage_size
        return list(range(base + d * self.ep_size, base + (d + 1) * self.ep_size))

    def expert_dp_group_ranks(self, ep_rank: int | None = None) -> list[int]:
        """Global ranks of this stage holding the same expert slice as EP rank ``ep_rank`` (default: this rank's)."""
        e = self.ep_rank if ep_rank is None else ep_rank
        base = self.pp_rank * self.stage_size
        return list(range(base + e, base + self.stage_size, self.ep_size))

    @property
    def ep_nodes(self) -> list[int]:
        """Node of each member of this rank's EP group, indexed by EP rank: the link-class map of traffic."""
        return [self.node_of(r) for r in self.ep_group_ranks()]

    @property
    def ep_n_nodes(self) -> int:
        """Distinct nodes an EP group spans."""
        return len(set(self.ep_nodes))

    def intra_node(self, ranks: list[int]) -> bool:
        """Whether every rank of a group sits on one node."""
        return len({self.node_of(r) for r in ranks}) == 1

    def describe(self) -> str:
        pp = f"PP {self.pp_size} x " if self.pp_size > 1 else ""
        return (
            f"{self.world_size} ranks = {self.n_nodes} nodes x {self.gpus_per_node}; "
            f"{pp}EP {self.ep_size} x DP {self.dp_size}"
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
    holding the same experts (expert-gradient reduction); ``world``: everyone (metrics, and the dense gradients
    without PP); ``stage``: the ranks of its pipeline stage (dense gradients, ZeRO); ``pp``: its pipeline
    (activations); ``ep_backward``: a second group over the EP ranks for the gradients of the all-to-alls, when
    forward and backward chunks run at once (DualPipe's overlap; None: they use ``ep``).
    A group of one rank is None (nothing to communicate)."""

    topology: Topology
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None
    world: dist.ProcessGroup | None
    stage: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    ep_backward: dist.ProcessGroup | None = None


def build_groups(topology: Topology, *, ep_backward: bool = False) -> ProcessGroups:
    """Create the EP, expert-DP, stage and pipeline groups (every rank must call this, in the same order);
    ``ep_backward`` adds a second group per EP group for the backward exchanges."""
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
    mine = {}
    for q in range(topology.pp_size):  # new_group is collective: every rank creates every group, in one order
        at = Topology(topology.world_size, q * topology.stage_size, topology.gpus_per_node, topology.ep_size,
                      topology.pp_size)
        families = {
            "ep": [at.ep_group_ranks(d) for d in range(topology.dp_size)],
            "ep_backward": [at.ep_group_ranks(d) for d in range(topology.dp_size)] if ep_backward else [],
            "expert_dp": [at.expert_dp_group_ranks(e) for e in range(topology.ep_size)],
            "stage": [at.stage_group_ranks()],
        }
        for name, groups in families.items():
            for ranks in groups:
                group = _group(ranks, topology.world_size, fresh=name == "ep_backward")
                if topology.rank in ranks:
                    mine[name] = group
    pp = None
    if topology.pp_size > 1:
        for i in range(topology.stage_size):
            ranks = topology.pp_group_ranks(i)
            group = dist.group.WORLD if len(ranks) == topology.world_size else dist.new_group(ranks)
            if topology.rank in ranks:
                pp = group
    return ProcessGroups(topology, ep=mine.get("ep"), expert_dp=mine.get("expert_dp"), world=world,
                         stage=mine.get("stage"), pp=pp, ep_backward=mine.get("ep_backward"))


def build_pair_groups(topology: Topology, pp_ranks: tuple[int, int]) -> dist.ProcessGroup | None:
    """The group of the two ranks of this rank's pipeline at stages ``pp_ranks`` (e.g. the stages holding the
    embedding and the MTP head, whose shared gradient they sum); None when this rank is in neither or both stages
    are one rank. Collective: every rank creates every pipeline's pair."""
    a, b = pp_ranks
    mine = None
    for i in range(topology.stage_size):
        ranks = [a * topology.stage_size + i, b * topology.stage_size + i]
        if a == b:
            continue
        group = dist.new_group(ranks)
        if topology.rank in ranks:
            mine = group
    return mine


def _group(ranks: list[int], world_size: int, *, fresh: bool = False) -> dist.ProcessGroup | None:
    if len(ranks) == 1:
        return None  # nothing to exchange with oneself
    return dist.group.WORLD if len(ranks) == world_size and not fresh else dist.new_group(ranks)
