"""Expert parallelism: the routed experts of every MoE layer sharded over the ranks of an EP group.

Routing is untouched — :class:`~latentmoe.model.moe.MoE` runs its own ``Router`` on each rank's tokens,
so node-limited routing is the single-process function. Only *where experts live* changes: EP rank ``p``
holds physical expert slots ``[p·S_r, (p+1)·S_r)`` (contiguous logical experts by default, or an EPLB
placement with replicas of hot experts). ``MoE.expert_parallel`` is the hook; with it set, one MoE
forward on each rank is::

    slot_TK   = choose_slots(topk_idx_TK)            logical expert -> one physical replica
    plan      = plan_dispatch(slot_TK)               one row per (token, destination rank), by rank
    recv      = exchange_counts(plan.send_counts_R)  how many rows each peer sends me
    x_recv    = dispatch(x_TD[plan.token_N])         uneven all_to_all_single (fp32 / bf16 / FP8 payload)
    meta_recv = dispatch([slots | gate weights])     which of my experts each row needs, with what weight
    y_recv    = Σ_k w·FFN_slot(x_recv)               my experts, grouped (the model's own Experts.forward)
    y_back    = combine(y_recv)                      the reverse all_to_all (fp32 / bf16 / LogFMT payload)
    y_TD      = index_add(plan.token_N, y_back) + shared_experts(x_TD)

A token goes to a rank **once** however many of its experts live there (DeepEP's normal kernels); the
receiving rank sums its experts' weighted outputs before the combine, so the combine also sends one row
per (token, rank). ``dedup=False`` instead sends one row per (token, expert) — DeepEP's low-latency
layout and the ISCA §2.3.2 / planner formula ``tokens × fanout × hidden``, used to check the planner.

Every exchange is differentiable (``latentmoe.parallel.comm``), so gradients reach the tokens and the
gate weights on their home rank and each expert's weights on its own rank. With the fp32 codecs the
result equals the single-process ``MoE`` to float rounding (tests: relative error ≤ 1e-5).

Dual micro-batch overlap (``overlap=True``, ISCA §2.3.1): the tokens are split in two halves; while one
half's dispatch or combine is in flight (``async_op=True``), the other half's experts or the shared
experts compute. :attr:`ExpertParallel.clock` measures the communication time left exposed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from latentmoe.model.moe import EXPERT_PARAMETERS, Experts, MoE, RouteResult
from latentmoe.parallel.comm import CommClock, PendingExchange, exchange_counts, exchange_start
from latentmoe.parallel.payload import COMBINE_CODECS, DISPATCH_CODECS, Codec, codec
from latentmoe.parallel.topology import ProcessGroups, experts_per_rank
from latentmoe.parallel.traffic import TrafficCounters, link_bytes, node_fanout

MICRO_BATCHES = 2  # dual micro-batch overlap (ISCA §2.3.1)
FP32 = Codec("fp32")


# ------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert each physical slot holds: ``phy2log_S`` int64 ``[S]``; slot ``s`` lives on EP rank
    ``s // slots_per_rank``. ``S = ep_size · slots_per_rank >= n_logical``; extra slots are replicas."""

    phy2log_S: torch.Tensor
    ep_size: int
    n_logical: int

    def __post_init__(self) -> None:
        S = self.phy2log_S.numel()
        if S % self.ep_size:
            raise ValueError(f"{S} physical slots do not split over EP size {self.ep_size}")
        counts = torch.bincount(self.phy2log_S, minlength=self.n_logical)
        if counts.numel() != self.n_logical or bool((counts == 0).any()):
            missing = (counts[: self.n_logical] == 0).nonzero().flatten().tolist()
            raise ValueError(f"placement leaves logical experts {missing} without a slot (or names unknown ones)")

    @classmethod
    def contiguous(cls, n_experts: int, ep_size: int) -> ExpertPlacement:
        """No replicas: EP rank p holds experts ``[p·E/P, (p+1)·E/P)``."""
        experts_per_rank(n_experts, ep_size)
        return cls(torch.arange(n_experts), ep_size, n_experts)

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log_S.numel() // self.ep_size

    @property
    def is_contiguous(self) -> bool:
        return self.phy2log_S.numel() == self.n_logical and bool(
            torch.equal(self.phy2log_S, torch.arange(self.n_logical))
        )

    @property
    def replica_count_E(self) -> torch.Tensor:
        """Replicas per logical expert, int64 ``[E]``."""
        return torch.bincount(self.phy2log_S, minlength=self.n_logical)

    @property
    def log2phy_EX(self) -> torch.Tensor:
        """Slots of each logical expert, int64 ``[E, max replicas]``, padded with −1 (EPLB's ``log2phy``)."""
        X = int(self.replica_count_E.max())
        out = torch.full((self.n_logical, X), -1, dtype=torch.int64)
        seen = [0] * self.n_logical
        for s, e in enumerate(self.phy2log_S.tolist()):
            out[e, seen[e]] = s
            seen[e] += 1
        return out

    def local_logical(self, ep_rank: int) -> torch.Tensor:
        """Logical expert of each of EP rank ``ep_rank``'s slots, int64 ``[slots_per_rank]``."""
        n = self.slots_per_rank
        return self.phy2log_S[ep_rank * n : (ep_rank + 1) * n]


