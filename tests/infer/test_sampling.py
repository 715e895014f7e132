"""The pure sampling functions on hand-made inputs: the greedy distribution, filters at their edges, and the
shape and one-hot cases of speculative rejection sampling (gaps found by ``make mutants``)."""

import pytest
import torch

from latentmoe.infer import SamplingParams, filter_logits, greedy_accept, rejection_sample, token_probs
from tests.reference.sampling import sampling_distribution


def test_greedy_distribution_is_one_hot_on_the_argmax_in_fp32():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    probs = token_probs(logits, SamplingParams(temperature=0.0))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_sampled_distribution_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g, dtype=torch.float64) * 3
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.6),
               dict(temperature=2.0, top_k=10, top_p=0.8)):
        got = token_probs(logits, SamplingParams(**kw))
        for row, logit_row in zip(got.tolist(), logits.tolist(), strict=True):
            assert row == pytest.approx(sampling_distribution(logit_row, **kw), abs=1e-6), kw


def test_filters_return_a_new_tensor_and_leave_the_input_alone():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = filter_logits(logits)
    assert out is not logits and torch.equal(out, logits)  # the defaults filter nothing
    out[0, 0] = -1.0
    assert logits.tolist() == [[1.0, 2.0, 3.0]]


def test_top_p_one_keeps_every_token_even_when_the_fp32_mass_rounds_to_one():
    # softmax puts 1 - 3e-13 on token 0: in fp32 the running mass is already 1.0 before tokens 1..3
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    assert torch.isfinite(filter_logits(logits, top_k=4)).all()  # top_k = V keeps all too


@pytest.mark.parametrize("bad", ["target", "drafts"])
def test_rejection_sampling_names_either_bad_shape(bad):
    p = torch.full((1, 3, 4), 0.25)
    q = torch.full((1, 2, 4), 0.25)
    d = torch.tensor([[0, 1]])
    if bad == "target":
        p = p[:, :2]
    else:
        d = d[:, :1]
    with pytest.raises(ValueError, match="target_probs must be"):
        rejection_sample(p, q, d, torch.Generator().manual_seed(0))


def test_rejection_sampling_with_one_hot_targets_is_deterministic():
    """A target that is certain: a wrong draft is always rejected and corrected to the target's token; a right
    one is accepted and the bonus token is the certain one."""
    p = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    q = torch.tensor([[[0.5, 0.5, 0.0]]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        accepted, nxt = rejection_sample(p, q, torch.tensor([[0]]), g)
        assert (int(accepted), int(nxt)) == (0, 2)
    q_right = torch.tensor([[[0.0, 0.0, 1.0]]])
    accepted, nxt = rejection_sample(p, q_right, torch.tensor([[2]]), g)
    assert (int(accepted), int(nxt)) == (1, 1)


def test_top_p_keeps_the_smallest_set_reaching_the_mass_exactly():
    """Two tokens of probability 1/2 each and top_p = 1/2: the first alone reaches the mass, the second goes."""
    kept = torch.isfinite(filter_logits(torch.tensor([[0.0, 0.0]]), top_p=0.5))[0].tolist()
    assert sorted(kept) == [False, True]


def test_greedy_accept_counts_every_accepted_draft():
    assert greedy_accept([5, 6, 7, 8], [5, 6, 9]).emitted([5, 6, 9]) == [5, 6, 7]
    assert greedy_accept([5, 6, 7, 8], [5, 6, 7]).num_accepted == 3


def test_sampling_params_normalise_and_check_stop_strings():
    assert SamplingParams(stop="END").stop == ("END",)
    for bad in ([""], [3]):
        with pytest.raises(ValueError, match="stop"):
            SamplingParams(stop=bad)


def test_a_seeded_request_draws_the_stream_of_a_cpu_generator_with_that_seed():
    draws = torch.rand(4, generator=SamplingParams(seed=11).make_generator())
    assert torch.equal(draws, torch.rand(4, generator=torch.Generator().manual_seed(11)))
    assert SamplingParams().make_generator() is None
