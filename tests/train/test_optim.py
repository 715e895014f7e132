"""The learning-rate schedule (golden values computed by hand) and AdamW's weight-decay split."""

import math

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.train.optim import AdamWLowPrecisionMoments, build_optimizer, lr_at, split_decay_params

SCHEDULE = {"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "total_steps": 110}


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1e-4),  # warmup: 1e-3 * 1/10
        (4, 5e-4),  # 1e-3 * 5/10
        (9, 1e-3),  # last warmup step reaches max_lr
        (10, 1e-3),  # cosine starts at max_lr (progress 0)
        (35, 1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.25)) / 2),  # progress 25/100: 8.68198e-4
        (60, 5.5e-4),  # halfway: (max + min) / 2
        (85, 1e-4 + 9e-4 * (1 + math.cos(math.pi * 0.75)) / 2),  # 2.31802e-4
        (110, 1e-4),  # total_steps and beyond: min_lr
        (500, 1e-4),
    ],
)
def test_lr_at_matches_hand_computed_warmup_and_cosine(step, expected):
    assert lr_at(step, **SCHEDULE) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_at_golden_literals():
    # The same points written out as decimals, so a formula slip cannot hide in both sides.
    assert lr_at(35, **SCHEDULE) == pytest.approx(8.681981e-4, rel=1e-6)
    assert lr_at(85, **SCHEDULE) == pytest.approx(2.318019e-4, rel=1e-6)


def test_lr_at_is_monotone_after_warmup_and_without_warmup_starts_at_max():
    values = [lr_at(s, **SCHEDULE) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, max_lr=2e-3, min_lr=0.0, warmup_steps=0, total_steps=5) == 2e-3


@pytest.mark.parametrize(
    "bad",
    [{"warmup_steps": -1}, {"total_steps": 0}, {"min_lr": 1e-2}],
)
def test_lr_at_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        lr_at(0, **{**SCHEDULE, **bad})


def test_norms_and_vectors_are_not_decayed_matrices_and_experts_are():
    model = CausalLM(ModelConfig.from_preset("tiny"))
    split = split_decay_params(model)
    params = dict(model.named_parameters())
    assert split.no_decay and split.decay
    assert all(params[n].ndim < 2 for n in split.no_decay)
    assert all(params[n].ndim >= 2 for n in split.decay)
    assert any("norm" in n for n in split.no_decay)
    assert not any("norm" in n for n in split.decay)
    assert any(params[n].ndim == 3 for n in split.decay), "grouped expert weights are decayed"
    assert len(split.decay) + len(split.no_decay) == len(params)

    opt = build_optimizer(model, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    decay_group, no_decay_group = opt.param_groups
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    assert decay_group["betas"] == (0.9, 0.95) and decay_group["eps"] == 1e-8  # TR betas; torch's eps
    assert len(decay_group["params"]) == len(split.decay)
    buffers = {id(b) for b in model.buffers()}
    assert not any(id(p) in buffers for g in opt.param_groups for p in g["params"]), "router bias is not optimized"


def test_lr_at_edges_one_step_runs_equal_bounds_and_the_last_cosine_step():
    # a one-step run is valid and starts at max_lr; min_lr == max_lr is a constant schedule
    assert lr_at(0, max_lr=1e-3, min_lr=1e-4, warmup_steps=0, total_steps=1) == 1e-3
    assert lr_at(3, max_lr=5e-4, min_lr=5e-4, warmup_steps=0, total_steps=10) == 5e-4
    # two cosine steps after warmup: progress 0, then 1/2 (the midpoint), then min_lr at total_steps
    two = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=3)
    assert [lr_at(s, **two) for s in range(4)] == pytest.approx([1e-3, 1e-3, 5.5e-4, 1e-4], rel=1e-12)


def test_frozen_parameters_are_left_out_and_the_rest_still_split():
    model = CausalLM(ModelConfig.from_preset("tiny"))
    first = next(iter(model.parameters()))
    first.requires_grad_(False)
    split = split_decay_params(model)
    names = split.decay + split.no_decay
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad) and names


def adamw_reference_run(params, grads, *, lr, betas, eps, weight_decay):
    """torch.optim.AdamW, one group, on copies of ``params``, one step per gradient list."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(copies, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for step_grads in grads:
        for c, g in zip(copies, step_grads, strict=True):
            c.grad = g.clone()
        opt.step()
    return copies


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_build_optimizer_passes_lr_betas_eps_and_decay_through(moments):
    """Three steps of build_optimizer's AdamW equal torch's AdamW with the same settings (group 0 with decay,
    group 1 without); fp32 moments bit for bit, bf16 moments to bf16 rounding. Settings far from every default."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    kw = dict(lr=3e-2, betas=(0.8, 0.9), eps=0.5, weight_decay=0.3)  # eps large enough to show in bf16
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    kinds = [p.ndim >= 2 for p in model.parameters()]
    want_m = adamw_reference_run(matrices, [[g for g, k in zip(gs, kinds, strict=True) if k] for gs in grads], **kw)
    want_v = adamw_reference_run(vectors, [[g for g, k in zip(gs, kinds, strict=True) if not k] for gs in grads],
                                 **{**kw, "weight_decay": 0.0})
    opt = build_optimizer(model, moments=moments, **kw)
    for gs in grads:
        for p, g in zip(model.parameters(), gs, strict=True):
            p.grad = g.clone()
        opt.step()
    tol = dict(rtol=0, atol=0) if moments == "fp32" else dict(rtol=0, atol=2e-3)
    for got, want in zip(matrices + vectors, want_m + want_v, strict=True):
        torch.testing.assert_close(got, want, **tol)
    dtypes = {s["exp_avg"].dtype for s in opt.state.values()} | {s["exp_avg_sq"].dtype for s in opt.state.values()}
    assert dtypes == {torch.float32 if moments == "fp32" else torch.bfloat16}


def test_low_precision_adamw_defaults_are_torch_adamws():
    """lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2, like torch.optim.AdamW's defaults."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = AdamWLowPrecisionMoments([p], moments_dtype=torch.float32), torch.optim.AdamW([q])
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step(), theirs.step()
    assert torch.equal(p, q)


def test_low_precision_adamw_state_round_trips_in_bf16():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(8))
    opt = AdamWLowPrecisionMoments([p], lr=1e-2)
    p.grad = torch.randn(8)
    opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    again = AdamWLowPrecisionMoments([q], lr=1e-2)
    again.load_state_dict(saved)
    (state,) = again.state.values()
    (orig,) = opt.state.values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], orig[key])
