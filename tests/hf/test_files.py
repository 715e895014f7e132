"""Save/load round trips (MTP bit-exact, sharded, bf16, first N layers) and one-line errors for bad directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import latentmoe.hf.load as hf_load
from latentmoe.hf import HFCheckpointError, inspect_checkpoint, load_pretrained, save_pretrained
from tests.hf.helpers import all_tensors, our_logits, ours, token_ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Our tiny model (with its MTP module) saved once, unsharded."""
    model = ours("tiny")
    path = tmp_path_factory.mktemp("hf") / "tiny"
    save_pretrained(model, path)
    return model, path


def test_round_trip_is_bit_exact_including_mtp_and_router_biases(saved):
    model, path = saved
    loaded = load_pretrained(path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and any(k.startswith("mtp.0.block.mlp.experts") for k in got)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_mtp_module_is_written_as_layer_L_with_a_copy_of_the_head(saved):
    model, path = saved
    L = model.config.num_hidden_layers
    files = all_tensors(path)
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "self_attn.kv_b_proj.weight", "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{name}" in files, name
    assert torch.equal(files[f"model.layers.{L}.shared_head.head.weight"], files["lm_head.weight"])
    expert = files[f"model.layers.{L}.mlp.experts.3.up_proj.weight"]
    assert torch.equal(expert, model.mtp[0].block.mlp.experts.up_proj[3])
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert {k: config[k] for k in ("scoring_func", "topk_method", "n_group", "topk_group")} == {
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2}
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == model.config.eos_token_id


def test_sharded_save_loads_in_both_systems(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ours("tiny")
    result = save_pretrained(model, tmp_path / "s", max_shard_size="300KB")
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == result.total_bytes
    loaded = load_pretrained(tmp_path / "s")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    ids = token_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, our_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_bf16_save_and_load_keep_router_bias_fp32(tmp_path):
    model = ours("tiny")
    save_pretrained(model, tmp_path / "b", dtype=torch.bfloat16)
    info = inspect_checkpoint(tmp_path / "b")
    assert info.stored_dtype == torch.bfloat16
    assert info.headers["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    loaded = load_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert torch.isfinite(our_logits(loaded, token_ids(512))).all()


def test_first_n_layers_load_alone(saved):
    model, path = saved
    part = load_pretrained(path, num_layers=1)
    assert len(part.model.layers) == 1 and len(part.mtp) == 0
    for key, value in part.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_tied_embeddings_round_trip(tmp_path):
    model = ours("tiny", tie_word_embeddings=True, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path / "t")
    assert "lm_head.weight" not in all_tensors(tmp_path / "t")
    loaded = load_pretrained(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, saved):
    model, _ = saved
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(HFCheckpointError, match=r"holds files latentmoe did not write \(notes\.txt\)"):
        save_pretrained(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- bad input


def rewrite(path, *, drop=(), add=None, replace=None):
    """Rewrite ``path/model.safetensors`` without ``drop``, plus ``add``, with ``replace``'d tensors."""
    tensors = {k: v for k, v in all_tensors(path).items() if k not in drop}
    tensors.update(add or {})
    tensors.update(replace or {})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    _, path = saved
    shutil.copytree(path, tmp_path / "c")
    return tmp_path / "c"


@pytest.fixture
def no_tensor_data(monkeypatch):
    """Header problems must be found before any tensor data is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(hf_load, "iter_windows", refuse)


O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: rewrite(p, drop=[O_PROJ]), rf"c/model\.safetensors: tensor {O_PROJ} is missing"),
        (lambda p: rewrite(p, add={"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
         r"c/model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.extra\.weight$"),
        (lambda p: rewrite(p, add={"model.layers.9.input_layernorm.weight": torch.zeros(64)}),
         r"unexpected tensor model\.layers\.9\.input_layernorm\.weight$"),
        (lambda p: rewrite(p, replace={O_PROJ: torch.zeros(64, 32)}),
         rf"c/model\.safetensors: tensor {O_PROJ} has shape \[64, 32\], expected \[64, 64\]$"),
        (lambda p: rewrite(p, replace={O_PROJ: torch.zeros(64, 64, dtype=torch.int32)}),
         rf"c/model\.safetensors: tensor {O_PROJ} has dtype I32, expected one of F64, F32, F16, BF16"),
        (lambda p: rewrite(p, replace={O_PROJ: torch.zeros(64, 64, dtype=torch.float8_e4m3fn)}),
         rf"tensor {O_PROJ} is F8_E4M3 but config\.json has no quantization_config"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
         r"c/model\.safetensors: not a readable safetensors file \(.*incomplete"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64),
         r"c/model\.safetensors: not a readable safetensors file"),
        (lambda p: (p / "config.json").write_text(json.dumps(
            {**json.loads((p / "config.json").read_text()), "model_type": "llama"})),
         r"c/config\.json: model_type 'llama' is not supported"),
        (lambda p: (p / "config.json").write_text("{not json"), r"c/config\.json: not valid JSON"),
        (lambda p: (p / "config.json").unlink(), r"c/config\.json: no such file"),
        (lambda p: (p / "model.safetensors").unlink(), r"c: no model\.safetensors or model\.safetensors\.index\.json"),
    ],
    ids=["missing-tensor", "unexpected-tensor", "unexpected-layer", "shape", "int-dtype", "fp8-no-config",
         "truncated", "garbage", "model_type", "config-json", "no-config", "no-weights"],
)
def test_bad_checkpoint_gives_one_line_error_naming_file_and_tensor(copy_of, no_tensor_data, corrupt, message):
    corrupt(copy_of)
    with pytest.raises(HFCheckpointError, match=message) as info:
        load_pretrained(copy_of)
    assert "\n" not in str(info.value)


@pytest.fixture
def sharded(tmp_path):
    save_pretrained(ours("tiny"), tmp_path / "s", max_shard_size="300KB")
    return tmp_path / "s"


def test_missing_shard_is_named(sharded, no_tensor_data):
    (sharded / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match=r"s/model-00002-of-00004\.safetensors: missing shard \(listed in "
                       r"model\.safetensors\.index\.json for tensor model\."):
        load_pretrained(sharded)


def test_index_pointing_at_the_wrong_shard_is_named(sharded, no_tensor_data):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=r"s/model-00002-of-00004\.safetensors: unexpected tensor model\.norm"
                       r"\.weight \(the index puts it in model-00001-of-00004\.safetensors\)"):
        load_pretrained(sharded)


def test_mtp_head_copy_that_differs_from_the_head_is_an_error(copy_of):
    L = 2
    key = f"model.layers.{L}.shared_head.head.weight"
    rewrite(copy_of, replace={key: all_tensors(copy_of)[key] + 1})
    with pytest.raises(HFCheckpointError, match=rf"c/model\.safetensors: tensor {key} differs from lm_head\.weight"):
        load_pretrained(copy_of)


def test_official_mtp_embedding_copy_is_accepted(copy_of):
    rewrite(copy_of, add={"model.layers.2.embed_tokens.weight": all_tensors(copy_of)["model.embed_tokens.weight"]})
    assert len(load_pretrained(copy_of).mtp) == 1


def test_declared_mtp_layer_without_weights_loads_without_mtp(copy_of):
    rewrite(copy_of, drop=[k for k in all_tensors(copy_of) if k.startswith("model.layers.2.")])
    model = load_pretrained(copy_of)
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0


def test_partial_mtp_layer_is_a_missing_tensor(copy_of):
    rewrite(copy_of, drop=["model.layers.2.eh_proj.weight"])
    with pytest.raises(HFCheckpointError, match=r"tensor model\.layers\.2\.eh_proj\.weight is missing \(needed for "
                       r"mtp\.0\.eh_proj\.weight\)"):
        load_pretrained(copy_of)
