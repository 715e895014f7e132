"""The engine: against the reference generate(), batched against alone, block accounting, bad input,
stop conditions, streaming and statistics."""

import random

import pytest

from latentmoe import CausalLM, ModelConfig
from latentmoe.infer import Engine, SamplingParams, generate
from latentmoe.infer.engine import find_stop, streamable_length


class CharTokenizer:
    """A stand-in for ``tokenizers.Tokenizer``: one token per character, ids offset past BOS/EOS."""

    OFFSET = 2

    def encode(self, text):
        class Encoding:
            ids = [ord(ch) - ord(" ") + CharTokenizer.OFFSET for ch in text]

        return Encoding()

    def decode(self, ids):
        return "".join(chr(i - self.OFFSET + ord(" ")) for i in ids if i >= self.OFFSET)


def random_prompts(n, vocab, rng, max_len=12):
    return [[0] + [rng.randrange(vocab) for _ in range(rng.randint(0, max_len))] for _ in range(n)]


def test_engine_greedy_equals_reference_generate(random_tiny):
    rng = random.Random(0)
    prompts = random_prompts(5, random_tiny.config.vocab_size, rng)
    params = SamplingParams(max_tokens=10, temperature=0)
    results = Engine(random_tiny, block_size=4, max_batch=3).generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == generate(random_tiny, prompt, params)
        assert result.prompt_token_ids == prompt and result.finish_reason == "length"


def test_continuous_batching_gives_each_sequence_what_decoding_it_alone_gives(trained_tiny_mtp2):
    """Requests with different lengths, budgets and sampling settings join and leave a batch of 3; each
    gets exactly the tokens it gets in an engine of its own (float64 model; per-request generators)."""
    model = trained_tiny_mtp2
    rng = random.Random(1)
    prompts = random_prompts(7, model.config.vocab_size, rng)
    params = [
        SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8, 1.3]), top_k=rng.choice([0, 5]),
                       top_p=rng.choice([1.0, 0.9]), seed=i)
        for i in range(len(prompts))
    ]
    engine = Engine(model, block_size=4, max_batch=3)
    together = engine.generate(prompts, params)
    assert engine.stats.max_running == 3
    for prompt, p, result in zip(prompts, params, together, strict=True):
        alone = Engine(model, block_size=4, max_batch=1).generate([prompt], p)[0]
        assert result.token_ids == alone.token_ids
        assert len(result.token_ids) == p.max_tokens


