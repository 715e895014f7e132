"""The planner's pipeline arithmetic against the paper's expressions (paper.md §16 check 19), worked by hand."""

from __future__ import annotations

import json

import pytest

from latentmoe import ModelConfig
from latentmoe.cli.plan import main
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.plan.errors import PlanError
from latentmoe.plan.pipeline import (
    ChunkTimes,
    LayerCosts,
    activation_multiplier,
    balanced_split,
    bubble,
    bubble_1f1b,
    bubble_dualpipe,
    bubble_fraction,
    bubble_interleaved,
    bubble_zb1p,
    devices,
    layer_costs,
    measured_pipeline,
    pipeline_rows,
    split_cost,
)

# PP = 8 stages, F = 2, B = 4, W = 1.5, F&B = 5 (a forward and a backward overlapped: 1 unit hidden)
T = ChunkTimes(forward=2, backward=4, weight=1.5, overlapped=5)


def test_bubbles_are_the_papers_expressions_worked_by_hand():
    assert bubble_1f1b(8, T) == 7 * (2 + 4) == 42  # (PP-1)(F+B)
    assert bubble_zb1p(8, T) == 7 * (2 + 4 - 3) == 21  # (PP-1)(F+B-2W)
    assert bubble_dualpipe(8, T) == 3 * (5 + 4 - 4.5) == 13.5  # (PP/2-1)(F&B+B-3W)
    assert bubble("dualpipev", 8, T) == bubble("dualpipe", 8, T)  # same bubble, on PP/2 devices
    assert bubble_interleaved(8, T) == 3 * 6 == 18  # 1F1B's bubble over 4 devices with 2 stages each


def test_dualpipe_without_overlap_counts_f_plus_b_and_two_stages_have_no_dualpipe_bubble():
    t = ChunkTimes(forward=1, backward=2, weight=1)
    assert t.f_and_b == 3
    assert bubble_dualpipe(16, t) == 7 * (3 + 2 - 3) == 14
    assert bubble_dualpipe(2, t) == 0  # PP/2 - 1 = 0


def test_memory_columns_params_1_1_2_2_and_activations_pp_pp_pp_plus_1():
    arch = arch_from_model_config(ModelConfig.from_preset("deepseek-v3"), "deepseek-v3")
    rows = {r.schedule: r for r in pipeline_rows(arch, pp=16, microbatches=20, times=T, stage_activation_bytes=10)}
    assert [rows[s].params_multiplier for s in ("1f1b", "zb1p", "dualpipe", "dualpipev")] == [1, 1, 2, 2]
    assert [rows[s].activation_multiplier for s in ("1f1b", "zb1p", "dualpipe", "dualpipev")] == [16, 16, 17, 17]
    assert rows["dualpipev"].device_activation_bytes == 170
    assert rows["dualpipe"].device_params == 2 * rows["1f1b"].device_params
    assert [rows[s].devices for s in ("1f1b", "zb1p", "dualpipe", "dualpipev")] == [16, 16, 16, 8]


def test_bubble_fraction_is_bubble_over_bubble_plus_the_devices_work():
    t = ChunkTimes(forward=1, backward=2, weight=1)
    # 1F1B, 2 stages, 4 micro-batches: bubble 3, work 4 x 3 = 12
    assert bubble_fraction("1f1b", 2, 4, t) == pytest.approx(3 / 15)
    assert bubble_fraction("zb1p", 2, 4, t) == pytest.approx(1 / 13)
    # DualPipeV on 2 devices = 4 stages; each device runs every micro-batch through 2 stages
    assert devices("dualpipev", 4) == 2
    assert bubble_fraction("dualpipev", 4, 4, t) == pytest.approx(2 / 26)
    assert bubble_fraction("interleaved", 4, 4, t) == pytest.approx(3 / 27)


def test_odd_pp_is_refused_by_the_bidirectional_schedules():
    with pytest.raises(PlanError, match="even number of stages"):
        bubble("dualpipe", 7, T)
    with pytest.raises(PlanError, match="unknown schedule"):
        bubble("gpipe", 4, T)
    with pytest.raises(PlanError, match="cannot exceed"):
        ChunkTimes(forward=1, backward=1, weight=2)
    assert activation_multiplier("zb1p", 3) == 3


