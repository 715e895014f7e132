"""EPLB: the expert-parallel load balancer of DeepSeek-V3 (TR §3.4; github deepseek-ai/EPLB), as pure functions.

Expert loads are uneven even with the aux-loss-free bias, and the most loaded GPU sets the pace of every
all-to-all. EPLB adds *redundant* copies of hot experts and packs all copies onto GPUs so that per-GPU load
is as even as possible. Given the load ``weight [layers, E]`` recorded over a window:

**Hierarchical policy** (used when ``num_groups % num_nodes == 0``; keeps node-limited routing's traffic
saving, since a group's experts and all their replicas stay on one node):

1. pack the expert *groups* onto nodes, balancing the nodes' summed load (:func:`balanced_packing`,
   each node gets ``num_groups / num_nodes`` groups);
2. inside each node, replicate experts to the node's ``num_replicas / num_nodes`` slots, each new copy
   going to the expert with the highest load per copy (:func:`replicate_experts`);
3. pack each node's copies onto its GPUs, balancing load per copy (:func:`balanced_packing` again).

**Global policy** otherwise: the same with one group and one node.

Returns ``phy2log [layers, num_replicas]`` (the logical expert of each physical slot; slot ``s`` lives on GPU
``s // (num_replicas / num_gpus)``), ``log2phy [layers, E, max copies]`` (−1 padded) and ``logcnt [layers, E]``.
EPLB's README example is a golden test (tests/parallel/test_eplb.py): 2 layers × 12 experts, 16 replicas,
4 groups, 2 nodes, 8 GPUs. This is a re-implementation from the algorithm's description and the reference
code's behaviour (greedy choices in the same order, ties to the lowest index), not a copy.

:func:`rank_loads` measures a placement: each token of expert e is served by one of its copies, in
round-robin, so a copy carries ``load_e / copies_e``; a GPU's load is the sum over its slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """pack_XN: pack of each item; rank_XN: its position inside the pack (both int64 ``[X, N]``)."""

    pack_XN: torch.Tensor
    rank_XN: torch.Tensor


def balanced_packing(weight_XN: torch.Tensor, num_packs: int) -> Packing:
    """Put ``N`` weighted items into ``num_packs`` packs of exactly ``N / num_packs`` items each, greedily:
    heaviest item first, into the lightest pack that still has room (per row X independently)."""
    X, N = weight_XN.shape
    if N % num_packs:
        raise ValueError(f"{N} items do not split into {num_packs} equal packs")
    per_pack = N // num_packs
    if per_pack == 1:
        return Packing(torch.arange(N).expand(X, N).clone(), torch.zeros(X, N, dtype=torch.int64))
    pack = torch.full((X, N), -1, dtype=torch.int64)
    rank = torch.full((X, N), -1, dtype=torch.int64)
    order_XN = weight_XN.float().sort(dim=-1, descending=True).indices
    for x in range(X):
        loads = [0.0] * num_packs
        filled = [0] * num_packs
        for item in order_XN[x].tolist():
            open_packs = [p for p in range(num_packs) if filled[p] < per_pack]
            p = min(open_packs, key=loads.__getitem__)
            pack[x, item], rank[x, item] = p, filled[p]
            loads[p] += float(weight_XN[x, item])
            filled[p] += 1
    return Packing(pack, rank)


@dataclass(frozen=True)
class Replication:
    """phy2log_XP: logical item of each copy; replica_XP: which copy of it (0 = original); count_XN: copies."""

    phy2log_XP: torch.Tensor
    replica_XP: torch.Tensor
    count_XN: torch.Tensor


def replicate_experts(weight_XN: torch.Tensor, num_phy: int) -> Replication:
    """Grow ``N`` items to ``num_phy`` copies: copy ``i < N`` is item i; each further copy goes to the item with
    the largest load per existing copy (minimising the maximum load per copy)."""
    X, N = weight_XN.shape
    if num_phy < N:
        raise ValueError(f"{num_phy} physical slots cannot hold {N} logical experts")
    rows = torch.arange(X)
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(X, 1)
    replica = torch.zeros(X, num_phy, dtype=torch.int64)
    count = torch.ones(X, N, dtype=torch.int64)
    for i in range(N, num_phy):
        hottest_X = (weight_XN / count).max(dim=-1).indices
        phy2log[:, i] = hottest_X
        replica[:, i] = count[rows, hottest_X]
        count[rows, hottest_X] += 1
    return Replication(phy2log, replica, count)


def _inverse(perm_XN: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_XN)
    inv.scatter_(1, perm_XN, torch.arange(perm_XN.shape[1], dtype=torch.int64).expand_as(perm_XN).clone())
    return inv


def _hierarchical(
    weight_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    L, E = weight_LE.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    experts_per_node = E // num_nodes

    # 1. groups -> nodes. "mlog" numbers experts node by node: node n holds mlog [n·E/nodes, (n+1)·E/nodes).
    group_load_LG = weight_LE.unflatten(-1, (num_groups, group_size)).sum(-1)
    groups = balanced_packing(group_load_LG, num_nodes)
    first_mlog_LG = (groups.pack_XN * groups_per_node + groups.rank_XN) * group_size
    log2mlog_LE = (first_mlog_LG[..., None] + torch.arange(group_size)).flatten(-2)
    mlog2log_LE = _inverse(log2mlog_LE)

    # 2. replicate inside each node: rows are (layer, node) pairs.
    mlog_load = weight_LE.gather(-1, mlog2log_LE).view(-1, experts_per_node)
    rep = replicate_experts(mlog_load, num_replicas // num_nodes)

    # 3. copies -> GPUs of the node, balancing load per copy.
    copy_load = (mlog_load / rep.count_XN).gather(-1, rep.phy2log_XP)
    gpus = balanced_packing(copy_load, num_gpus // num_nodes)
    slot_of_copy = gpus.pack_XN * slots_per_gpu + gpus.rank_XN
    copy_of_slot = _inverse(slot_of_copy)

    slot2mlog = rep.phy2log_XP.gather(-1, copy_of_slot)  # node-local mlog index per slot
    node_offset = torch.arange(0, E, experts_per_node).view(1, -1, 1)
    slot2mlog = (slot2mlog.view(L, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = mlog2log_LE.gather(-1, slot2mlog)
    replica = rep.replica_XP.gather(-1, copy_of_slot).view(L, -1)
    logcnt = rep.count_XN.view(L, -1).gather(-1, log2mlog_LE)
    return phy2log, replica, logcnt


@dataclass(frozen=True)
class EplbResult:
    """phy2log_LS: int64 ``[layers, replicas]``; log2phy_LEX: int64 ``[layers, E, max copies]`` (−1 padded);
    logcnt_LE: int64 ``[layers, E]`` copies per expert."""

    phy2log_LS: torch.Tensor
    log2phy_LEX: torch.Tensor
    logcnt_LE: torch.Tensor


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> EplbResult:
    """EPLB's entry point (same arguments as deepseek-ai/EPLB ``rebalance_experts``).

    weight: ``[layers, E]`` load per logical expert (any numeric dtype); num_replicas: physical slots, a
    multiple of ``num_gpus``; num_groups: expert groups (E divisible by it); num_nodes, num_gpus: the cluster
    (``num_gpus`` a multiple of ``num_nodes``). Hierarchical when ``num_groups % num_nodes == 0``, else global.
    """
    weight = torch.as_tensor(weight).float().cpu()
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
    L, E = weight.shape
    if E % num_groups:
        raise ValueError(f"{E} experts do not split into {num_groups} groups")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < E:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts ({E})")
    if num_groups % num_nodes == 0:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    X = int(logcnt.max())
    log2phy = torch.full((L, E, X), -1, dtype=torch.int64)
    log2phy.view(L, -1).scatter_(-1, phy2log * X + replica, torch.arange(num_replicas).expand(L, -1).clone())
    return EplbResult(phy2log, log2phy, logcnt)


def rank_loads(load_E: torch.Tensor, phy2log_S: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Load per rank (fp64 ``[num_ranks]``) when each expert's load is split evenly over its copies."""
    load_E = torch.as_tensor(load_E, dtype=torch.float64)
    copies_E = torch.bincount(phy2log_S, minlength=load_E.numel()).to(torch.float64)
    per_slot = (load_E / copies_E)[phy2log_S]
    return per_slot.view(num_ranks, -1).sum(dim=1)


def max_over_mean(values: torch.Tensor) -> float:
    """Imbalance: max / mean (1.0 = perfectly even)."""
    values = values.to(torch.float64)
    mean = float(values.mean())
    return float(values.max()) / mean if mean > 0 else 1.0
