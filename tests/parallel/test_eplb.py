"""EPLB: DeepSeek's README example as a golden test, the packing/replication rules, and applying a placement."""

import pytest
import torch

from latentmoe.parallel.eplb import balanced_packing, max_over_mean, rank_loads, rebalance_experts, replicate_experts

# deepseek-ai/EPLB README: 2 MoE layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs (paper.md §16.21).
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_readme_example_gives_the_readme_phy2log_exactly():
    result = rebalance_experts(torch.tensor(README_WEIGHT), 16, 4, 2, 8)
    assert result.phy2log_LS.tolist() == README_PHY2LOG
    # log2phy inverts phy2log; logcnt counts the copies
    for layer in range(2):
        for e in range(12):
            slots = [s for s in result.log2phy_LEX[layer, e].tolist() if s >= 0]
            assert all(result.phy2log_LS[layer, s] == e for s in slots)
            assert len(slots) == result.logcnt_LE[layer, e]
    assert result.logcnt_LE.sum(1).tolist() == [16, 16]


def test_hierarchical_placement_keeps_each_group_on_one_node():
    result = rebalance_experts(torch.tensor(README_WEIGHT), 16, 4, 2, 8)
    for layer in range(2):
        node_of_slot = torch.arange(16) // 8
        for g in range(4):
            nodes = {int(node_of_slot[s]) for s in range(16) if result.phy2log_LS[layer, s] // 3 == g}
            assert len(nodes) == 1


def test_replicas_lower_the_max_over_mean_rank_load():
    weight = torch.tensor(README_WEIGHT, dtype=torch.float64)
    for layer in range(2):
        before = rank_loads(weight[layer], torch.arange(12), 4)  # 12 experts on 4 ranks, no copies
        placed = rebalance_experts(weight[layer : layer + 1], 16, 4, 2, 4).phy2log_LS[0]
        after = rank_loads(weight[layer], placed, 4)
        assert after.sum() == pytest.approx(weight[layer].sum())
        assert max_over_mean(after) < max_over_mean(before)


def test_packing_fills_every_pack_equally_heaviest_first():
    packing = balanced_packing(torch.tensor([[5.0, 1.0, 4.0, 2.0]]), 2)
    assert packing.pack_XN.tolist() == [[0, 0, 1, 1]]  # 5 -> p0, 4 -> p1, 2 -> p1 (lighter), 1 -> p0
    assert sorted(packing.rank_XN[0].tolist()) == [0, 0, 1, 1]


def test_each_new_copy_goes_to_the_highest_load_per_copy():
    rep = replicate_experts(torch.tensor([[10.0, 3.0, 6.0]]), 5)
    assert rep.phy2log_XP.tolist() == [[0, 1, 2, 0, 2]]  # 10 -> copy; then 6 (> 10/2 = 5)
    assert rep.count_XN.tolist() == [[2, 1, 2]]


def test_global_policy_when_groups_do_not_divide_nodes_and_bad_shapes_are_named():
    result = rebalance_experts(torch.tensor(README_WEIGHT), 16, 3, 2, 8)  # 3 groups on 2 nodes: global
    assert result.logcnt_LE.sum(1).tolist() == [16, 16]
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(torch.tensor(README_WEIGHT), 15, 4, 2, 8)


def _apply_placement(rank: int, world: int) -> None:
    from latentmoe.parallel import Topology, build_groups, enable_expert_parallel
    from latentmoe.parallel.ep import ExpertPlacement, apply_placement
    from latentmoe.parallel.eplb import rebalance_experts
    from tests.parallel.test_ep_layer import SEQ_PER_RANK, build, global_batch, moe_config, rel_err

    config = moe_config(n_experts=8, top_k=2, n_group=4, topk_group=2)
    bias = torch.zeros(8)
    bias[:2] = 0.3  # experts 0 and 1 (both on rank 0) hot
    ref, ep = build(config), build(config)
    for m in (ref, ep):
        m.gate.e_score_correction_bias.copy_(bias)
    topo = Topology(world_size=world, rank=rank, gpus_per_node=1, ep_size=world)
    (hook,) = enable_expert_parallel(ep, build_groups(topo))
    x, _ = global_batch(world, config)
    rows = slice(rank * SEQ_PER_RANK, (rank + 1) * SEQ_PER_RANK)
    with torch.no_grad():
        y_ref = ref(x).hidden_BSD[rows]
        load_E = ref(x).load_E  # the window's load, same on every rank
        ep(x[rows])
        before = torch.tensor([float(hook.received_assignments)])
        result = rebalance_experts(load_E[None], 12, 4, world, world)  # 8 experts -> 12 slots
        apply_placement(ep, [ExpertPlacement(result.phy2log_LS[0], world, 8)])
        hook.received_assignments = 0
        y_ep = ep(x[rows]).hidden_BSD
        after = torch.tensor([float(hook.received_assignments)])
    assert rel_err(y_ep, y_ref) <= 1e-5  # replicas hold the same weights: same output
    loads_before, loads_after = [torch.zeros(1) for _ in range(world)], [torch.zeros(1) for _ in range(world)]
    torch.distributed.all_gather(loads_before, before)
    torch.distributed.all_gather(loads_after, after)
    b, a = torch.cat(loads_before), torch.cat(loads_after)
    assert a.sum() == b.sum()
    assert max_over_mean(a) < max_over_mean(b)


def test_applied_eplb_placement_keeps_outputs_and_evens_rank_load():
    from tests.parallel.launch import run_ranks

    run_ranks(_apply_placement, 2)
