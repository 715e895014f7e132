"""Log-probabilities of generated and prompt tokens: against log_softmax of one full forward over prompt +
output, computed here (float64 model), for plain decoding, speculative verification and sampling."""

import random

import pytest
import torch

from latentmoe.infer import Engine, SamplingParams
from latentmoe.infer.logprobs import token_logprobs

TOP = 3


def reference_logprobs_TV(model, ids):
    """log_softmax of the model's logits for the whole sequence in one forward: row i scores token i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), compute_mtp=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def check_against_reference(model, prompt, result, top):
    full = prompt + result.token_ids
    ref_TV = reference_logprobs_TV(model, full)
    assert len(result.logprobs) == len(result.token_ids)
    for j, lp in enumerate(result.logprobs):
        row = ref_TV[len(prompt) - 1 + j]
        assert lp.token_id == result.token_ids[j]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-6)
        values, ids = row.topk(top)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        lp = result.prompt_logprobs[i]
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(float(ref_TV[i - 1, prompt[i]]), abs=1e-6)
        assert [t for t, _ in lp.top] == ref_TV[i - 1].topk(top).indices.tolist()


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_equal_log_softmax_of_a_full_forward(trained_tiny_mtp2, speculative, temperature):
    model = trained_tiny_mtp2
    # seed 3: prompts for which the briefly trained fixture's greedy drafts are sometimes accepted, so that
    # verified tokens are scored too (asserted below; with the fixture's 20 steps few drafts are accepted)
    rng = random.Random(3)
    prompts = [[0] + [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    params = SamplingParams(max_tokens=9, temperature=temperature, seed=3, logprobs=TOP, prompt_logprobs=TOP)
    results = Engine(model, block_size=4, max_batch=3).generate(prompts, params, speculative=speculative)
    for prompt, result in zip(prompts, results, strict=True):
        check_against_reference(model, prompt, result, TOP)
    if speculative:
        assert sum(r.stats.accepted_draft_tokens for r in results) > 0  # verified tokens were scored too


def test_streamed_logprobs_add_up_to_the_result_and_stop_strings_drop_the_tail(random_tiny):
    engine = Engine(random_tiny.double(), block_size=4)
    events = list(engine.stream([0, 5, 6], SamplingParams(max_tokens=7, temperature=0, logprobs=0)))
    streamed = [lp for e in events for lp in e.new_logprobs]
    assert streamed == events[-1].result.logprobs
    assert [lp.token_id for lp in streamed] == events[-1].result.token_ids
    assert all(lp.top == () for lp in streamed)
    assert events[-1].result.prompt_logprobs is None


def test_no_logprobs_unless_asked(random_tiny):
    result = Engine(random_tiny).generate([[0, 3]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert result.logprobs is None and result.prompt_logprobs is None


def test_token_logprobs_golden():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    first, second = token_logprobs(logits, [1, 0], top_n=1)
    assert first.logprob == pytest.approx(-1.3862943611)  # log(1/4)
    assert second.logprob == pytest.approx(2 - 1.0 * float(torch.tensor([2.0, 0, 0, 0]).logsumexp(0)))
    assert second.top[0][0] == 0


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_out_of_range_is_a_value_error(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: 21})
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: -1})
