"""Pipeline layout without processes: PP x EP x DP rank arithmetic, stage placement, the layer split, micro-batch
rules, and the replayed bubble of hand-written schedules."""

from __future__ import annotations

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.config import ConfigError
from latentmoe.parallel import Topology, TopologyError
from latentmoe.parallel.pp.schedules import (
    ChunkEvent,
    check_microbatches,
    default_microbatches,
    schedule_kind,
    stage_to_rank,
)
from latentmoe.parallel.pp.stages import StageModel, layer_split, moe_rows, stage_specs
from latentmoe.parallel.pp.timeline import replay_idle, step_timing, union_length


def test_pp2_ep2_dp2_on_two_nodes_keeps_ep_inside_a_node_and_pipelines_across():
    topos = [Topology(world_size=8, rank=r, gpus_per_node=4, ep_size=2, pp_size=2) for r in range(8)]
    t = topos[5]  # stage 1, DP replica 0, EP slice 1
    assert (t.pp_rank, t.stage_rank, t.dp_rank, t.ep_rank) == (1, 1, 0, 1)
    assert t.stage_group_ranks() == [4, 5, 6, 7]
    assert t.ep_group_ranks() == [4, 5] and t.expert_dp_group_ranks() == [5, 7]
    assert t.pp_group_ranks() == [1, 5] and t.dp_size == 2
    assert t.intra_node(t.ep_group_ranks()) and t.intra_node(t.stage_group_ranks())
    assert not t.intra_node(t.pp_group_ranks())  # stage 0 on node 0, stage 1 on node 1
    assert [x.pp_rank for x in topos] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.describe() == "8 ranks = 2 nodes x 4; PP 2 x EP 2 x DP 2"


def test_pp_size_one_keeps_the_expert_parallel_layout():
    t = Topology(world_size=4, rank=3, gpus_per_node=2, ep_size=2)
    assert (t.ep_rank, t.dp_rank, t.pp_rank, t.stage_rank) == (1, 1, 0, 3)
    assert t.ep_group_ranks() == [2, 3] and t.expert_dp_group_ranks() == [1, 3]


def test_a_world_that_pp_times_ep_does_not_divide_is_refused():
    with pytest.raises(TopologyError, match="PP x EP = 2 x 2"):
        Topology(world_size=6, rank=0, gpus_per_node=6, ep_size=2, pp_size=2)


def test_the_cli_offers_exactly_the_schedules_the_strategy_runs():
    from latentmoe.cli.ep_report import PP_SCHEDULES
    from latentmoe.parallel.pp.schedules import SCHEDULE_NAMES

    assert PP_SCHEDULES == SCHEDULE_NAMES


def test_stage_placement_loop_and_v():
    assert stage_to_rank(4, 2, "loop") == [0, 1, 0, 1]
    assert stage_to_rank(8, 4, "v") == [0, 1, 2, 3, 3, 2, 1, 0]  # rank 0 holds the first and the last stage
    assert schedule_kind("dualpipev").per_rank == 2 and schedule_kind("zb").per_rank == 1
    with pytest.raises(ConfigError, match="--pp-schedule must be one of"):
        schedule_kind("gpipe")


def test_layer_split_checks_pp_layers_and_defaults_to_the_flop_balance():
    config = ModelConfig.from_preset("tiny")
    assert layer_split(config, 2, (1, 1), seq_len=16) == [1, 1]
    # the last stage carries head + MTP (more forward FLOPs than both layers): both layers go first
    assert layer_split(config, 2, None, seq_len=16) == [2, 0]
    with pytest.raises(ConfigError, match="sum to the 2 layers"):
        layer_split(config, 2, (2, 1), seq_len=16)
    with pytest.raises(ConfigError, match="4 virtual stages"):
        layer_split(config, 4, (1, 1), seq_len=16)
    specs = stage_specs([1, 0, 1, 0])
    assert [s.layers for s in specs] == [(0,), (), (1,), ()]
    assert specs[0].first and specs[3].last and not specs[2].last


def test_microbatch_rules():
    dual = schedule_kind("dualpipev")
    assert default_microbatches(8, dual, 2) == 4  # at least one per virtual stage, dividing the rows
    assert default_microbatches(6, schedule_kind("1f1b"), 4) == 6
    with pytest.raises(ConfigError, match="at least as many micro-batches as virtual stages"):
        check_microbatches(2, 8, dual, 2)
    with pytest.raises(ConfigError, match="must divide the 8 rows"):
        check_microbatches(3, 8, dual, 2)


def test_stage_model_holds_only_its_modules_under_the_full_models_names():
    torch.manual_seed(0)
    full = CausalLM(ModelConfig.from_preset("tiny"))
    names = set(full.state_dict())
    specs = stage_specs([1, 1])
    first = StageModel(full, [specs[0]], replicate_embedding=True)
    last = StageModel(full, [specs[1]], replicate_embedding=True)
    assert set(first.state_dict()) | set(last.state_dict()) == names
    assert "model.embed_tokens.weight" in last.state_dict()  # the replica MTP reads
    assert not any(n.startswith(("lm_head", "mtp.", "model.layers.1.")) for n in first.state_dict())
    assert first.moe_layer_labels() == ["layer 1", "MTP 1"] == list(moe_rows(full.config))
    assert last.moe_layers() == full.moe_layers()  # layer 1 and the MTP block are both on the last stage
    load = torch.tensor([[5.0, 1, 1, 1, 1, 1, 1, 1], [1.0, 1, 1, 1, 1, 1, 1, 5]])
    last.update_router_biases(load, 0.01)
    assert full.model.layers[1].mlp.gate.e_score_correction_bias[0] == pytest.approx(-0.01)
    assert full.mtp[0].block.mlp.gate.e_score_correction_bias[7] == pytest.approx(-0.01)


def _ev(kind, stage, mb, start):
    return {"kind": kind, "stage": stage, "mb": mb, "start": start, "end": start + 0.5}


def test_replayed_1f1b_on_two_ranks_has_the_formulas_bubble():
    # 1F1B, 2 stages, 2 micro-batches, written out by hand in the order each rank runs its chunks
    rank0 = [_ev("F", 0, 0, 0), _ev("F", 0, 1, 1), _ev("B", 0, 0, 2), _ev("B", 0, 1, 3)]
    rank1 = [_ev("F", 1, 0, 0), _ev("B", 1, 0, 1), _ev("F", 1, 1, 2), _ev("B", 1, 1, 3)]
    # with F=1, B=2: rank 1 waits 1 at the start, rank 0 waits 1 between F1 and B0 (+ 2 for B1's gradient):
    # makespan = 2 x (F+B) + (PP-1)(F+B) = 9, busy 6 each -> 1/3 idle = bubble / (bubble + work)
    assert replay_idle([rank0, rank1], 2) == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay_idle([[_ev("B", 0, 0, 0)], [_ev("F", 1, 0, 0)]], 2)  # B of stage 0 before stage 1's


def test_busy_time_counts_overlapped_chunks_once():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    events = [ChunkEvent("F", 0, 0, 0.0, 2.0), ChunkEvent("B", 1, 0, 1.0, 3.0), ChunkEvent("I", 1, 1, 3.0, 4.0),
              ChunkEvent("W", 1, 1, 4.0, 4.5)]
    t = step_timing(events, 5.0)
    assert t.busy_s == 4.5 and t.idle_fraction == pytest.approx(0.1)
    assert sorted(t.b_s) == [1.5, 2.0]  # I + W of one micro-batch count as one B
