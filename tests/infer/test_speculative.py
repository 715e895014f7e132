"""MTP speculative decoding: greedy output identical to plain greedy, sampled output keeps the target
distribution, and the pure acceptance rules on hand-made examples."""

import random

import pytest
import torch

from latentmoe.infer import Engine, SamplingParams, SpeculativeConfig, greedy_accept, rejection_sample, token_probs
from latentmoe.infer.speculative import draft_window_starts


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


def test_sampled_speculative_decoding_keeps_the_target_distribution(trained_tiny_mtp2):
    """The second generated token's empirical distribution under speculative sampling is as close to the
    exact p(t2 | prompt) as plain sampling's is (same number of draws)."""
    model = trained_tiny_mtp2
    prompt = [0, 3, 17]
    params = dict(max_tokens=3, temperature=1.5)  # the second token is drafted (the last one never is)
    n = 400
    with torch.no_grad():
        p1 = token_probs(model(torch.tensor([prompt])).logits[0, -1:], SamplingParams(**params))[0]
        support = torch.nonzero(p1 > 1e-6)[:, 0]
        second = torch.cat([torch.tensor(prompt).expand(len(support), -1), support[:, None]], dim=1)
        p2_given = token_probs(model(second).logits[:, -1], SamplingParams(**params))
        exact = (p1[support, None].double() * p2_given.double()).sum(0)

    def empirical(speculative):
        engine = Engine(model, block_size=4, max_batch=64)
        results = engine.generate([prompt] * n, [SamplingParams(**params, seed=s) for s in range(n)],
                                  speculative=speculative)
        counts = torch.bincount(torch.tensor([r.token_ids[1] for r in results]), minlength=exact.numel())
        return counts.double() / n, results

    plain, _ = empirical(False)
    spec, results = empirical(SpeculativeConfig(1))
    assert sum(r.stats.accepted_draft_tokens for r in results) > 0
    tv_plain = 0.5 * float((plain - exact).abs().sum())
    tv_spec = 0.5 * float((spec - exact).abs().sum())
    assert tv_spec < max(1.5 * tv_plain, 0.1)


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
