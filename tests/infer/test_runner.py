"""The model runner's decode seam: an Engine takes a runner class, and a decode implemented differently
(each request in its own forward, as a static-shape step might) keeps the contract the eager batched
decode defines — same tokens, same cache positions."""

import random

import pytest
import torch

from latentmoe.infer import Engine, SamplingParams
from latentmoe.infer.runner import ModelRunner


class OneAtATimeRunner(ModelRunner):
    """decode() as B forwards of one sequence instead of one forward of B."""

    calls = 0

    def decode(self, batch):
        type(self).calls += 1
        tokens = []
        for request in batch:
            tokens += super().decode([request])
        return tokens


def test_a_replacement_decode_plugs_in_and_matches_the_eager_batched_reference(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    rng = random.Random(5)
    prompts = [[0] + [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(0, 9))] for _ in range(6)]
    params = [SamplingParams(max_tokens=rng.randint(2, 12), temperature=rng.choice([0.0, 0.9]), seed=i)
              for i in range(len(prompts))]
    reference = Engine(model, block_size=4, max_batch=4).generate(prompts, params)
    engine = Engine(model, block_size=4, max_batch=4, runner_cls=OneAtATimeRunner)
    assert isinstance(engine.runner, OneAtATimeRunner)
    replaced = engine.generate(prompts, params)
    assert OneAtATimeRunner.calls == engine.stats.decode_steps > 0
    assert [r.token_ids for r in replaced] == [r.token_ids for r in reference]
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_writes_the_same_cache_and_tokens_as_one_forward(trained_tiny_mtp2, chunk):
    """Prompts longer than a chunk (crossing chunk and block boundaries, with a shared prefix between two of them)
    give the cache rows, prompt log-probabilities and greedy tokens of a one-forward prefill."""
    model = trained_tiny_mtp2
    rng = random.Random(chunk)
    base = [0] + [rng.randrange(2, model.config.vocab_size) for _ in range(20)]
    prompts = [base, base[:13] + [5, 6, 7], [0, 3]]
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1)
    whole = Engine(model, block_size=4, max_batch=4, prefill_chunk=10_000)
    chunked = Engine(model, block_size=4, max_batch=4, prefill_chunk=chunk)
    rounds = {id(whole): {}, id(chunked): {}}  # one admission round each: the second prompt shares a prefix
    for prompt in prompts:
        for engine in (whole, chunked):
            engine.runner.prefill(engine.new_request(prompt, params), rounds[id(engine)])
    for rid, prompt in enumerate(prompts):
        for layer in range(model.config.num_hidden_layers):
            a = whole.cache.read(layer, rid, len(prompt))
            b = chunked.cache.read(layer, rid, len(prompt))
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    fresh = [Engine(model, block_size=4, max_batch=4, prefill_chunk=c).generate(prompts, params)
             for c in (10_000, chunk)]
    assert [r.token_ids for r in fresh[1]] == [r.token_ids for r in fresh[0]]
    for a, b in zip(fresh[0], fresh[1], strict=True):
        expected = [p.logprob for p in a.prompt_logprobs[1:]]
        # float64, but the router runs in fp32 (TR §3.3.1): its gate weights round at 1e-7 relative when the
        # chunks' sums differ in the last float64 bit, which reaches the log-probabilities at ~1e-8
        assert [p.logprob for p in b.prompt_logprobs[1:]] == pytest.approx(expected, rel=1e-7)


def test_prefill_chunk_must_be_positive(random_tiny):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(random_tiny, num_blocks=4, prefill_chunk=0)