def choose_slots(topk_idx_TK: torch.Tensor, placement: ExpertPlacement, *, salt: int = 0) -> torch.Tensor:
    """Physical slot for every (token, choice): logical expert ``e`` → one of its replicas, picked round-robin
    by token index (``(t + salt) mod replicas``) so a hot expert's tokens spread over its copies. int64 ``[T, K]``."""
    if placement.is_contiguous:
        return topk_idx_TK
    log2phy_EX = placement.log2phy_EX.to(topk_idx_TK.device)
    count_E = placement.replica_count_E.to(topk_idx_TK.device)
    t_T = torch.arange(topk_idx_TK.shape[0], device=topk_idx_TK.device) + salt
    replica_TK = t_T[:, None] % count_E[topk_idx_TK]
    return log2phy_EX[topk_idx_TK, replica_TK]


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class DispatchPlan:
    """Rows one rank sends, ordered by destination EP rank, then token.

    token_N: int64 ``[N]`` source token of each row; dest_N: int64 ``[N]`` destination EP rank;
    send_counts_R: int64 ``[R]`` rows per destination; local_slot_NK: int64 ``[N, K]`` slot on the
    destination rank (``0 ≤ slot < slots_per_rank``) for the token's k-th choice, −1 where that choice is
    served by another row (``valid_NK`` is the mask of the others).
    """

    token_N: torch.Tensor
    dest_N: torch.Tensor
    send_counts_R: torch.Tensor
    local_slot_NK: torch.Tensor

    @property
    def valid_NK(self) -> torch.Tensor:
        return self.local_slot_NK >= 0


def plan_dispatch(slot_TK: torch.Tensor, *, slots_per_rank: int, ep_size: int, dedup: bool = True) -> DispatchPlan:
    """Which rows to send where (pure). ``slot_TK`` int64 ``[T, K]``: physical slot of each choice.

    ``dedup=True``: one row per distinct (token, destination rank) — a token whose experts share a rank is
    sent there once. ``dedup=False``: one row per (token, choice), each with a single valid slot.
    """
    T, K = slot_TK.shape
    dest_TK = slot_TK // slots_per_rank
    local_TK = slot_TK % slots_per_rank
    device = slot_TK.device
    if dedup:
        hit_TR = torch.zeros(T, ep_size, dtype=torch.bool, device=device)
        hit_TR.scatter_(1, dest_TK, True)
        dest_N, token_N = hit_TR.t().nonzero(as_tuple=True)  # row-major over [R, T]: by rank, then token
        local_slot_NK = torch.where(dest_TK[token_N] == dest_N[:, None], local_TK[token_N], -1)
    else:
        flat_dest = dest_TK.reshape(-1)
        order = flat_dest.argsort(stable=True)
        token_N = order // K
        choice_N = order % K
        dest_N = flat_dest[order]
        local_slot_NK = torch.full((T * K, K), -1, dtype=torch.int64, device=device)
        local_slot_NK[torch.arange(T * K, device=device), choice_N] = local_TK.reshape(-1)[order]
    send_counts_R = torch.bincount(dest_N, minlength=ep_size)
    return DispatchPlan(token_N, dest_N, send_counts_R, local_slot_NK)


