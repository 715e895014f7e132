"""``latentmoe convert RUN OUT.gguf --to gguf``: the file read back with gguf's own GGUFReader, checked against our
checkpoint (expected names, shapes and values written out here from the deepseek2 layout, not taken from the
exporter), and — when llama-cpp-python is importable — llama.cpp's logits on the file against ours."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from latentmoe.checkpoint import save_checkpoint
from latentmoe.cli import main
from latentmoe.data.tokenizer import train_tokenizer
from tests.hf.helpers import ours, rel_err

gguf = pytest.importorskip("gguf", reason="gguf is a dev dependency (pyproject [dev]); pip install gguf==0.19.0")

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20
# distinct head sizes, so a transposed or mis-split MLA tensor cannot have the right shape by accident
SHAPES = dict(vocab_size=300, qk_nope_head_dim=12, v_head_dim=20, kv_lora_rank=16, qk_rope_head_dim=8)
GGML = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = ours("tiny", **SHAPES)
    save_checkpoint(root, 3, model, None, {}, model.config)
    tokenizer = train_tokenizer(TEXT, 300)
    tokenizer.save(str(root / "tokenizer.json"))
    return root, model, tokenizer


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def expected_tensors(model) -> dict[str, torch.Tensor]:
    """The deepseek2 tensors of our model in torch layout, written out by hand (llama.cpp's names)."""
    c, sd = model.config, model.state_dict()
    H, N, V, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        attn = {"attn_norm": "input_layernorm", "attn_q_a": "self_attn.q_a_proj",
                "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
                "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
                "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm"}
        for g, ours_name in attn.items():
            out[f"{b}{g}.weight"] = sd[f"{p}{ours_name}.weight"]
        kv_b = sd[f"{p}self_attn.kv_b_proj.weight"]  # rows: head h holds [N nope rows, V value rows]
        rows = N + V
        out[f"{b}attn_k_b.weight"] = torch.stack([kv_b[h * rows: h * rows + N].T for h in range(H)])  # [H, R, N]
        out[f"{b}attn_v_b.weight"] = torch.stack([kv_b[h * rows + N: (h + 1) * rows] for h in range(H)])  # [H, V, R]
        assert out[f"{b}attn_k_b.weight"].shape == (H, R, N) and out[f"{b}attn_v_b.weight"].shape == (H, V, R)
        if i < c.first_k_dense_replace:
            for g in ("gate", "up", "down"):
                out[f"{b}ffn_{g}.weight"] = sd[f"{p}mlp.{g}_proj.weight"]
        else:
            out[f"{b}ffn_gate_inp.weight"] = sd[f"{p}mlp.gate.weight"]
            out[f"{b}exp_probs_b.bias"] = sd[f"{p}mlp.gate.e_score_correction_bias"]
            for g in ("gate", "up", "down"):
                out[f"{b}ffn_{g}_exps.weight"] = sd[f"{p}mlp.experts.{g}_proj"]
                out[f"{b}ffn_{g}_shexp.weight"] = sd[f"{p}mlp.shared_experts.{g}_proj.weight"]
    return out


def read_tensor(t) -> torch.Tensor:
    """A GGUFReader tensor as torch, in torch layout (GGUF lists dims fastest-first)."""
    shape = [int(d) for d in reversed(t.shape)]
    if t.tensor_type.name == "BF16":
        return torch.from_numpy(np.array(t.data).view(np.int16).reshape(shape)).view(torch.bfloat16)
    return torch.from_numpy(np.array(t.data).reshape(shape))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_gguf_file_holds_our_tensors_metadata_and_tokenizer(run_dir, tmp_path, dtype, capsys):
    root, model, tokenizer = run_dir
    out = tmp_path / "model.gguf"
    assert main(["convert", str(root), str(out), "--to", "gguf", "--dtype", dtype]) == 0
    assert "MTP modules not written" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    expected = expected_tensors(model)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)  # every tensor, no MTP, nothing extra
    for name, want in expected.items():
        t = tensors[name]
        small = want.dim() <= 1 or "ffn_gate_inp" in name  # norms, router bias and router weight stay f32
        assert t.tensor_type.name == ("F32" if small else GGML[dtype]), name
        assert [int(d) for d in t.shape] == list(reversed(want.shape)), name
        got = read_tensor(t)
        assert torch.equal(got, want.to(torch.float32 if small else TORCH[dtype])), name

    c = model.config
    meta = fields(reader)
    a = "deepseek2."
    assert meta["general.architecture"] == "deepseek2"
    want_meta = {
        a + "block_count": c.num_hidden_layers, a + "context_length": c.max_position_embeddings,
        a + "embedding_length": c.hidden_size, a + "feed_forward_length": c.intermediate_size,
        a + "attention.head_count": c.num_attention_heads, a + "attention.head_count_kv": 1,
        a + "attention.q_lora_rank": c.q_lora_rank, a + "attention.kv_lora_rank": c.kv_lora_rank,
        a + "attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim, a + "attention.value_length": c.kv_lora_rank,
        a + "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        a + "attention.value_length_mla": c.v_head_dim, a + "rope.dimension_count": c.qk_rope_head_dim,
        a + "leading_dense_block_count": c.first_k_dense_replace, a + "expert_count": c.n_routed_experts,
        a + "expert_used_count": c.num_experts_per_tok, a + "expert_shared_count": c.n_shared_experts,
        a + "expert_feed_forward_length": c.moe_intermediate_size, a + "expert_weights_norm": True,
        a + "expert_gating_func": 2,  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
        a + "expert_group_count": c.n_group, a + "expert_group_used_count": c.topk_group,
        a + "vocab_size": c.vocab_size, "general.file_type": {"f32": 0, "f16": 1, "bf16": 32}[dtype],
    }
    for key, value in want_meta.items():
        assert meta[key] == value, key
    for key, value in {a + "expert_weights_scale": c.routed_scaling_factor, a + "rope.freq_base": c.rope_theta,
                       a + "attention.layer_norm_rms_epsilon": c.rms_norm_eps}.items():
        assert meta[key] == pytest.approx(value, rel=1e-6), key

    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size
    for i in range(tokenizer.get_vocab_size()):
        assert tokens[i] == tokenizer.id_to_token(i)
    assert types[:3] == [3, 3, 3] and set(types[3:tokenizer.get_vocab_size()]) == {1}  # control, then normal
    assert len(meta["tokenizer.ggml.merges"]) == tokenizer.get_vocab_size() - 3 - 256  # one merge per learned token
    assert meta["tokenizer.ggml.bos_token_id"] == c.bos_token_id == tokenizer.token_to_id("<|bos|>")
    assert meta["tokenizer.ggml.eos_token_id"] == c.eos_token_id == tokenizer.token_to_id("<|eos|>")
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert "{{ bos_token }}" in meta["tokenizer.chat_template"]


