"""CausalLM end to end: causality of main and MTP heads, MTP label alignment, parameter count."""

import math

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mtp import causal_lm_loss, next_token_loss, shift_tokens_left


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.from_preset("tiny")).eval()


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_model()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, 16))
    j = 9
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # Not bit-equal: the changed token moves rows between expert matmuls, so BLAS blocking differs (~1e-7).
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-5)
    assert not torch.allclose(a.logits[:, j:], b.logits[:, j:])
    # MTP depth k at position i reads tokens up to i + k: positions < j - k are unaffected
    for k, (ma, mb) in enumerate(zip(a.mtp_logits, b.mtp_logits, strict=True), 1):
        torch.testing.assert_close(ma[:, : j - k], mb[:, : j - k], rtol=0, atol=1e-5)
        assert not torch.allclose(ma[:, j - k], mb[:, j - k])


def test_mtp_targets_are_tokens_k_plus_one_ahead():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    assert shift_tokens_left(ids, 1).tolist() == [[11, 12, 13, 14, 15, 0]]
    # Make logits that put all mass on a token id; loss is ~0 only for the right alignment.
    V = 20

    def onehot_logits(targets):
        return torch.nn.functional.one_hot(targets, V).float() * 100.0

    # depth 1 at position i must predict t[i+2]: 12, 13, 14, 15 for i = 0..3
    right = onehot_logits(torch.tensor([[12, 13, 14, 15, 0, 0]]))
    wrong = onehot_logits(torch.tensor([[11, 12, 13, 14, 15, 0]]))
    assert next_token_loss(right, ids, ahead=2).item() < 1e-6
    assert next_token_loss(wrong, ids, ahead=2).item() > 10

    class Out:
        logits = onehot_logits(torch.tensor([[11, 12, 13, 14, 15, 0]]))
        mtp_logits = [right]

    loss = causal_lm_loss(Out, ids, mtp_lambda=0.3)
    assert loss.main.item() < 1e-6 and loss.mtp[0].item() < 1e-6


def test_total_loss_is_main_plus_lambda_over_depth_times_mtp():
    model = tiny_model(1).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(ids)
    loss = causal_lm_loss(out, ids, mtp_lambda=0.3)
    torch.testing.assert_close(loss.total, loss.main + 0.3 * loss.mtp[0])
    assert out.expert_load.shape == (len(model.moe_layers()), model.config.n_routed_experts)
    # every MoE layer (main + MTP block) routes B*S tokens to top-k experts each
    assert torch.all(out.expert_load.sum(1) == 2 * 12 * model.config.num_experts_per_tok)


def test_deepseek_v3_preset_has_671b_parameters_on_meta_device():
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_preset("deepseek-v3"))
    # paper.md §1.1/§15: 671,026,419,200 from the config. That figure includes the 58 MoE layers'
    # e_score_correction_bias vectors (58 x 256 = 14,848), which are checkpoint tensors but buffers here.
    assert model.num_parameters(include_mtp=False, include_router_bias=True) == 671_026_419_200
    assert model.num_parameters(include_mtp=False) == 671_026_419_200 - 58 * 256


def test_router_bias_update_moves_each_layer_bias():
    model = tiny_model(2).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(ids)
    model.update_router_biases(out.expert_load, gamma=0.01)
    for moe, load in zip(model.moe_layers(), out.expert_load, strict=True):
        expected = -0.01 * torch.sign(load - load.mean())
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)


def cross_entropy_reference(logits_BSV, ids_BS, ahead):
    """Mean over positions i with a target of −log softmax(logits_i)[t_{i+ahead}], float64 loops."""
    lp = torch.log_softmax(logits_BSV.detach().double(), dim=-1)
    B, S = ids_BS.shape
    terms = [-lp[b, i, ids_BS[b, i + ahead]] for b in range(B) for i in range(S - ahead)]
    return float(sum(terms) / len(terms))


def test_mtp_losses_are_weighted_lambda_over_depth_with_two_modules():
    """TR eq. 25 with D = 2: L = L_main + λ/D (L_MTP^1 + L_MTP^2), each term a CE against tokens 1, 2, 3 ahead."""
    V = 16
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])

    class Out:  # main head uniform (ln V), depth 1 uniform too, depth 2 certain and right (0)
        logits = torch.zeros(1, 8, V)
        mtp_logits = [torch.zeros(1, 8, V), torch.nn.functional.one_hot(shift_tokens_left(ids, 3), V).float() * 50]

    loss = causal_lm_loss(Out, ids, mtp_lambda=0.3)
    assert loss.total.item() == pytest.approx(math.log(V) + 0.3 / 2 * (math.log(V) + 0.0), rel=1e-6)

    torch.manual_seed(3)
    model = CausalLM(ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=2)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(ids)
    assert len(out.mtp_logits) == 2
    main = cross_entropy_reference(out.logits, ids, 1)
    mtp = [cross_entropy_reference(m, ids, k + 1) for k, m in enumerate(out.mtp_logits, 1)]
    loss = causal_lm_loss(out, ids, mtp_lambda=0.3)
    assert loss.main.item() == pytest.approx(main, rel=1e-5)
    assert [x.item() for x in loss.mtp] == pytest.approx(mtp, rel=1e-5)
    assert loss.total.item() == pytest.approx(main + 0.3 / 2 * sum(mtp), rel=1e-5)