def local_experts_forward(
    experts: Experts, x_MD: torch.Tensor, slot_MK: torch.Tensor, weight_MK: torch.Tensor
) -> torch.Tensor:
    """``y_m = Σ_k weight[m,k] · FFN_{slot[m,k]}(x_m)`` over the valid (``slot ≥ 0``) choices of each received row,
    computed by the model's own grouped :class:`Experts` (so an FP8 expert matmul applies here too). ``[M, D]``."""
    row_A, k_A = (slot_MK >= 0).nonzero(as_tuple=True)
    if row_A.numel() == 0:
        # No work here; keep the graph connected so every rank runs the same backward exchanges.
        return x_MD * 0 + weight_MK.sum() * 0
    y_AD = experts(x_MD[row_A], slot_MK[row_A, k_A][:, None], weight_MK[row_A, k_A][:, None])
    return torch.zeros_like(x_MD, dtype=y_AD.dtype).index_add_(0, row_A, y_AD).to(x_MD.dtype)


# ------------------------------------------------------------------------------------------- the layer


@dataclass
class _Flight:
    """One micro-batch between dispatch and combine."""

    tokens: int
    plan: DispatchPlan
    send: list[int]
    recv: list[int]
    x: PendingExchange | None = None
    meta: PendingExchange | None = None
    y: PendingExchange | None = None


