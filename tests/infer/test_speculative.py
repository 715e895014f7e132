"""MTP speculative decoding: greedy output identical to plain greedy, sampled output keeps the target
distribution, and the pure acceptance rules on hand-made examples."""

import random

import pytest
import torch

from latentmoe.infer import Engine, SamplingParams, SpeculativeConfig, greedy_accept, rejection_sample
from latentmoe.infer.speculative import draft_window_starts
from tests.reference.sampling import sampling_distribution
from tests.reference.stats import chi2_distance, chi_square_test, merged_bins, noncentral_power


@pytest.mark.parametrize(
    "spec",
    [SpeculativeConfig(1), SpeculativeConfig(2), SpeculativeConfig(3, mode="recursive")],
    ids=["depth1", "depth2-chain", "recursive3"],
)
def test_speculative_greedy_equals_plain_greedy(trained_tiny_mtp2, spec):
    """Over many random prompts and budgets, batched, token for token; drafts are both accepted and rejected."""
    model = trained_tiny_mtp2
    rng = random.Random(7)
    prompts = [[0] + [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(0, 10))] for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0) for _ in prompts]
    engine = Engine(model, block_size=3, max_batch=8)
    plain = engine.generate(prompts, params)
    fast = engine.generate(prompts, params, speculative=spec)
    for a, b in zip(plain, fast, strict=True):
        assert a.token_ids == b.token_ids
    drafted = sum(r.stats.draft_tokens for r in fast)
    accepted = sum(r.stats.accepted_draft_tokens for r in fast)
    assert 0 < accepted < drafted
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_speculative_decoding_takes_fewer_steps_when_drafts_are_accepted(trained_tiny_mtp2):
    engine = Engine(trained_tiny_mtp2, block_size=8)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    engine.generate([[0, 4, 9]], params)
    plain_steps = engine.stats.decode_steps
    result = engine.generate([[0, 4, 9]], params, speculative=SpeculativeConfig(2))[0]
    spec_steps = engine.stats.decode_steps - plain_steps
    assert spec_steps == plain_steps - result.stats.accepted_draft_tokens


PROMPT = [0, 3, 17]
LEVEL = 1e-3  # reject "the engine samples from the reference distribution" at p < 1e-3
CHUNK = 128  # requests admitted together, so that every one drafts in the same step and has its draft verified


def second_token_distribution(model, second=None, **params):
    """Exact p(t_2 | PROMPT) = Σ_{t_1} p(t_1 | PROMPT) p(t_2 | PROMPT, t_1) under ``params``, from the model's
    float64 logits and the independent float64 sampling reference (``second``: other params for t_2)."""
    second = second or params
    with torch.no_grad():
        p1 = sampling_distribution(model(torch.tensor([PROMPT])).logits[0, -1].tolist(), **params)
        support = [t for t, p in enumerate(p1) if p > 0]
        logits = model(torch.tensor([PROMPT + [t] for t in support])).logits[:, -1].tolist()
    out = [0.0] * len(p1)
    for t, row in zip(support, logits, strict=True):
        for v, p in enumerate(sampling_distribution(row, **second)):
            out[v] += p1[t] * p
    return out


def speculative_second_tokens(model, n, **params):
    engine = Engine(model, block_size=4, max_batch=CHUNK)
    tokens, drafted = [], 0
    for start in range(0, n, CHUNK):
        seeds = range(start, min(n, start + CHUNK))
        params_per_request = [SamplingParams(max_tokens=3, seed=s, **params) for s in seeds]
        results = engine.generate([PROMPT] * len(seeds), params_per_request, speculative=SpeculativeConfig(1))
        tokens += [r.token_ids[1] for r in results]
        drafted += sum(r.stats.draft_tokens for r in results)
    assert drafted == n  # the second token of every request went through draft + verification
    return tokens


def test_sampled_speculative_decoding_keeps_the_tempered_target_distribution(trained_tiny_mtp2):
    """The second generated token (drafted by MTP, then accepted or resampled by the target) follows the exact
    tempered distribution p(t_2 | prompt), computed independently in float64.

    Power: Pearson's χ² over the bins with >= 5 expected draws (33 bins, df = 32 at n = 1024), rejected at
    p < 1e-3 (critical value 62.6). A deviation of χ² distance δ gives a noncentral χ² with λ = n·δ; λ >= 85,
    i.e. δ >= 0.083, is detected with power >= 0.999 (Patnaik's approximation, which a 200,000-draw Monte Carlo
    confirms: 0.998 at λ = 80). The failure this guards against — verifying against the untempered target
    (T = 1 instead of 3) — has δ ≈ 0.49, λ ≈ 500; the test computes that alternative's power from the model and
    requires it to be >= 0.999. Fixed seeds, so the outcome is reproducible.
    """
    n, params = 1024, dict(temperature=3.0)
    exact = second_token_distribution(trained_tiny_mtp2, **params)
    untempered = second_token_distribution(trained_tiny_mtp2, second=dict(temperature=1.0), **params)
    groups = merged_bins([n * p for p in exact])
    assert noncentral_power(len(groups) - 1, n * chi2_distance(untempered, exact, groups), LEVEL) >= 0.999
    counts = torch.bincount(torch.tensor(speculative_second_tokens(trained_tiny_mtp2, n, **params)),
                            minlength=len(exact)).tolist()
    result = chi_square_test(counts, exact, upper_tail=LEVEL)
    print(f"X² = {result.statistic:.1f}, critical {result.critical:.1f}, df {result.df}")
    assert not result.rejects, f"X² = {result.statistic:.1f} > {result.critical:.1f} (df {result.df})"