def test_gguf_export_refuses_a_file_we_did_not_write_and_replaces_its_own(run_dir, tmp_path, capsys):
    root, _, _ = run_dir
    mine = tmp_path / "mine.gguf"
    assert main(["convert", str(root), str(mine), "--to", "gguf"]) == 0
    assert main(["convert", str(root), str(mine), "--to", "gguf", "--dtype", "f16"]) == 0  # ours: replaced
    assert gguf.GGUFReader(str(mine)).get_field("general.file_type").contents() == 1
    foreign = tmp_path / "notes.gguf"
    foreign.write_bytes(b"my own file")
    capsys.readouterr()
    assert main(["convert", str(root), str(foreign), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was not written by latentmoe" in err and "--overwrite" in err and "\n" not in err
    assert foreign.read_bytes() == b"my own file"
    assert main(["convert", str(root), str(foreign), "--to", "gguf", "--overwrite"]) == 0
    assert gguf.GGUFReader(str(foreign)).get_field("general.architecture").contents() == "deepseek2"
    assert main(["convert", str(root), str(tmp_path / "x.bin"), "--to", "gguf"]) == 2
    assert "NAME.gguf" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".latentmoe-tmp")] == []


def test_gguf_export_refuses_routing_llama_cpp_computes_differently(tmp_path, capsys):
    model = ours("tiny", vocab_size=300, topk_method="group_limited_greedy")
    save_checkpoint(tmp_path / "run", 1, model, None, {}, model.config)
    train_tokenizer(TEXT, 300).save(str(tmp_path / "run" / "tokenizer.json"))
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "group_limited_greedy" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
LLAMA_CPP_REASON = ("llama-cpp-python is not installed (optional: build it from source, see docs/hf.md); "
                    "the GGUF file is still checked against gguf's reader above")
LOGITS_TOLERANCE = 1e-4
GGML_TYPE_F32 = 0  # ggml_type of float32 (llama.cpp type_k / type_v)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.skipif(not LLAMA_CPP, reason=LLAMA_CPP_REASON)
@pytest.mark.parametrize("variant", [{}, {"q_lora_rank": 0}, {"rope_scaling": YARN},
                                     {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                                      "routed_scaling_factor": 1.0}], ids=["v3", "no_q_lora", "yarn", "softmax"])
def test_llama_cpp_logits_on_our_gguf_equal_ours(tmp_path, variant):
    from llama_cpp import Llama

    model = ours("tiny", **SHAPES, **variant)
    save_checkpoint(tmp_path / "run", 1, model, None, {}, model.config)
    tokenizer = train_tokenizer(TEXT, 300)
    tokenizer.save(str(tmp_path / "run" / "tokenizer.json"))
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tmp_path / "run"), str(out), "--to", "gguf", "--dtype", "f32"]) == 0
    ids = [model.config.bos_token_id, *tokenizer.encode("To be, or not to be, that is the question").ids]
    # f32 KV cache (llama.cpp defaults to f16 there): the comparison is of the same function in fp32
    llm = Llama(model_path=str(out), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        mine = model(torch.tensor([ids])).logits[0]
    assert rel_err(theirs, mine) <= LOGITS_TOLERANCE


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_hugging_face_directory_exports_with_its_own_prompt_rule(tmp_path, add_bos, capsys):
    """transformers writes add_bos_token into tokenizer.json's post-processor; the GGUF says the same."""
    from transformers import PreTrainedTokenizerFast

    from tests.hf.helpers import hf_v3

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXT, 300), bos_token="<|bos|>",
                                        eos_token="<|eos|>", add_bos_token=add_bos, add_eos_token=False)
    hf_v3(vocab_size=320).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 0
    meta = fields(gguf.GGUFReader(str(tmp_path / "m.gguf")))
    assert meta["tokenizer.ggml.add_bos_token"] is (tokenizer("x").input_ids[0] == tokenizer.bos_token_id) is add_bos
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert len(meta["tokenizer.ggml.tokens"]) == 320