class ExpertParallel:
    """The ``MoE.expert_parallel`` hook: dispatch → local experts → combine, + shared experts. Not a module:
    it holds no parameters (the local expert weights stay in ``moe.experts``) and only per-instance state
    (traffic counters, comm clock, placement).

    groups: the rank's :class:`ProcessGroups`; placement: where experts live (default contiguous);
    dispatch: payload codec of the dispatch (fp32 | bf16 | fp8); combine: of the combine (fp32 | bf16 |
    logfmt); dedup: one row per (token, rank) instead of per (token, expert); overlap: dual micro-batch.
    """

    def __init__(
        self,
        groups: ProcessGroups,
        *,
        placement: ExpertPlacement,
        dispatch: str = "fp32",
        combine: str = "fp32",
        dedup: bool = True,
        overlap: bool = False,
    ) -> None:
        topo = groups.topology
        if placement.ep_size != topo.ep_size:
            raise ValueError(f"placement is for EP size {placement.ep_size}, the topology has {topo.ep_size}")
        self.groups = groups
        self.group: dist.ProcessGroup | None = groups.ep
        # Gradients of the exchanges travel on a group of their own when the pipeline overlaps chunk pairs.
        backward = groups.ep_backward
        self.backward_group: dist.ProcessGroup | None = backward if backward is not None else groups.ep
        self.placement = placement
        self.dispatch_codec = codec(dispatch, allowed=DISPATCH_CODECS, role="dispatch")
        self.combine_codec = codec(combine, allowed=COMBINE_CODECS, role="combine")
        self.dedup = dedup
        self.overlap = overlap
        self.ep_rank = topo.ep_rank
        self.peer_nodes = topo.ep_nodes
        self.traffic = TrafficCounters()
        self.clock = CommClock()
        self.received_assignments = 0

    # ------------------------------------------------------------------ accounting
    def _charge(self, phase: str, bytes_per_peer: list[int]) -> None:
        self.traffic.add_links(phase, link_bytes(bytes_per_peer, my_ep_rank=self.ep_rank, peer_nodes=self.peer_nodes))

    def _backward_meter(self, bytes_per_peer: list[int]) -> None:
        self._charge("backward", bytes_per_peer)

    def _meta_meter(self, bytes_per_peer: list[int]) -> None:
        self.traffic.meta += sum(b for r, b in enumerate(bytes_per_peer) if r != self.ep_rank)

    def _count_dispatch(self, flight: _Flight, hidden: int) -> None:
        t = self.traffic
        t.rows += int(flight.plan.token_N.numel())
        fan = node_fanout(
            flight.plan.token_N,
            flight.plan.dest_N,
            n_tokens=flight.tokens,
            peer_nodes=self.peer_nodes,
            my_node=self.peer_nodes[self.ep_rank],
        )
        t.add_fanout(
            fan,
            dispatch_row_bytes=self.dispatch_codec.row_bytes(hidden),
            combine_row_bytes=self.combine_codec.row_bytes(hidden),
        )

    # ------------------------------------------------------------------ forward
    def __call__(self, moe: MoE, x_TD: torch.Tensor, routing: RouteResult) -> torch.Tensor:
        """Routed experts (across the EP group) + shared experts for ``x_TD [T, D]``; returns ``[T, D]``."""
        if torch.is_grad_enabled() and not self.placement.is_contiguous:
            raise RuntimeError(
                "an EPLB placement with replicated experts is for inference; training needs the contiguous "
                "placement (replica weights would need their gradients summed)"
            )
        slot_TK = choose_slots(routing.topk_idx_TK, self.placement, salt=self.ep_rank * x_TD.shape[0])
        T = x_TD.shape[0]
        halves = [(0, T)] if not self.overlap else _split(T, MICRO_BATCHES)
        flights = [self._plan(slot_TK[a:b]) for a, b in halves]
        self._exchange_counts(flights)
        shared = moe.shared_experts
        if not self.overlap:
            (flight,) = flights
            self._start_dispatch(flight, x_TD, routing.topk_weight_TK)
            y_recv = self._compute(moe.experts, flight)
            self._start_combine(flight, y_recv)
            y_TD = self._finish(flight, x_TD)
            return y_TD if shared is None else y_TD + shared(x_TD)
        return self._overlapped(moe, flights, halves, x_TD, routing.topk_weight_TK)

    def _overlapped(self, moe, flights, halves, x_TD, weight_TK) -> torch.Tensor:
        """Two micro-batches: each one's transfers run while the other (or the shared expert) computes."""
        (a0, a1), (b0, b1) = halves
        A, B = flights
        shared = moe.shared_experts
        self._start_dispatch(A, x_TD[a0:a1], weight_TK[a0:a1])
        self._start_dispatch(B, x_TD[b0:b1], weight_TK[b0:b1])
        shared_TD = shared(x_TD) if shared is not None else None  # overlaps both dispatches
        y_recv_A = self._compute(moe.experts, A)  # overlaps B's dispatch
        self._start_combine(A, y_recv_A)
        y_recv_B = self._compute(moe.experts, B)  # overlaps A's combine
        self._start_combine(B, y_recv_B)
        y_TD = torch.cat([self._finish(A, x_TD[a0:a1]), self._finish(B, x_TD[b0:b1])])
        return y_TD if shared_TD is None else y_TD + shared_TD

    def _plan(self, slot_TK: torch.Tensor) -> _Flight:
        plan = plan_dispatch(
            slot_TK, slots_per_rank=self.placement.slots_per_rank, ep_size=self.placement.ep_size, dedup=self.dedup
        )
        return _Flight(tokens=slot_TK.shape[0], plan=plan, send=plan.send_counts_R.tolist(), recv=[])

    def _exchange_counts(self, flights: list[_Flight]) -> None:
        """One small all-to-all of the split sizes of every micro-batch: int64 ``[R, micro-batches]``."""
        send_RM = torch.stack([f.plan.send_counts_R for f in flights], dim=1)
        R, M = send_RM.shape
        self.traffic.meta += (R - 1) * M * send_RM.element_size()
        if self.group is None:
            recv_RM = send_RM
        else:
            start = time.perf_counter()
            recv_RM = exchange_counts(send_RM.reshape(-1), self.group).view(R, M)
            self.clock.exposed += time.perf_counter() - start
            self.clock.calls += 1
        for m, f in enumerate(flights):
            f.recv = recv_RM[:, m].tolist()

    def _start_dispatch(self, flight: _Flight, x_TD: torch.Tensor, weight_TK: torch.Tensor) -> None:
        plan = flight.plan
        weight_NK = torch.where(plan.valid_NK, weight_TK[plan.token_N], torch.zeros((), dtype=weight_TK.dtype))
        meta_NK2 = torch.cat([plan.local_slot_NK.to(weight_NK.dtype), weight_NK], dim=1)
        flight.x = exchange_start(
            x_TD[plan.token_N],
            flight.send,
            flight.recv,
            self.group,
            codec=self.dispatch_codec,
            backward_meter=self._backward_meter,
            clock=self.clock,
            backward_group=self.backward_group,
        )
        flight.meta = exchange_start(
            meta_NK2,
            flight.send,
            flight.recv,
            self.group,
            codec=FP32,
            backward_meter=self._meta_meter,
            clock=self.clock,
            backward_group=self.backward_group,
        )
        self._charge("dispatch", flight.x.sent_bytes_per_peer)
        self._meta_meter(flight.meta.sent_bytes_per_peer)
        self._count_dispatch(flight, x_TD.shape[1])

    def _compute(self, experts: Experts, flight: _Flight) -> torch.Tensor:
        x_recv = flight.x.wait()
        meta = flight.meta.wait()
        K = meta.shape[1] // 2
        slot_MK = meta[:, :K].detach().round().to(torch.int64)
        self.received_assignments += int((slot_MK >= 0).sum())
        return local_experts_forward(experts, x_recv, slot_MK, meta[:, K:])

    def _start_combine(self, flight: _Flight, y_recv: torch.Tensor) -> None:
        flight.y = exchange_start(
            y_recv,
            flight.recv,
            flight.send,
            self.group,
            codec=self.combine_codec,
            backward_meter=self._backward_meter,
            clock=self.clock,
            backward_group=self.backward_group,
        )
        self._charge("combine", flight.y.sent_bytes_per_peer)

    def _finish(self, flight: _Flight, x_TD: torch.Tensor) -> torch.Tensor:
        y_back = flight.y.wait()
        y_TD = torch.zeros(x_TD.shape, dtype=y_back.dtype, device=x_TD.device)
        return y_TD.index_add(0, flight.plan.token_N, y_back).to(x_TD.dtype)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    step = math.ceil(n / parts)
    return [(min(i * step, n), min((i + 1) * step, n)) for i in range(parts)]


