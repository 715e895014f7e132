"""config.json dialects: DeepSeek's official files and what transformers 5 writes, read to the same model."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from latentmoe.hf import FP8Quantization, HFCheckpointError, config_from_hf, config_to_hf

FP8_RELEASE = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def official_v3() -> dict:
    """DeepSeek-V3's config.json as released (the preset is that file without the FP8 and remote-code keys)."""
    data = json.loads(resources.files("latentmoe.presets").joinpath("deepseek-v3.json").read_text())
    return {**data, "quantization_config": FP8_RELEASE,
            "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}}


def official_v2() -> dict:
    return json.loads(resources.files("latentmoe.plan.models").joinpath("deepseek-v2.json").read_text())


def test_official_v3_config_reads_with_fp8_and_yarn():
    hf = config_from_hf(official_v3())
    c = hf.config
    assert hf.fp8 == FP8Quantization(block=(128, 128)) and hf.rope_interleave
    assert (c.scoring_func, c.topk_method, c.n_group, c.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert c.yarn["factor"] == 40 and c.yarn["original_max_position_embeddings"] == 4096 and c.rope_theta == 10000
    assert "quantization_config" not in c.extra and "auto_map" not in c.extra  # describe files, not the model
    assert c.extra["aux_loss_alpha"] == 0.001


def test_transformers_written_config_reads_like_the_official_one(tmp_path):
    from transformers import DeepseekV3Config

    official = official_v3()
    dropped = ("quantization_config", "auto_map", "scoring_func", "topk_method")  # not DeepseekV3Config fields
    DeepseekV3Config.from_dict({k: v for k, v in official.items() if k not in dropped}).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written and "scoring_func" not in written
    ours_from_hf, ours_from_official = config_from_hf(written).config, config_from_hf(official).config
    for field in ("rope_theta", "scoring_func", "topk_method", "n_group", "topk_group", "q_lora_rank",
                  "num_nextn_predict_layers", "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob"):
        assert getattr(ours_from_hf, field) == getattr(ours_from_official, field), field
    assert {k: float(v) for k, v in ours_from_hf.yarn.items() if k != "type"} == {
        k: float(v) for k, v in ours_from_official.yarn.items() if k != "type"}


def test_official_v2_and_v2_lite_style_configs():
    v2 = config_from_hf(official_v2()).config
    assert (v2.scoring_func, v2.topk_method, v2.n_group, v2.topk_group) == ("softmax", "group_limited_greedy", 8, 3)
    assert v2.num_nextn_predict_layers == 0 and v2.yarn["mscale"] == 0.707
    lite = {**official_v2(), "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
            "n_routed_experts": 64, "num_experts_per_tok": 6, "num_hidden_layers": 27}
    assert config_from_hf(lite).config.q_lora_rank is None


def test_transformers_v2_config_with_null_groups_and_no_scoring_func():
    data = {k: v for k, v in official_v2().items() if k not in ("scoring_func", "topk_method")}
    data.update(n_group=None, topk_group=None)
    c = config_from_hf(data).config
    assert (c.scoring_func, c.topk_method, c.n_group, c.topk_group) == ("softmax", "greedy", 1, 1)


def test_written_config_states_routing_and_both_rope_dialects_and_transformers_agrees():
    from transformers import DeepseekV3Config

    config = config_from_hf(official_v3()).config
    written = config_to_hf(config, dtype="bfloat16", num_mtp_layers=1)
    for key, value in {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
                       "rope_interleave": True, "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16"}.items():
        assert written[key] == value, key
    assert written["rope_scaling"]["type"] == "yarn" and written["rope_parameters"]["rope_type"] == "yarn"
    assert "quantization_config" not in written and "auto_map" not in written
    assert config_from_hf(written).config == config
    from_written = DeepseekV3Config.from_dict(written).rope_parameters
    from_official = DeepseekV3Config.from_dict(official_v3()).rope_parameters
    assert {k: from_written[k] for k in from_official if k != "type"} == {
        k: v for k, v in from_official.items() if k != "type"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear' is not supported"),
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}},
         "rope_parameters.rope_type 'dynamic' is not supported"),
        ({"rope_scaling": {**official_v3()["rope_scaling"], "truncate": False}}, "rope_scaling.truncate False"),
        ({"rope_scaling": {**official_v3()["rope_scaling"], "attention_factor": 1.3}}, "attention_factor 1.3"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}, "rope_parameters .* disagree"),
        ({"quantization_config": {**FP8_RELEASE, "fmt": "e5m2"}}, "quantization_config.fmt 'e5m2' is not supported"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method 'awq' is not supported"),
        ({"quantization_config": {**FP8_RELEASE, "weight_block_size": [128]}}, r"weight_block_size \[128\]"),
        ({"head_dim": 128}, "head_dim 128 is not supported"),
        ({"qk_head_dim": 128}, "qk_head_dim 128 is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"mlp_bias": True}, "mlp_bias True is not supported"),
        ({"scoring_func": "tanh"}, "scoring_func 'tanh' is not one of"),
        ({"topk_method": "sinkhorn"}, "topk_method 'sinkhorn' is not one of"),
    ],
)
def test_unsupported_values_name_the_key_and_value(change, message):
    with pytest.raises(HFCheckpointError, match=f"^dir/config.json: .*{message}"):
        config_from_hf({**official_v3(), **change}, source="dir/config.json")
