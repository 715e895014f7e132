"""MTP module pieces against the TR's equations (eq. 21-25) and their edge cases (gaps found by make mutants)."""

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.model.mtp import causal_lm_loss, next_token_loss, shift_tokens_left


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_mtp_combine_is_the_projection_of_both_normed_inputs_with_the_configs_eps():
    """h' = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (TR eq. 21, checkpoint order), float64, eps = 0.5 so
    that an eps other than the config's shows; the MTP logits use the head after shared_head.norm (same eps)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny").replace(rms_norm_eps=0.5)
    model = CausalLM(config).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=0.5, std=0.3)
    mtp = model.mtp[0]
    assert "eh_proj.bias" not in mtp.state_dict()  # the checkpoint layout has eh_proj.weight only
    h = torch.randn(1, 5, config.hidden_size, dtype=torch.float64)
    e = torch.randn(1, 5, config.hidden_size, dtype=torch.float64)
    want = torch.cat([rms(e, mtp.enorm.weight, 0.5), rms(h, mtp.hnorm.weight, 0.5)], -1) @ mtp.eh_proj.weight.T
    torch.testing.assert_close(mtp.combine(h, e), want, rtol=1e-10, atol=1e-12)
    x = torch.randn(3, config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(mtp.shared_head.norm(x), rms(x, mtp.shared_head.norm.weight, 0.5), rtol=1e-10, atol=0)


def test_shift_pads_with_the_given_id():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert shift_tokens_left(ids, 2, pad_id=-7).tolist() == [[3, 4, -7, -7]]
    assert shift_tokens_left(ids, 0).tolist() == [[1, 2, 3, 4]]


def test_a_sequence_without_a_target_that_far_ahead_is_an_error():
    logits = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match="no target 3 positions ahead"):
        next_token_loss(logits, torch.tensor([[1, 2, 3]]), ahead=3)
    assert next_token_loss(logits, torch.tensor([[1, 2, 3]]), ahead=2).item() == pytest.approx(2.0794415, rel=1e-6)
    # the default is the main head's target, one token ahead: position i's logits score t_{i+1}
    right = torch.nn.functional.one_hot(torch.tensor([[2, 3, 0]]), 8).float() * 50
    assert next_token_loss(right, torch.tensor([[1, 2, 3]])).item() < 1e-6


def test_without_mtp_modules_the_total_loss_is_the_main_loss():
    class Out:
        logits = torch.zeros(1, 4, 8)
        mtp_logits = []

    loss = causal_lm_loss(Out, torch.tensor([[1, 2, 3, 4]]), mtp_lambda=0.3)
    assert loss.mtp == [] and loss.total.item() == loss.main.item() == pytest.approx(2.0794415, rel=1e-6)  # ln 8


def test_the_default_mtp_weight_is_the_trs_lambda_0_3():
    class Out:  # main head certain and right (loss 0), one MTP depth uniform (ln 8)
        logits = torch.nn.functional.one_hot(torch.tensor([[2, 3, 4, 0]]), 8).float() * 50
        mtp_logits = [torch.zeros(1, 4, 8)]

    assert causal_lm_loss(Out, torch.tensor([[1, 2, 3, 4]])).total.item() == pytest.approx(0.3 * 2.0794415, rel=1e-5)