# ------------------------------------------------------------------------------------------- set-up


def local_experts_from(experts: Experts, logical_S: torch.Tensor) -> Experts:
    """A new :class:`Experts` holding copies of ``experts``' logical experts ``logical_S`` (one per local slot),
    keeping its ``expert_linear`` (e.g. an FP8 matmul)."""
    tensors = {name: getattr(experts, name).detach() for name in EXPERT_PARAMETERS}
    return _experts_from(tensors, logical_S, getattr(experts, EXPERT_MATMUL, None))


EXPERT_MATMUL = "expert_linear"  # Experts' swappable x·Wᵀ (the FP8 expert matmul plugs in there)


def _experts_from(full: dict[str, torch.Tensor], logical_S: torch.Tensor, expert_linear) -> Experts:
    _, hidden, inter = full["down_proj"].shape
    device, dtype = full["gate_proj"].device, full["gate_proj"].dtype
    with torch.device(device):
        local = Experts(logical_S.numel(), hidden, inter).to(dtype)
    with torch.no_grad():
        for name in EXPERT_PARAMETERS:
            getattr(local, name).copy_(full[name][logical_S.to(device)])
    if expert_linear is not None:
        setattr(local, EXPERT_MATMUL, expert_linear)
    return local


def gather_logical_experts(moe: MoE) -> dict[str, torch.Tensor]:
    """Every logical expert's weights (``[E, ...]`` per tensor), gathered from the EP group (collective)."""
    hook = moe.expert_parallel
    if not isinstance(hook, ExpertParallel):
        return {name: getattr(moe.experts, name).detach() for name in EXPERT_PARAMETERS}
    first_slot_E = hook.placement.log2phy_EX[:, 0]
    out = {}
    for name in EXPERT_PARAMETERS:
        local = getattr(moe.experts, name).detach().contiguous()
        if hook.group is None:
            slots = local
        else:
            parts = [torch.empty_like(local) for _ in range(hook.placement.ep_size)]
            dist.all_gather(parts, local, group=hook.group)
            slots = torch.cat(parts)
        out[name] = slots[first_slot_E.to(slots.device)]
    return out