def test_greedy_speculative_batching_gives_each_sequence_what_decoding_it_alone_gives(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    rng = random.Random(2)
    prompts = random_prompts(6, model.config.vocab_size, rng)
    params = [SamplingParams(max_tokens=rng.randint(1, 14), temperature=0) for _ in prompts]
    together = Engine(model, block_size=4, max_batch=4).generate(prompts, params, speculative=True)
    for prompt, p, result in zip(prompts, params, together, strict=True):
        assert result.token_ids == Engine(model, block_size=4).generate([prompt], p)[0].token_ids


def test_thousand_short_requests_leave_the_block_pool_fully_free(random_tiny):
    engine = Engine(random_tiny, block_size=2, max_batch=16, num_blocks=64)
    rng = random.Random(3)
    prompts = random_prompts(1000, random_tiny.config.vocab_size, rng, max_len=3)
    params = [SamplingParams(max_tokens=rng.randint(1, 3), temperature=0.0, stop_token_ids=(rng.randrange(512),))
              for _ in prompts]
    results = engine.generate(prompts[:500], params[:500])
    results += engine.generate(prompts[500:], params[500:], speculative=True)
    assert len(results) == 1000 and not engine.has_unfinished()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.block_tables
    assert engine._reserved_blocks == 0


def test_running_out_of_blocks_queues_new_requests_instead_of_failing(random_tiny):
    """A pool that holds two requests' worst case: the third waits, then runs when one finishes."""
    params = SamplingParams(max_tokens=6, temperature=0)
    engine = Engine(random_tiny, block_size=4, max_batch=8, num_blocks=6)  # each request reserves 3 blocks
    prompts = [[0, 1, 2, 3, 4, 5], [0, 9], [0, 7, 7]]
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 1
    results = {}
    while engine.has_unfinished():
        for e in engine.step():
            if e.finished:
                results[e.request_id] = e.result
    assert engine.stats.max_running == 2
    for i, prompt in zip(ids, prompts, strict=True):
        assert results[i].token_ids == generate(random_tiny, prompt, params)


@pytest.mark.parametrize(
    "prompt, kwargs, field",
    [
        ([], {}, "prompt"),
        ("", {}, "prompt"),
        ([0] * 500, {"max_tokens": 13}, "max_tokens"),
        ([0, 1], {"max_tokens": 0}, "max_tokens"),
        ([0, 1], {"max_tokens": -3}, "max_tokens"),
        ([0, 1], {"top_p": 0.0}, "top_p"),
        ([0, 1], {"top_p": 1.5}, "top_p"),
        ([0, 1], {"temperature": -0.1}, "temperature"),
        ([0, 10_000], {}, "prompt"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field(random_tiny, prompt, kwargs, field):
    engine = Engine(random_tiny, CharTokenizer(), num_blocks=16)
    with pytest.raises(ValueError, match=field):
        engine.generate([prompt], SamplingParams(**kwargs))
    assert not engine.has_unfinished()


def test_speculative_without_mtp_modules_is_a_value_error():
    model = CausalLM(ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=0)).eval()
    with pytest.raises(ValueError, match="speculative"):
        Engine(model).generate([[0, 1]], SamplingParams(max_tokens=2), speculative=True)


def test_stop_token_is_kept_and_stop_string_cuts_the_text(random_tiny):
    engine = Engine(random_tiny, CharTokenizer(), block_size=4)
    free = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert free.text == CharTokenizer().decode(free.token_ids)
    stop_token = free.token_ids[3]
    cut = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_token,)))[0]
    assert cut.token_ids == free.token_ids[: free.token_ids.index(stop_token) + 1] and cut.finish_reason == "stop"
    stop = free.text[4:6]
    by_string = engine.generate(["abc"], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    assert by_string.text == free.text[: free.text.index(stop)] and by_string.finish_reason == "stop"


def test_streamed_events_add_up_to_the_result_and_interleave(random_tiny):
    engine = Engine(random_tiny, CharTokenizer(), block_size=4)
    params = SamplingParams(max_tokens=9, temperature=0)
    expected = [engine.generate([p], params)[0] for p in ("to be", "or not")]
    streams = [engine.stream(p, params) for p in ("to be", "or not")]
    tokens, texts, finals = [[], []], ["", ""], [None, None]
    active = {0, 1}
    while active:
        for i in sorted(active):
            event = next(streams[i])
            tokens[i] += event.new_token_ids
            texts[i] += event.new_text
            if event.finished:
                finals[i] = event.result
                active.discard(i)
    for i in range(2):
        assert tokens[i] == expected[i].token_ids == finals[i].token_ids
        assert texts[i] == expected[i].text
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_per_request_statistics(trained_tiny_mtp2):
    engine = Engine(trained_tiny_mtp2, block_size=4)
    plain, spec = (engine.generate([[0, 5, 6, 7]], SamplingParams(max_tokens=10, temperature=0), speculative=s)[0]
                   for s in (False, True))
    for result in (plain, spec):
        st = result.stats
        assert st.prompt_tokens == 4 and st.generated_tokens == 10
        assert 0 <= st.time_to_first_token_s <= st.total_time_s
        assert st.tokens_per_s == pytest.approx(st.generated_tokens / st.total_time_s)
    assert plain.stats.draft_tokens == 0 and plain.stats.acceptance_rate is None
    st = spec.stats
    assert st.draft_tokens == sum(st.drafted_per_position) > 0
    assert st.accepted_draft_tokens == sum(st.accepted_per_position)
    assert len(st.acceptance_per_position) == trained_tiny_mtp2.config.num_nextn_predict_layers


def test_draft_time_is_the_part_of_decode_time_spent_drafting(trained_tiny_mtp2):
    now = [0.0]  # a clock that only drafting moves: each draft takes 10 "seconds"
    engine = Engine(trained_tiny_mtp2, block_size=4, clock=lambda: now[0])
    draft, drafts = engine.runner.draft, []

    def slow_draft(group, plan):
        now[0] += 10.0
        drafts.append(len(group))
        return draft(group, plan)

    engine.runner.draft = slow_draft
    prompts = [[0, 5, 6, 7], [0, 9, 8]]
    engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0), speculative=True)
    st = engine.stats
    # each request's first draft runs right after its prefill (one call each); the rest inside decode steps
    assert st.prefill_s == 10.0 * len(prompts)
    assert st.draft_s == st.decode_s == 10.0 * (len(drafts) - len(prompts))


def test_stop_string_helpers():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["xyz"]) is None
    assert streamable_length("the end\n", ["\n\n"]) == 7  # "\n" may become "\n\n": held back
    assert streamable_length("abc\ufffd", []) == 3  # half a UTF-8 character is held back
    assert streamable_length("abc", ["zz"]) == 3


@pytest.mark.parametrize("speculative", [False, True])
def test_identical_prompts_share_one_prefill_and_match_decoding_alone(trained_tiny_mtp2, speculative):
    model = trained_tiny_mtp2
    prompt = [0, 8, 3, 14, 2]
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=s) for s in range(4)]
    engine = Engine(model, block_size=2, max_batch=4)
    together = engine.generate([prompt] * 4, params, speculative=speculative)
    assert engine.stats.prefill_tokens == len(prompt) and engine.stats.prefill_shared_tokens == 3 * len(prompt)
    for p, result in zip(params, together, strict=True):
        alone = Engine(model, block_size=2).generate([prompt], p, speculative=speculative)[0]
        assert result.token_ids == alone.token_ids
    assert len({tuple(r.token_ids) for r in together}) > 1  # different seeds, different samples


def test_prompts_with_a_common_prefix_prefill_it_once_and_match_decoding_alone(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    prefix = [0, 8, 3, 14, 2, 9, 9, 4]
    prompts = [prefix + [5, 6], prefix + [7], prefix, prefix[:5], [0, 1]]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    engine = Engine(model, block_size=3, max_batch=8)
    together = engine.generate(prompts, params, speculative=True)
    # prefix+[7]: 8 shared; prefix (a strict prefix: its last position still runs): 7; prefix[:5]: 4; [0, 1]: 1
    assert engine.stats.prefill_shared_tokens == 8 + 7 + 4 + 1
    assert engine.stats.prefill_tokens == sum(map(len, prompts)) - engine.stats.prefill_shared_tokens
    for prompt, result in zip(prompts, together, strict=True):
        assert result.token_ids == Engine(model, block_size=3).generate([prompt], params)[0].token_ids
