"""The learning-rate schedule (golden values computed by hand) and AdamW's weight-decay split."""

import math

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.train.optim import build_optimizer, lr_at, split_decay_params

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
    assert decay_group["betas"] == (0.9, 0.95)
    assert len(decay_group["params"]) == len(split.decay)
    buffers = {id(b) for b in model.buffers()}
    assert not any(id(p) in buffers for g in opt.param_groups for p in g["params"]), "router bias is not optimized"
