"""Topology arithmetic (nodes, EP and expert-DP groups) and dispatch planning, without processes."""

import pytest
import torch

from latentmoe.parallel import ExpertPlacement, Topology, TopologyError, experts_per_rank, plan_dispatch
from latentmoe.parallel.ep import choose_slots
from latentmoe.parallel.traffic import link_bytes, node_fanout


def test_four_ranks_as_two_nodes_with_ep4_form_one_ep_group_spanning_both_nodes():
    topos = [Topology(world_size=4, rank=r, gpus_per_node=2, ep_size=4) for r in range(4)]
    assert [t.node for t in topos] == [0, 0, 1, 1]
    assert [t.local_rank for t in topos] == [0, 1, 0, 1]
    assert topos[0].n_nodes == 2 and topos[0].dp_size == 1
    assert topos[3].ep_group_ranks() == [0, 1, 2, 3] and topos[3].ep_nodes == [0, 0, 1, 1]
    assert topos[3].expert_dp_group_ranks() == [3]


def test_ep2_dp2_groups_pair_ranks_holding_the_same_experts():
    t = Topology(world_size=4, rank=3, gpus_per_node=2, ep_size=2)
    assert (t.ep_rank, t.dp_rank) == (1, 1)
    assert t.ep_group_ranks() == [2, 3] and t.expert_dp_group_ranks() == [1, 3]
    assert t.ep_n_nodes == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(world_size=4, rank=0, gpus_per_node=3, ep_size=4), "gpus_per_node"),
        (dict(world_size=4, rank=0, gpus_per_node=2, ep_size=3), "EP size"),
        (dict(world_size=4, rank=4, gpus_per_node=2, ep_size=2), "rank 4"),
        (dict(world_size=0, rank=0, gpus_per_node=1, ep_size=1), "world_size"),
    ],
)
def test_impossible_layouts_raise_naming_the_quantity(kwargs, message):
    with pytest.raises(TopologyError, match=message):
        Topology(**kwargs)


def test_experts_must_split_evenly_over_ep_ranks():
    assert experts_per_rank(16, 4) == 4
    with pytest.raises(TopologyError, match=r"n_routed_experts \(16\) is not divisible by the EP size \(3\)"):
        experts_per_rank(16, 3)


def test_plan_sends_a_token_once_per_destination_rank_ordered_by_rank():
    # 3 tokens, top-2, 4 experts on 2 ranks (2 each): token 0 -> experts 0,1 (both rank 0): one row.
    slot_TK = torch.tensor([[0, 1], [1, 2], [3, 2]])
    plan = plan_dispatch(slot_TK, slots_per_rank=2, ep_size=2)
    assert plan.send_counts_R.tolist() == [2, 2]
    assert plan.token_N.tolist() == [0, 1, 1, 2] and plan.dest_N.tolist() == [0, 0, 1, 1]
    assert plan.local_slot_NK.tolist() == [[0, 1], [1, -1], [-1, 0], [1, 0]]
    per_expert = plan_dispatch(slot_TK, slots_per_rank=2, ep_size=2, dedup=False)
    assert per_expert.send_counts_R.tolist() == [3, 3]
    assert (per_expert.local_slot_NK >= 0).sum(1).tolist() == [1] * 6


def test_zero_rows_to_a_rank_is_a_valid_plan():
    plan = plan_dispatch(torch.tensor([[0, 1], [1, 0]]), slots_per_rank=2, ep_size=3)
    assert plan.send_counts_R.tolist() == [2, 0, 0]


def test_replicas_are_chosen_round_robin_by_token():
    placement = ExpertPlacement(torch.tensor([0, 1, 2, 0]), ep_size=2, n_logical=3)
    assert placement.log2phy_EX.tolist() == [[0, 3], [1, -1], [2, -1]]
    slots = choose_slots(torch.tensor([[0], [0], [1], [0]]), placement)
    assert slots.flatten().tolist() == [0, 3, 1, 3]
    with pytest.raises(ValueError, match=r"logical experts \[2\]"):
        ExpertPlacement(torch.tensor([0, 1, 1, 0]), ep_size=2, n_logical=3)


def test_link_classes_and_node_fanout():
    links = link_bytes([10, 20, 30, 40], my_ep_rank=1, peer_nodes=[0, 0, 1, 1])
    assert (links.local, links.intra, links.inter) == (20, 10, 70)
    # token 0 -> ranks 0 and 2 (nodes 0, 1); token 1 -> ranks 2, 3 (node 1 only)
    fan = node_fanout(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 2, 3]), n_tokens=2,
                      peer_nodes=[0, 0, 1, 1], my_node=0)
    assert fan.nodes_T.tolist() == [2, 1] and fan.remote_T.tolist() == [1, 1]
