"""The name table (pure): ours ⇄ Hugging Face names, one table both ways."""

from __future__ import annotations

import pytest

from latentmoe import ModelConfig
from latentmoe.hf.load import model_shapes
from latentmoe.hf.names import build_name_table, expert_names, hf_name, rope_rows_permutation


@pytest.mark.parametrize(
    "ours, hf",
    [
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"),
        ("model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.gate.e_score_correction_bias"),
        ("mtp.0.enorm.weight", "model.layers.61.enorm.weight"),
        ("mtp.0.shared_head.norm.weight", "model.layers.61.shared_head.norm.weight"),
        ("mtp.1.block.self_attn.q_a_proj.weight", "model.layers.62.self_attn.q_a_proj.weight"),
        ("mtp.0.block.mlp.shared_experts.down_proj.weight", "model.layers.61.mlp.shared_experts.down_proj.weight"),
    ],
)
def test_hf_name_golden_examples(ours, hf):
    assert hf_name(ours, num_hidden_layers=61) == hf


def test_stacked_experts_map_to_one_tensor_per_expert():
    assert expert_names("model.layers.3.mlp.experts.down_proj", 2, num_hidden_layers=61) == (
        "model.layers.3.mlp.experts.0.down_proj.weight", "model.layers.3.mlp.experts.1.down_proj.weight")
    assert expert_names("mtp.0.block.mlp.experts.gate_proj", 1, num_hidden_layers=61) == (
        "model.layers.61.mlp.experts.0.gate_proj.weight",)
    assert expert_names("model.layers.3.mlp.shared_experts.gate_proj.weight", 2, num_hidden_layers=61) is None


def test_table_covers_every_tensor_once_in_both_directions():
    config = ModelConfig.from_preset("tiny")
    shapes = model_shapes(config)
    table = build_name_table(shapes, config)
    assert [m.ours for m in table.maps] == list(shapes)  # every one of our tensors, in state-dict order
    by_hf = table.by_hf()
    assert len(by_hf) == sum(len(m.hf) for m in table.maps)  # no HF name used twice
    E = config.n_routed_experts
    assert by_hf["model.layers.2.mlp.experts.5.up_proj.weight"][0].ours == "mtp.0.block.mlp.experts.up_proj"
    assert by_hf["model.layers.2.mlp.experts.5.up_proj.weight"][1] == 5
    assert by_hf["model.layers.1.mlp.experts.0.down_proj.weight"][0].hf_shape() == (64, 32)
    assert len(by_hf) == len(shapes) + 2 * 3 * (E - 1)  # two MoE layers (main + MTP), three stacked tensors each
    assert table.copies == {"model.layers.2.shared_head.head.weight": "lm_head.weight",
                            "model.layers.2.embed_tokens.weight": "model.embed_tokens.weight"}


def test_rope_rows_permutation_interleaves_the_two_halves():
    config = ModelConfig.from_preset("tiny").replace(num_attention_heads=2, qk_nope_head_dim=2, qk_rope_head_dim=4)
    # per head: [n0 n1 | r0 r1 r2 r3] stored as halves (pairs (r0, r2), (r1, r3)) -> [n0 n1 r0 r2 r1 r3]
    assert rope_rows_permutation("model.layers.0.self_attn.q_b_proj.weight", config) == [0, 1, 2, 4, 3, 5,
                                                                                           6, 7, 8, 10, 9, 11]
    C = config.kv_lora_rank
    assert rope_rows_permutation("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", config)[C:] == [
        C, C + 2, C + 1, C + 3]
    assert rope_rows_permutation("model.layers.0.self_attn.kv_b_proj.weight", config) is None
