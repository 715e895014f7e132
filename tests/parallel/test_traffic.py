"""Traffic counters on 4 gloo ranks simulating 2 nodes × 2 ranks: link classes, node-limited routing."""

from __future__ import annotations

import torch

from tests.parallel.launch import run_ranks
from tests.parallel.test_ep_layer import SEQ_LEN, SEQ_PER_RANK, build, global_batch, moe_config

N_NODES, GPUS_PER_NODE, M = 2, 2, 1


def _forward(rank, world, config, **ep_options):
    from latentmoe.parallel import Topology, build_groups, enable_expert_parallel

    topo = Topology(world_size=world, rank=rank, gpus_per_node=GPUS_PER_NODE, ep_size=world)
    moe = build(config)
    (hook,) = enable_expert_parallel(moe, build_groups(topo), **ep_options)
    x, _ = global_batch(world, config)
    rows = slice(rank * SEQ_PER_RANK, (rank + 1) * SEQ_PER_RANK)
    with torch.no_grad():
        routing = moe.gate(x[rows].reshape(-1, config.hidden_size))
        moe(x[rows])
    return topo, hook, routing


def _node_limited(rank: int, world: int) -> None:
    from latentmoe.parallel.traffic import summarize_over_ranks

    # Groups = nodes (n_group = 2 groups of 4 experts = the 4 experts of one node), keep M = 1 group.
    limited = moe_config(n_experts=8, top_k=3, n_group=N_NODES, topk_group=M)
    topo, hook, routing = _forward(rank, world, limited)
    t = hook.traffic
    tokens = SEQ_PER_RANK * SEQ_LEN
    assert t.tokens == tokens and sum(t.tokens_by_nodes) == tokens
    assert t.max_nodes_per_token <= M, t.tokens_by_nodes  # read from the counters, not the router
    row = 4 * limited.hidden_size
    assert t.two_hop_inter_dispatch <= tokens * M * row

    # Independent recount from the router's choices: rows per (token, rank), classified by node.
    dest_TK = routing.topk_idx_TK // (limited.n_routed_experts // world)
    rows_to = torch.zeros(world, dtype=torch.int64)
    for dests in dest_TK.tolist():
        for r in set(dests):
            rows_to[r] += 1
    same_node = [r for r in range(world) if topo.node_of(r) == topo.node and r != rank]
    other_node = [r for r in range(world) if topo.node_of(r) != topo.node]
    assert t.dispatch.local == rows_to[rank] * row
    assert t.dispatch.intra == rows_to[same_node].sum() * row
    assert t.dispatch.inter == rows_to[other_node].sum() * row

    summary = summarize_over_ranks(t, n_bins=N_NODES + 1)
    assert summary.total.max_nodes_per_token <= M and summary.total.tokens == world * tokens
    assert summary.max_rank_wire == max(summary.per_rank_wire) >= t.wire

    # Without the limit the same batch reaches both nodes for some tokens.
    free = moe_config(n_experts=8, top_k=3, n_group=1, topk_group=1)
    _, free_hook, _ = _forward(rank, world, free)
    free_summary = summarize_over_ranks(free_hook.traffic, n_bins=N_NODES + 1)
    assert free_summary.total.max_nodes_per_token == N_NODES
    assert free_summary.total.two_hop_inter_dispatch > summary.total.two_hop_inter_dispatch

    # FP8 dispatch: exactly 1 byte per value + one fp32 scale per 128, vs 2 bytes for BF16.
    _, h8, _ = _forward(rank, world, limited, dispatch="fp8")
    _, h16, _ = _forward(rank, world, limited, dispatch="bf16")
    D = limited.hidden_size
    assert h8.traffic.rows == h16.traffic.rows
    assert h16.traffic.dispatch.total == h16.traffic.rows * 2 * D
    assert h8.traffic.dispatch.total == h8.traffic.rows * (D + 4 * ((D + 127) // 128))


def test_node_limited_routing_never_reaches_more_than_m_nodes_per_the_counters():
    run_ranks(_node_limited, N_NODES * GPUS_PER_NODE)