def test_sampled_speculative_decoding_with_top_k_and_top_p_keeps_the_filtered_distribution(trained_tiny_mtp2):
    """Same with top-k = 8 and top-p = 0.9 (temperature 1): no token outside the reference's support is ever
    emitted, and the counts on the support pass χ² at p < 1e-3 (n = 384; the unfiltered target puts ~64 % of its
    mass outside the support, so a verification that forgot the filters fails the support check with
    probability 1 − 0.36^384)."""
    n, params = 384, dict(temperature=1.0, top_k=8, top_p=0.9)
    exact = second_token_distribution(trained_tiny_mtp2, **params)
    tokens = speculative_second_tokens(trained_tiny_mtp2, n, **params)
    outside = sorted({t for t in tokens if exact[t] == 0})
    assert not outside, f"tokens {outside} lie outside top-k/top-p"
    counts = torch.bincount(torch.tensor(tokens), minlength=len(exact)).tolist()
    result = chi_square_test(counts, exact, upper_tail=LEVEL)
    print(f"X² = {result.statistic:.1f}, critical {result.critical:.1f}, df {result.df}")
    assert not result.rejects, f"X² = {result.statistic:.1f} > {result.critical:.1f} (df {result.df})"


def test_rejection_sampling_preserves_the_target_distribution():
    """200,000 independent chains of k=2 drafts over V=5: the first emitted token follows p_1, and after an
    accepted first draft the second follows p_2 (the residual rule makes up what the draft under-proposes)."""
    torch.manual_seed(0)
    B, V = 200_000, 5
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.6, 0.2, 0.1], [0.2] * 5])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
    g = torch.Generator().manual_seed(1)
    drafts = torch.stack([torch.multinomial(q[j], B, replacement=True, generator=g) for j in range(2)], dim=1)
    accepted, nxt = rejection_sample(p.expand(B, -1, -1), q.expand(B, -1, -1), drafts, g)
    first = torch.where(accepted >= 1, drafts[:, 0], nxt)
    freq1 = torch.bincount(first, minlength=V).double() / B
    assert torch.allclose(freq1, p[0].double(), atol=0.005)
    took_first = accepted >= 1
    second = torch.where(accepted[took_first] >= 2, drafts[took_first, 1], nxt[took_first])
    freq2 = torch.bincount(second, minlength=V).double() / int(took_first.sum())
    assert torch.allclose(freq2, p[1].double(), atol=0.01)
    # acceptance of the first draft is Σ min(p, q) = 0.1 + 0.2 + 0.1 + 0.1 + 0.1
    assert abs(float(took_first.double().mean()) - 0.6) < 0.005


def test_rejection_sampling_with_equal_distributions_accepts_everything():
    p = torch.tensor([[[0.3, 0.7], [0.6, 0.4]]])
    accepted, _ = rejection_sample(p, p[:, :1], torch.tensor([[1]]), torch.Generator().manual_seed(0))
    assert int(accepted[0]) == 1


def test_greedy_accept_by_hand():
    assert greedy_accept([5, 6, 7], [5, 6]).emitted([5, 6]) == [5, 6, 7]  # both accepted, bonus 7
    assert greedy_accept([5, 9, 7], [5, 6]).emitted([5, 6]) == [5, 9]  # second rejected, corrected to 9
    assert greedy_accept([4, 6, 7], [5, 6]).num_accepted == 0
    assert greedy_accept([3], []).emitted([]) == [3]
    with pytest.raises(ValueError, match="target_tokens"):
        greedy_accept([1, 2], [1, 2])


def test_draft_window_starts_by_hand():
    # lengths 10, 4, 2 with final positions 8, 3, 0: widths 2, 1, 2 -> W = 2
    assert draft_window_starts([10, 4, 2], [8, 3, 0]) == ([8, 2, 0], 2)
    # a short sequence in a wide window starts at 0 and is padded past its end
    assert draft_window_starts([20, 1], [16, 0]) == ([16, 0], 4)


@pytest.mark.parametrize("kwargs, field", [({"mode": "tree"}, "mode"), ({"num_draft_tokens": 0}, "num_draft_tokens")])
def test_bad_speculative_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig(**kwargs)


def test_chain_mode_needs_as_many_modules_as_drafts(trained_tiny_mtp2):
    with pytest.raises(ValueError, match="num_draft_tokens"):
        Engine(trained_tiny_mtp2).generate([[0, 1]], SamplingParams(max_tokens=3), speculative=SpeculativeConfig(3))
