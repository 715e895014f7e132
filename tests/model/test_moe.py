"""DeepSeekMoE routing, balancing and grouped experts against hand-made cases and naive loops."""

import pytest
import torch

from latentmoe import ModelConfig
from latentmoe.model.moe import Experts, MoE, Router, route, sequence_balance_loss, update_bias
from tests.reference.moe import experts_reference, route_reference, sequence_balance_loss_reference, swiglu_expert

V3 = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)


def test_v3_router_selects_within_topk_groups_and_weights_sum_to_scale():
    torch.manual_seed(0)
    logits = torch.randn(64, 256) * 3
    bias = torch.randn(256) * 0.1
    r = route(logits, bias, **V3)
    groups = r.topk_idx_TK // 32
    assert all(len(set(g.tolist())) <= 4 for g in groups)  # paper check §16.13: at most M=4 nodes
    assert all(len(set(t.tolist())) == 8 for t in r.topk_idx_TK)
    torch.testing.assert_close(r.topk_weight_TK.sum(-1), torch.full((64,), 2.5))
    # weights are the un-biased sigmoid affinities of the chosen experts, renormalised, x2.5
    s = logits.sigmoid().gather(1, r.topk_idx_TK)
    torch.testing.assert_close(r.topk_weight_TK, s / s.sum(-1, keepdim=True) * 2.5)


def test_group_score_is_sum_of_top2_biased_scores_by_hand():
    # 4 experts in 2 groups of 2, keep 1 group, pick 1 expert.
    # sigmoid(0)=0.5. Group A = experts 0,1 ; group B = 2,3.
    logits = torch.tensor([[4.0, -4.0, 1.0, 1.0]])
    # top-2 sums: A = s(4)+s(-4) = 1.0 ; B = 2*s(1) = 1.462 -> group B wins although expert 0 is the best
    r = route(logits, None, top_k=1, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    assert r.topk_idx_TK.item() in (2, 3)
    # with max-per-group scoring (V2's group_limited_greedy) group A wins
    r2 = route(logits, None, top_k=1, n_group=2, topk_group=1, routed_scaling_factor=1.0, group_score="max")
    assert r2.topk_idx_TK.item() == 0


def test_masked_groups_never_win_even_when_all_scores_negative():
    # softmax/sigmoid scores are positive, but biased selection scores can all be negative:
    # masking with 0 would let a masked group win; -inf must not.
    logits = torch.tensor([[0.0, 0.0, -1.0, -1.0, -1.0, -1.0]])
    bias = torch.tensor([-5.0, -5.0, -10.0, -10.0, -10.0, -10.0])
    r = route(logits, bias, top_k=2, n_group=3, topk_group=1, routed_scaling_factor=1.0)
    assert sorted(r.topk_idx_TK[0].tolist()) == [0, 1]


def test_bias_changes_selection_but_not_weight_formula():
    torch.manual_seed(1)
    logits = torch.randn(32, 16)
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    plain = route(logits, torch.zeros(16), **kw)
    bias = torch.zeros(16)
    bias[plain.topk_idx_TK[0, 0]] = -10.0  # push token 0's favourite expert out
    biased = route(logits, bias, **kw)
    assert not torch.equal(plain.topk_idx_TK, biased.topk_idx_TK)
    s = logits.sigmoid().gather(1, biased.topk_idx_TK)
    torch.testing.assert_close(biased.topk_weight_TK, s / s.sum(-1, keepdim=True) * 2.5)


def test_zero_affinities_give_no_nan():
    logits = torch.full((3, 8), -1e4)  # sigmoid underflows to exactly 0
    r = route(logits, None, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    assert torch.isfinite(r.topk_weight_TK).all()
    sm = route(torch.zeros(3, 8), None, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0,
               scoring_func="softmax", norm_topk_prob=False)
    torch.testing.assert_close(sm.topk_weight_TK, torch.full((3, 2), 1 / 8))


def test_bias_update_golden_example():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    torch.testing.assert_close(update_bias(bias, load, 0.001), torch.tensor([-0.001, 0.001, 0.001, 0.001]))


def test_bias_update_drives_skewed_load_toward_balance():
    torch.manual_seed(2)
    T, E = 512, 16
    # a strong per-expert skew: experts 0..3 are favoured by every token
    logits = torch.randn(T, E) * 0.5
    logits[:, :4] += 2.0
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    bias = torch.zeros(E)

    def imbalance(b):
        load = torch.bincount(route(logits, b, **kw).topk_idx_TK.flatten(), minlength=E).float()
        return (load.max() / load.mean()).item(), load

    start, _ = imbalance(bias)
    for _ in range(300):
        _, load = imbalance(bias)
        bias = update_bias(bias, load, 0.01)
    end, _ = imbalance(bias)
    assert start > 3.0  # the four favoured experts take nearly everything
    assert end < 1.5


def test_grouped_experts_equal_per_token_loop():
    torch.manual_seed(3)
    experts = Experts(6, 16, 24)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 16, dtype=torch.float64)
    experts = experts.double()
    idx = torch.randint(0, 6, (40, 3))
    idx[:, 1] = (idx[:, 0] + 1) % 6
    idx[:, 2] = (idx[:, 0] + 2) % 6
    w = torch.rand(40, 3, dtype=torch.float64)
    ref = experts_reference(experts.gate_proj, experts.up_proj, experts.down_proj, x, idx, w)
    torch.testing.assert_close(experts(x, idx, w), ref, rtol=1e-10, atol=1e-12)


def test_moe_layer_reports_load_and_grads_flow_to_chosen_experts_only():
    torch.manual_seed(4)
    config = ModelConfig.from_preset("tiny")
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 3, config.hidden_size)
    out = moe(x)
    assert out.load_E.sum().item() == 3 * config.num_experts_per_tok
    out.hidden_BSD.sum().backward()
    used = out.load_E > 0
    grad_norm = moe.experts.gate_proj.grad.flatten(1).norm(dim=1)
    assert torch.all(grad_norm[used] > 0) and torch.all(grad_norm[~used] == 0)
    assert moe.gate.e_score_correction_bias.grad is None and not moe.gate.e_score_correction_bias.requires_grad


