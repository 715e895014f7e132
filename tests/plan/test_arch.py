"""Reading presets and Hugging Face config.json files into ArchSpec; bad configs name the bad field."""

import json

import pytest

from latentmoe.config import ModelConfig
from latentmoe.plan.arch import arch_from_hf_dict, arch_from_model_config, load_arch, model_names
from latentmoe.plan.arith import param_count
from latentmoe.plan.errors import PlanError
from tests.plan.helpers import tiny_llama_config


def test_shipped_presets_load_with_their_attention_kind():
    assert {"deepseek-v3", "deepseek-v2", "qwen2.5-72b", "llama-3.1-405b"} <= set(model_names())
    assert load_arch("deepseek-v3").label == "MLA+MoE"
    assert load_arch("qwen2.5-72b").label == "GQA dense"
    assert load_arch("llama-3.1-405b").attention_label == "GQA"


def test_deepseek_v3_ffn_layout_and_fanout():
    v3 = load_arch("deepseek-v3")
    assert [f.kind for f in v3.ffn[:4]] == ["dense", "dense", "dense", "moe"]
    assert sum(f.is_moe for f in v3.ffn) == 58
    assert v3.fanout == 8 + 1  # ISCA §2.3.2: 8 routed + 1 shared
    assert v3.moe_ffn.router_bias and v3.mtp_layers == 1


def test_deepseek_v2_has_no_routing_bias_and_no_mtp():
    v2 = load_arch("deepseek-v2")
    assert not v2.moe_ffn.router_bias
    assert v2.mtp_layers == 0
    assert v2.fanout == 6 + 2
    assert v2.ffn[0].kind == "dense" and v2.ffn[1].kind == "moe"


def test_model_config_and_its_dict_give_the_same_arch():
    config = ModelConfig.from_preset("deepseek-v3")
    assert arch_from_model_config(config, "x") == arch_from_hf_dict(config.to_dict(), "x")


def test_mha_mqa_and_qkv_bias_follow_hf_defaults():
    mha = arch_from_hf_dict({k: v for k, v in tiny_llama_config().items() if k != "num_key_value_heads"}, "m")
    assert mha.num_kv_heads == 4 and mha.attention_label == "MHA"
    mqa = arch_from_hf_dict(tiny_llama_config(num_key_value_heads=1), "q")
    assert mqa.attention_label == "MQA"
    assert not mha.qkv_bias
    llama = arch_from_hf_dict(tiny_llama_config(), "llama")
    qwen = arch_from_hf_dict(tiny_llama_config(model_type="qwen2"), "qwen")
    assert qwen.qkv_bias and not qwen.o_bias and not llama.qkv_bias
    # Qwen2 adds q (4 heads x 16), k and v (2 KV heads x 16 each) biases in each of the 2 layers.
    assert param_count(qwen).total - param_count(llama).total == 2 * (4 * 16 + 2 * 2 * 16)


def test_qwen2_moe_layers_and_shared_gate():
    config = tiny_llama_config(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[0],
    )
    arch = arch_from_hf_dict(config, "qmoe")
    assert [f.kind for f in arch.ffn] == ["dense", "moe"]
    moe = arch.ffn[1]
    assert moe.fanout == 3 and moe.shared_expert_gate


def test_config_json_path_and_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_llama_config()))
    assert load_arch(str(tmp_path / "m")).name == "m"
    assert load_arch(str(tmp_path / "m" / "config.json")).hidden_size == 64


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({k: v for k, v in tiny_llama_config().items() if k != "num_hidden_layers"}, "'num_hidden_layers'"),
        (tiny_llama_config(hidden_size=-64), "'hidden_size' must be a positive integer"),
        (tiny_llama_config(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        ({k: v for k, v in tiny_llama_config().items() if k != "model_type"}, "'model_type'"),
        (tiny_llama_config(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (tiny_llama_config(model_type="mixtral"), "'num_local_experts'"),
    ],
)
def test_bad_configs_raise_one_line_errors_naming_the_field(config, message):
    with pytest.raises(PlanError, match=message) as info:
        arch_from_hf_dict(config, "bad")
    assert "\n" not in str(info.value)


def test_deepseek_config_missing_a_field_is_named():
    config = ModelConfig.from_preset("deepseek-v3").to_dict()
    del config["kv_lora_rank"]
    with pytest.raises(PlanError, match="'kv_lora_rank'"):
        arch_from_hf_dict(config, "v3-broken")


def test_unknown_preset_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(PlanError, match="unknown model preset 'nope'"):
        load_arch("nope")
    with pytest.raises(PlanError, match="cannot read model config"):
        load_arch(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_arch(str(bad))
