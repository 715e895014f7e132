"""Generation: cached decoding against full recomputation; sampling filters on hand-made logits."""

import math

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.infer import SamplingParams, filter_logits, generate, sample_next


def test_cached_greedy_generation_equals_full_recompute():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny")).eval()
    prompt = [0, 5, 17, 42, 9]
    ours = generate(model, prompt, SamplingParams(max_tokens=12, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # reference: no cache, the whole sequence every step
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ours == ids[len(prompt) :]


def test_generation_stops_at_stop_token_and_respects_seed():
    torch.manual_seed(1)
    model = CausalLM(ModelConfig.from_preset("tiny")).eval()
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7)
    a, b = generate(model, [0, 3], params), generate(model, [0, 3], params)
    assert a == b and len(a) == 20
    stop = a[4]
    cut = generate(model, [0, 3], SamplingParams(max_tokens=20, temperature=1.0, seed=7, stop_token_ids=[stop]))
    assert cut == a[: a.index(stop) + 1]


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert kept == [True, True, False, False, False]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is needed too
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist()
    assert kept == [True, False, False, False, False]


def test_sampling_frequencies_follow_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    freq0 = (draws == 0).float().mean().item()
    assert (draws != 2).all()
    assert math.isclose(freq0, 0.5 / 0.8, abs_tol=0.03)  # renormalised over the two kept tokens


@pytest.mark.parametrize("kwargs", [{"top_p": 0.0}, {"temperature": -1}, {"max_tokens": -1}, {"top_k": -2}])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
