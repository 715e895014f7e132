"""ModelConfig: presets, HF config.json round trip, validation that names the field."""

import json

import pytest

from latentmoe.config import ConfigError, ModelConfig, preset_names


def test_presets_load_and_validate():
    assert {"tiny", "small", "deepseek-v3"} <= set(preset_names())
    v3 = ModelConfig.from_preset("deepseek-v3")
    # paper.md §1.1
    assert (v3.hidden_size, v3.num_hidden_layers, v3.num_attention_heads) == (7168, 61, 128)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_nope_head_dim, v3.qk_rope_head_dim) == (1536, 512, 128, 64)
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert v3.vocab_size == 129280 and v3.first_k_dense_replace == 3 and v3.routed_scaling_factor == 2.5


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    # A file written by a tool (strict=False): any unknown key is kept and written back as it was.
    data = ModelConfig.from_preset("tiny").to_dict()
    data["quantization_config"] = {"fmt": "e4m3", "weight_block_size": [128, 128]}
    data["some_future_key"] = 7
    src = tmp_path / "config.json"
    src.write_text(json.dumps(data))
    config = ModelConfig.from_json(src, strict=False)
    assert config.extra["some_future_key"] == 7
    config.to_json(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["quantization_config"] == data["quantization_config"]  # a Hugging Face key: top level
    assert written["extra"] == {"some_future_key": 7}  # ours: under "extra", so a strict read accepts it
    assert ModelConfig.from_json(tmp_path / "out.json").extra == config.extra


def test_a_hand_written_config_is_read_strictly(tmp_path):
    data = ModelConfig.from_preset("tiny").to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match=r"config\.json: required field hidden_size is missing"):
        ModelConfig.from_json(path)
    path.write_text(json.dumps({**data, "hiden_size": 64}))
    with pytest.raises(ConfigError, match=r"unknown field 'hiden_size'; did you mean hidden_size\?"):
        ModelConfig.from_json(path)
    path.write_text(json.dumps({**data, "extra": {"my_note": "kept"}, "torch_dtype": "bfloat16"}))
    config = ModelConfig.from_json(path)
    assert config.extra == {"architectures": data["architectures"], "my_note": "kept", "torch_dtype": "bfloat16"}
    path.write_text(json.dumps({**data, "extra": 3}))
    with pytest.raises(ConfigError, match="extra must be a JSON object"):
        ModelConfig.from_json(path)


def test_q_lora_rank_zero_means_no_query_compression():
    config = ModelConfig.from_preset("tiny").to_dict()
    config["q_lora_rank"] = 0
    assert not ModelConfig.from_dict(config).uses_q_lora


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"topk_group": 5}, "topk_group"),
        ({"n_routed_experts": 10}, "n_routed_experts"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -4}, "kv_lora_rank"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling"),
    ],
)
def test_validation_names_the_bad_field(changes, field):
    data = ModelConfig.from_preset("tiny").to_dict() | changes
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(data)


def test_greedy_routing_ignores_groups_in_the_reachability_check():
    # DeepSeek-V2-style greedy top-k ignores groups (as transformers and DeepSeek's reference do), so
    # 6 experts of 8 are reachable although one kept group of 2 holds only 2 of them.
    data = ModelConfig.from_preset("tiny").to_dict() | {
        "topk_method": "greedy", "scoring_func": "softmax", "num_experts_per_tok": 6, "topk_group": 1}
    assert ModelConfig.from_dict(data).num_experts_per_tok == 6
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_dict(data | {"topk_method": "group_limited_greedy"})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.from_dict(data | {"num_experts_per_tok": 9})


def test_unknown_preset_and_bad_json_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(bad)