def apply_placement(model: nn.Module, placements: list[ExpertPlacement]) -> None:
    """Re-place every MoE layer's experts (e.g. by EPLB, with replicas of hot experts) on an EP-sharded model:
    gathers the logical experts, keeps this rank's slots, routes each token to one replica. Collective.
    Replicated placements serve inference (training asserts the contiguous placement)."""
    layers = [m for m in moe_layers(model) if isinstance(m.expert_parallel, ExpertParallel)]
    if len(layers) != len(placements):
        raise ValueError(f"{len(placements)} placements for {len(layers)} expert-parallel MoE layers")
    for moe, placement in zip(layers, placements, strict=True):
        hook = moe.expert_parallel
        if placement.ep_size != hook.placement.ep_size or placement.n_logical != hook.placement.n_logical:
            raise ValueError(
                f"placement for {placement.n_logical} experts on EP {placement.ep_size} does not fit a layer with "
                f"{hook.placement.n_logical} experts on EP {hook.placement.ep_size}"
            )
        full = gather_logical_experts(moe)
        moe.experts = _experts_from(
            full, placement.local_logical(hook.ep_rank), getattr(moe.experts, EXPERT_MATMUL, None)
        )
        hook.placement = placement


def enable_expert_parallel(
    model: nn.Module,
    groups: ProcessGroups,
    *,
    dispatch: str = "fp32",
    combine: str = "fp32",
    dedup: bool = True,
    overlap: bool = False,
) -> list[ExpertParallel]:
    """Shard every MoE layer of ``model`` (a full model, identical on every rank) over the EP group, in place.

    Each ``moe.experts`` is replaced by this rank's slice (same parameter names, ``[E/P, ...]`` shapes) and
    ``moe.expert_parallel`` is set. Returns the hooks in ``model.moe_layers()`` order.
    """
    topo = groups.topology
    hooks = []
    for moe in moe_layers(model):
        placement = ExpertPlacement.contiguous(moe.config.n_routed_experts, topo.ep_size)
        if moe.experts.n_experts != moe.config.n_routed_experts:
            raise ValueError("enable_expert_parallel needs the full model (this MoE layer is already sharded)")
        moe.experts = local_experts_from(moe.experts, placement.local_logical(topo.ep_rank))
        hook = ExpertParallel(
            groups, placement=placement, dispatch=dispatch, combine=combine, dedup=dedup, overlap=overlap
        )
        moe.expert_parallel = hook
        hooks.append(hook)
    return hooks


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE FFNs of ``model`` (``CausalLM.moe_layers()`` order when available)."""
    if hasattr(model, "moe_layers"):
        return list(model.moe_layers())
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_parallel_hooks(model: nn.Module) -> list[ExpertParallel]:
    return [m.expert_parallel for m in moe_layers(model) if isinstance(m.expert_parallel, ExpertParallel)]


def total_traffic(model: nn.Module) -> TrafficCounters:
    """This rank's counters summed over every MoE layer."""
    total = TrafficCounters()
    for hook in expert_parallel_hooks(model):
        total.merge(hook.traffic)
    return total


def reset_traffic(model: nn.Module) -> None:
    for hook in expert_parallel_hooks(model):
        hook.traffic.reset()
        hook.clock.reset()
        hook.received_assignments = 0


def exposed_comm_seconds(model: nn.Module) -> float:
    return sum(h.clock.exposed for h in expert_parallel_hooks(model))