def test_sequence_balance_loss_by_hand():
    """TR eq. 17-20 on one sequence of T=2 tokens, E=N_r=4 experts, K_r=2.

    Token 0 affinities (1, 1, 1, 1) choose {0, 1}; token 1 affinities (3, 1, 0, 0) choose {0, 1}.
    s' = s / sum: token 0 (1/4, 1/4, 1/4, 1/4), token 1 (3/4, 1/4, 0, 0) -> P = (1/2, 1/4, 1/8, 1/8).
    f_i = N_r / (K_r T) * count_i = 4/4 * (2, 2, 0, 0) = (2, 2, 0, 0).  L = 2 * 1/2 + 2 * 1/4 = 1.5.
    A second sequence whose load is perfectly balanced gives f = (1, 1, 1, 1), L = sum P = 1; the batch
    value is the mean over sequences, (1.5 + 1) / 2 = 1.25.
    """
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]],
                           [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]])
    topk = torch.tensor([[[0, 1], [1, 0]], [[3, 2], [0, 1]]])
    assert sequence_balance_loss(scores[:1], topk[:1], 4).item() == pytest.approx(1.5, abs=1e-6)
    assert sequence_balance_loss(scores[1:], topk[1:], 4).item() == pytest.approx(1.0, abs=1e-6)
    assert sequence_balance_loss(scores, topk, 4).item() == pytest.approx(1.25, abs=1e-6)


def test_moe_layer_balance_loss_is_eq_17_to_20_over_each_sequence():
    """The MoE layer in training mode reports L_Bal of its own routing, per sequence then averaged
    (float64 loops); in eval mode it reports 0; the loss has a gradient into the router weight only via P."""
    torch.manual_seed(5)
    config = ModelConfig.from_preset("tiny")
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, S = 3, 7
    x = torch.randn(B, S, config.hidden_size)
    out = moe(x)
    routing = moe.gate(x.reshape(B * S, -1))
    E, K = config.n_routed_experts, config.num_experts_per_tok
    expected = sequence_balance_loss_reference(
        routing.scores_TE.view(B, S, E), routing.topk_idx_TK.view(B, S, K), E
    )
    assert out.balance_loss.item() == pytest.approx(expected, rel=1e-6)
    # the batch value is not the loss of the batch taken as one long sequence
    as_one = sequence_balance_loss_reference(
        routing.scores_TE.view(1, B * S, E), routing.topk_idx_TK.view(1, B * S, K), E
    )
    assert abs(as_one - expected) > 1e-3
    out.balance_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_proj.grad is None  # f_i counts choices: no gradient reaches the experts
    assert moe.eval()(x).balance_loss.item() == 0.0


ROUTER_CONFIGS = {
    "v3-noaux_tc": dict(),
    "v3-unnormalised": dict(norm_topk_prob=False),
    "v2-greedy-softmax": dict(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, topk_group=3),
    "v2-group_limited-softmax": dict(topk_method="group_limited_greedy", scoring_func="softmax"),
}


