"""Logits parity with transformers' DeepSeek-V3/V2 on the same weights, in both directions (fp32, rel. err ≤ 1e-4).

transformers is the independent implementation: its MLA rotates RoPE in its own layout, fuses the experts on
load, routes with its own top-k code, and runs MTP through its own ``MtpModel``.
"""

from __future__ import annotations

import pytest
import torch
import transformers  # noqa: F401  the peer is a dev dependency: without it this module errors, never skips

from latentmoe.hf import load_pretrained, save_pretrained
from tests.hf.helpers import hf_logits, hf_v2, hf_v3, our_logits, ours, rel_err, token_ids

TOLERANCE = 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="q_lora-n_group4"),
        pytest.param({"q_lora_rank": None, "num_hidden_layers": 4, "first_k_dense_replace": 2}, id="no_q_lora-2dense"),
        pytest.param({"n_group": 2, "topk_group": 1, "attention_bias": True}, id="n_group2-attention_bias"),
        pytest.param(
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 32}},
            id="yarn",
        ),
        pytest.param({"rope_interleave": False}, id="rope_halves"),
    ],
)
def test_transformers_v3_checkpoint_loads_with_matching_logits(tmp_path, overrides):
    hf = hf_v3(**overrides)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ids = token_ids(hf.config.vocab_size, length=40)
    assert rel_err(our_logits(model, ids), hf_logits(hf, ids)) <= TOLERANCE
    assert len(model.mtp) == 0  # transformers' save_pretrained drops MTP weights


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"topk_method": "greedy", "n_group": None, "topk_group": None}, id="greedy"),
        pytest.param({"topk_method": "greedy", "n_group": 4, "topk_group": 2}, id="greedy-ignores-groups"),
        pytest.param({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, id="group_limited"),
        pytest.param(
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                                 "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                                 "original_max_position_embeddings": 4}},
            id="yarn-mscale0.707",
        ),
    ],
)
def test_transformers_v2_softmax_checkpoint_loads_with_matching_logits(tmp_path, overrides):
    hf = hf_v2(**overrides)
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.scoring_func == "softmax" and model.config.q_lora_rank is None
    ids = token_ids(hf.config.vocab_size)
    assert rel_err(our_logits(model, ids), hf_logits(hf, ids)) <= TOLERANCE


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_our_model_loads_in_transformers_with_matching_logits(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    model = ours(preset)
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = token_ids(model.config.vocab_size)
    assert rel_err(hf_logits(hf, ids), our_logits(model, ids)) <= TOLERANCE


def test_our_q_proj_model_with_several_dense_layers_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ours("tiny", q_lora_rank=None, num_hidden_layers=4, first_k_dense_replace=2, n_group=2, topk_group=1)
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = token_ids(model.config.vocab_size)
    assert rel_err(hf_logits(hf, ids), our_logits(model, ids)) <= TOLERANCE


def test_saved_mtp_module_matches_transformers_mtp_model(tmp_path):
    """Our MTP weights, saved as model.layers.{L}.*, drive transformers' own MTP module to the same logits."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    model = ours("tiny")
    save_pretrained(model, tmp_path)
    L = model.config.num_hidden_layers

    class WithMtpAtLayerL(DeepseekV3ForCausalLM):  # the stock class only looks for MTP weights at layer 61
        _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]

    hf = WithMtpAtLayerL.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = token_ids(model.config.vocab_size, batch=1, length=16)
    S = ids.shape[1]
    with torch.no_grad():
        out = model(ids)
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1]
        # depth 1 at position i combines h_i with the embedding of token i+1 and predicts token i+2
        h = mtp.forward_layer(0, hidden[:, : S - 1], torch.arange(S - 1)[None], None, input_ids=ids[:, 1:])
        logits = mtp._project_to_logits(h)
    assert rel_err(logits, out.mtp_logits[0][:, : S - 1]) <= TOLERANCE