def test_layer_costs_of_the_tiny_preset_worked_by_hand():
    arch = arch_from_model_config(ModelConfig.from_preset("tiny"), "tiny")
    costs = layer_costs(arch, seq_len=128)
    # attention matmuls: q 64*32 + 32*4*24, kv 64*24 + 16*4*32, out 4*16*64 = 12,800; QK^T + AV over 64 keys:
    # 2 * 64 * 4 * (24 + 16) = 20,480
    attention = 2 * 12_800 + 20_480
    assert costs.layers[0] == attention + 2 * 3 * 64 * 128  # dense SwiGLU of 128
    # MoE: shared 3*64*32, router 64*8, two routed experts 2*3*64*32
    assert costs.layers[1] == attention + 2 * (3 * 64 * 32 + 64 * 8 + 2 * 3 * 64 * 32)
    head = 2 * 512 * 64
    mtp_block = 2 * (12_800 + 3 * 64 * 32 + 64 * 8 + 2 * 3 * 64 * 32 + 2 * 64 * 64) + 20_480
    assert costs.last == head + mtp_block + head
    assert costs.first == 0


def test_balanced_split_minimises_the_costliest_stage():
    uniform = LayerCosts(layers=(1.0,) * 4, first=0.0, last=0.0)
    assert balanced_split(uniform, 2) == [2, 2]
    assert balanced_split(LayerCosts(layers=(1.0,) * 4, first=0.0, last=2.0), 2) == [3, 1]  # max 3 either way
    # one heavy layer first: [4 | 1 1 1] and the head on the last stage: 4 vs 3 + 0.5
    assert balanced_split(LayerCosts(layers=(4.0, 1.0, 1.0, 1.0), first=0.0, last=0.5), 2) == [1, 3]
    assert balanced_split(uniform, 6) == [1, 1, 1, 1, 0, 0]  # more stages than layers: empty stages at the end
    assert split_cost(LayerCosts(layers=(4.0, 1.0, 1.0, 1.0), first=0.0, last=0.5), [1, 3]) == [4.0, 3.5]
    with pytest.raises(PlanError, match="do not split"):
        split_cost(uniform, [1, 1])


def test_measured_pipeline_reads_the_trainers_metrics_beside_the_formula():
    layout = {"schedule": "1f1b", "virtual_stages": 2}
    first = {"step": 1, "pp_idle_fraction": [0.9, 0.9], "pp_microbatches": 4, "pp_forward_chunk_s": [9.0, 9.0],
             "pp_backward_chunk_s": [9.0, 9.0], "pp_weight_chunk_s": [0.0, 0.0]}
    later = {"step": 2, "pp_idle_fraction": [0.3, 0.1], "pp_microbatches": 4, "pp_forward_chunk_s": [1.0, 3.0],
             "pp_backward_chunk_s": [2.0, 6.0], "pp_weight_chunk_s": [0.0, 0.0],
             "pp_replayed_idle_fraction": [0.2, 0.2]}
    m = measured_pipeline(layout, [first, later])  # the first window (set-up) is left out
    assert m.times.forward == 2.0 and m.times.backward == 4.0
    assert m.measured_per_rank == (0.3, 0.1) and m.measured_mean == pytest.approx(0.2)
    assert m.predicted == pytest.approx(6 / (6 + 4 * 6))  # (PP-1)(F+B) / (that + n(F+B))
    assert m.replayed_per_rank == (0.2, 0.2) and m.unit_predicted == pytest.approx(0.2)
    with pytest.raises(PlanError, match="no pp_"):
        measured_pipeline(layout, [{"step": 1, "loss": 1.0}])


def test_plan_pipeline_command_prints_the_table_and_json(capsys):
    assert main(["pipeline", "--pp", "8", "--f", "2", "--b", "4", "--w", "1.5", "--fb", "5", "--json"]) == 0
    rows = {row["schedule"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert [rows[s]["bubble"] for s in ("1f1b", "zb1p", "dualpipe", "dualpipev")] == [42, 21, 13.5, 13.5]
    assert main(["pipeline", "--model", "tiny", "--pp", "2"]) == 0
    text = capsys.readouterr().out
    assert "(PP/2-1)(F&B+B-3W)" in text and "dualpipev" in text


def test_plan_pipeline_measured_without_a_pipeline_run_is_one_line(capsys, tmp_path):
    assert main(["pipeline", "--measured", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pp_layout.json: no such file" in err