@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_router_gates_each_config_as_the_papers_describe(name):
    """Router (the module, from a config) against a per-token float64 gating reference: which experts, which
    weights. tiny: 8 experts in 4 groups of 2 (so group score "max" over 2 differs from a max over groups),
    top-2 groups (greedy: 3 groups in the config, as DeepSeek-V2 has, which greedy ignores), top-2 experts; the V3
    configs carry a non-zero selection bias."""
    config = ModelConfig.from_preset("tiny").replace(**ROUTER_CONFIGS[name])
    torch.manual_seed(6)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    uses_bias = config.topk_method == "noaux_tc"
    assert ("e_score_correction_bias" in router.state_dict()) == uses_bias  # V2 checkpoints have no bias
    if uses_bias:
        router.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(32, config.hidden_size)
    r = router(x)
    logits = (x.double() @ router.weight.detach().double().T).tolist()
    bias = router.e_score_correction_bias.tolist() if uses_bias else None
    for t in range(32):
        want = route_reference(
            logits[t], bias, top_k=2, n_group=1 if config.topk_method == "greedy" else 4, topk_group=config.topk_group,
            routed_scaling_factor=2.5, norm_topk_prob=config.norm_topk_prob, scoring_func=config.scoring_func,
            group_score="max" if config.topk_method == "group_limited_greedy" else "top2_sum",
        )
        got = dict(zip(r.topk_idx_TK[t].tolist(), r.topk_weight_TK[t].tolist(), strict=True))
        assert got.keys() == want.keys(), t
        assert [got[i] for i in want] == pytest.approx(list(want.values()), rel=1e-5), t


def test_router_scores_in_fp32_under_bf16_autocast():
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(7)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(16, config.hidden_size)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = router(x)
    assert auto.scores_TE.dtype == torch.float32
    torch.testing.assert_close(auto.scores_TE, plain.scores_TE, rtol=0, atol=0)


def test_groups_of_one_expert_reduce_to_plain_top_k_over_the_kept_groups():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0]])
    r = route(logits, None, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=1.0)
    assert sorted(r.topk_idx_TK[0].tolist()) == [1, 3]


def swiglu_weights(mlp):
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


@pytest.mark.parametrize("n_shared", [1, 0])
def test_moe_layer_is_routed_experts_plus_shared_experts(n_shared):
    """MoE(x) = Σ_k g_k FFN_k(x) + FFN_shared(x) (TR eq. 12), token by token in float64 with the layer's own
    routing; without shared experts there is no shared term and no shared weights in the state dict."""
    config = ModelConfig.from_preset("tiny").replace(n_shared_experts=n_shared)
    torch.manual_seed(8)
    moe = MoE(config).double().eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    out = moe(x).hidden_BSD.reshape(10, -1)
    x_TD = x.reshape(10, -1)
    r = moe.gate(x_TD)
    want = experts_reference(moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj, x_TD,
                             r.topk_idx_TK, r.topk_weight_TK.double())
    has_shared = any(k.startswith("shared_experts.") for k in moe.state_dict())
    assert has_shared == bool(n_shared)
    if n_shared:
        gate, up, down = swiglu_weights(moe.shared_experts)
        assert not any(k.endswith(".bias") for k in moe.state_dict())  # SwiGLU FFNs have no biases
        want = want + swiglu_expert(x_TD, gate, up, down)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_expert_parallel_hook_replaces_routed_and_shared_experts():
    """The seam latentmoe.parallel.ep plugs into: called with (moe, x_TD, routing); its result is the output."""
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(9)
    moe = MoE(config).eval()
    x = torch.randn(1, 4, config.hidden_size)
    calls = []

    def hook(layer, x_TD, routing):
        calls.append((layer, x_TD, routing))
        return torch.full_like(x_TD, 7.0)

    expected_routing = moe.gate(x.reshape(4, -1))
    moe.expert_parallel = hook
    out = moe(x)
    (layer, x_TD, routing), = calls
    assert layer is moe and torch.equal(x_TD, x.reshape(4, -1))
    assert torch.equal(routing.topk_idx_TK, expected_routing.topk_idx_TK)
    assert torch.equal(out.hidden_BSD, torch.full_like(x, 7.0))


def test_experts_take_no_tokens_and_keep_the_input_dtype_under_autocast():
    torch.manual_seed(10)
    experts = Experts(4, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    empty = experts(torch.zeros(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 16)
    x = torch.randn(6, 16)
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, idx, torch.rand(6, 2))
    assert y.dtype == torch.float32  # the residual stream's dtype, whatever the matmuls ran in
