"""The model runner's decode seam: an Engine takes a runner class, and a decode implemented differently
(each request in its own forward, as a static-shape step might) keeps the contract the eager batched
decode defines — same tokens, same cache positions."""

import random

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
