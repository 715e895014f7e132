"""The static-shape decode step against the eager reference runner, and its compiled graph against itself eager.

The eager ``ModelRunner`` (materialised/absorbed MLA through the paged cache view, grouped MoE) is the reference;
the static step (folded absorbed weights, block-table gather + length mask, routing-independent MoE shapes) must
give the same greedy tokens over many prompts, batch sizes (padded to buckets) and cache lengths (crossing block
boundaries and block buckets), with and without MTP speculation. float64 keeps argmax ties far away.
"""

import functools
import random

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.infer import Engine, SamplingParams, SpeculativeConfig, decode_step
from latentmoe.infer.compiled_runner import MAX_STATIC_DRAFT_WINDOW, CompiledRunner
from latentmoe.infer.decode_step import StaticDraft, StaticStep, block_bucket, bucket
from latentmoe.infer.runner import ModelRunner
from latentmoe.model.moe import Experts, gathered_experts, grouped_experts, grouped_linear, static_experts
from tests.reference.moe import experts_reference


def static_runner(max_batch: int, compile: bool = False):
    return functools.partial(CompiledRunner, max_batch=max_batch, compile=compile)


def test_block_bucket_by_hand():
    assert [block_bucket(n, 1000) for n in (1, 5, 8, 9, 10, 11, 17, 33, 65, 129)] == \
        [1, 5, 8, 10, 10, 12, 20, 40, 80, 160]
    assert block_bucket(9, 9) == 9
    with pytest.raises(ValueError):
        block_bucket(0, 4)


def test_bucket_by_hand():
    assert [bucket(n, 16) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert bucket(9, 12) == 12 and bucket(3, 3) == 3
    with pytest.raises(ValueError):
        bucket(0, 4)
    with pytest.raises(ValueError):
        bucket(5, 4)


@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_gathered_and_grouped_experts_equal_the_reference_and_per_token_loop(tokens):
    """In float64 (grouped_linear's loop of products) and in fp32 (F.grouped_mm, against the float64 loop);
    7 tokens x top-3 of 6 leave no expert empty, 1 and 2 leave some empty (empty groups)."""
    torch.manual_seed(tokens)
    experts = Experts(6, 16, 24).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(tokens, 16, dtype=torch.float64)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3, dtype=torch.float64)
    loop = experts_reference(experts.gate_proj, experts.up_proj, experts.down_proj, x, idx, w)
    weights = (experts.gate_proj, experts.up_proj, experts.down_proj)
    for y in (experts(x, idx, w), gathered_experts(x, idx, w, *weights), grouped_experts(x, idx, w, *weights),
              static_experts(x, idx, w, experts)):
        torch.testing.assert_close(y, loop, rtol=1e-10, atol=1e-12)
    fp32 = grouped_experts(x.float(), idx, w.float(), *(t.float() for t in weights))
    torch.testing.assert_close(fp32, loop.float(), rtol=1e-5, atol=1e-6)


def test_grouped_linear_by_hand():
    """Rows 0-1 through weight 0 (identity), none through weight 1 (an empty group), row 2 through weight 2
    (reversal); 4 fp32 columns take F.grouped_mm (16-byte rows), 2 columns and float64 the loop."""
    ends = torch.tensor([2, 2, 3])
    for width in (4, 2):
        x = torch.arange(3.0 * width).view(3, width)
        weight = torch.stack([torch.eye(width), torch.full((width, width), 9.0), torch.eye(width).flip(0)])
        expected = torch.stack([x[0], x[1], x[2].flip(0)])
        for dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(grouped_linear(x.to(dtype), weight.to(dtype), ends), expected.to(dtype))


def random_prompts(vocab: int, count: int, seed: int, longest: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(2, vocab) for _ in range(rng.randint(0, longest))] for _ in range(count)]


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_static_step_greedy_tokens_equal_the_reference_runner(max_batch):
    """Batches of 1..8 padded to buckets 1/2/4/8 (and a cap of 3), block size 4 so lengths cross block
    boundaries and block buckets (1..8, 10, 12, 14, 16, 20 blocks) while decoding."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny")).double().eval()
    rng = random.Random(max_batch)
    prompts = random_prompts(model.config.vocab_size, 11, seed=max_batch)
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0) for _ in prompts]
    reference = Engine(model, block_size=4, max_batch=max_batch).generate(prompts, params)
    engine = Engine(model, block_size=4, max_batch=max_batch, runner_cls=static_runner(max_batch))
    static = engine.generate(prompts, params)
    assert [r.token_ids for r in static] == [r.token_ids for r in reference]
    assert engine.runner.fallback_reason is None
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize(
    "spec", [SpeculativeConfig(1), SpeculativeConfig(2), SpeculativeConfig(3, mode="recursive")],
    ids=["depth1", "depth2-chain", "recursive3"],
)
def test_static_verification_greedy_equals_plain_greedy(trained_tiny_mtp2, spec):
    """The verify step (S = 1 + drafts, each request its own count) keeps speculative greedy == plain greedy."""
    model = trained_tiny_mtp2
    prompts = random_prompts(model.config.vocab_size, 12, seed=3, longest=10)
    rng = random.Random(5)
    params = [SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0) for _ in prompts]
    plain = Engine(model, block_size=3, max_batch=8).generate(prompts, params)
    engine = Engine(model, block_size=3, max_batch=8, runner_cls=static_runner(8))
    fast = engine.generate(prompts, params, speculative=spec)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert 0 < sum(r.stats.accepted_draft_tokens for r in fast) < sum(r.stats.draft_tokens for r in fast)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize(
    "spec", [SpeculativeConfig(2), SpeculativeConfig(3, mode="recursive")], ids=["depth2-chain", "recursive3"],
)
def test_static_drafts_equal_the_reference_drafts(trained_tiny_mtp2, spec, monkeypatch):
    """Draft windows through StaticDraft give the MTP logits the reference runner's mtp_forward gives, draft
    for draft (the tokens alone would not show a wrong draft: verification keeps them right either way)."""
    model = trained_tiny_mtp2
    prompts = random_prompts(model.config.vocab_size, 6, seed=8, longest=MAX_STATIC_DRAFT_WINDOW + 4)
    prompts.append([0] + list(range(2, MAX_STATIC_DRAFT_WINDOW + 6)))  # its first draft window is too wide
    params = SamplingParams(max_tokens=16, temperature=0.0)
    proposed: list[torch.Tensor] = []
    propose = ModelRunner._propose

    def spy(request, logits_1V, drafts, probs):
        proposed.append(logits_1V.clone())
        propose(request, logits_1V, drafts, probs)

    monkeypatch.setattr(ModelRunner, "_propose", staticmethod(spy))  # CompiledRunner's too (inherited)
    static_windows: list[int] = []
    draft_forward = StaticDraft.forward

    def count(self, prev_BSD, future_ids_BS, *rest):
        static_windows.append(future_ids_BS.shape[1])
        return draft_forward(self, prev_BSD, future_ids_BS, *rest)

    monkeypatch.setattr(StaticDraft, "forward", count)
    reference = Engine(model, block_size=3, max_batch=4).generate(prompts, params, speculative=spec)
    expected, proposed[:] = list(proposed), []
    engine = Engine(model, block_size=3, max_batch=4, runner_cls=static_runner(4))
    static = engine.generate(prompts, params, speculative=spec)
    assert [r.token_ids for r in static] == [r.token_ids for r in reference]
    assert len(proposed) == len(expected) > 0
    for got, want in zip(proposed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)  # the router's fp32 rounding, as below
    assert static_windows and max(static_windows) <= MAX_STATIC_DRAFT_WINDOW  # the static draft did run


def test_static_draft_equals_mtp_forward():
    """StaticDraft over the module's paged cache layer gives mtp_forward's hidden states and logits (float64),
    for windows of one and three positions after cached rows that cross blocks. Both run the router in fp32
    (TR §3.3.1), so the gate weights round at fp32's 1e-7: that, not float64's 1e-16, sets the tolerance."""
    torch.manual_seed(2)
    model = CausalLM(ModelConfig.from_preset("tiny")).double().eval()
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    ids = torch.randint(2, model.config.vocab_size, (2, 12))
    prev = torch.randn(2, 12, D, dtype=torch.float64)
    engine = Engine(model, block_size=4, max_batch=2, runner_cls=static_runner(2))
    cache, draft = engine.cache, StaticDraft(model, 1)
    for b in range(2):
        cache.add_sequence(b)
        cache.ensure(b, 12)
    start = torch.tensor([0, 0])
    with torch.no_grad():
        full_h, full_logits = model.mtp_forward(1, prev, ids, cache=cache.view([0, 1], start, 12), start_pos=start)
    for lengths, width in (([9, 5], 1), ([7, 8], 3)):
        table = torch.tensor([cache.block_tables[b] for b in range(2)])
        window = torch.tensor(lengths)[:, None] + torch.arange(width)[None, :]
        with torch.no_grad():
            h, logits, rows = draft(prev.gather(1, window[..., None].expand(-1, -1, D)), ids.gather(1, window),
                                    torch.tensor(lengths), table, cache.pool_LNbX)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(h[b], full_h[b, n : n + width], rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(logits[b], full_logits[b, n : n + width], rtol=1e-6, atol=1e-8)
            slots = [cache.block_tables[b][p // 4] * 4 + p % 4 for p in range(n, n + width)]
            written = cache.pool_LNbX[L].view(-1, cache.width)[slots]  # what mtp_forward wrote there
            torch.testing.assert_close(rows[b], written, rtol=1e-6, atol=1e-8)


def test_batches_past_the_gather_limit_run_the_reference(trained_tiny_mtp2, monkeypatch):
    """A batch whose cached rows per layer exceed MAX_STATIC_GATHER_BYTES decodes, verifies and drafts through
    the reference runner (same tokens), and one under it through the static steps."""
    from latentmoe.infer import compiled_runner

    model = trained_tiny_mtp2
    prompts = random_prompts(model.config.vocab_size, 3, seed=4, longest=12)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    spec = SpeculativeConfig(1)
    reference = Engine(model, block_size=4, max_batch=4).generate(prompts, params, speculative=spec)
    calls: list[str] = []
    for cls in (StaticStep, StaticDraft):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _f=forward, _n=cls.__name__: calls.append(_n) or
                            _f(self, *a))
    monkeypatch.setattr(compiled_runner, "MAX_STATIC_GATHER_BYTES", 0)
    engine = Engine(model, block_size=4, max_batch=4, runner_cls=static_runner(4))
    assert [r.token_ids for r in engine.generate(prompts, params, speculative=spec)] == \
        [r.token_ids for r in reference]
    assert calls == []
    monkeypatch.setattr(compiled_runner, "MAX_STATIC_GATHER_BYTES", 2**30)
    assert [r.token_ids for r in engine.generate(prompts, params, speculative=spec)] == \
        [r.token_ids for r in reference]
    assert {"StaticStep", "StaticDraft"} <= set(calls)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_speculative_tokens_do_not_depend_on_the_batch(trained_tiny_mtp2):
    """A request near its end (no drafts left) no longer stops its batch-mates from drafting: each request's
    drafts and acceptances are the same alone and in a batch."""
    model = trained_tiny_mtp2
    prompts = random_prompts(model.config.vocab_size, 6, seed=11, longest=8)
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (1, 2, 9, 15, 3, 12)]
    spec = SpeculativeConfig(2)
    together = Engine(model, block_size=4, max_batch=6).generate(prompts, params, speculative=spec)
    for prompt, p, batched in zip(prompts, params, together, strict=True):
        alone = Engine(model, block_size=4, max_batch=1).generate([prompt], p, speculative=spec)[0]
        assert alone.token_ids == batched.token_ids
        assert alone.stats.drafted_per_position == batched.stats.drafted_per_position
        assert alone.stats.accepted_per_position == batched.stats.accepted_per_position


def test_static_step_logits_equal_the_model_forward():
    """The folded weights and the two-part softmax (cached rows, then the new ones) give the model's logits."""
    torch.manual_seed(1)
    model = CausalLM(ModelConfig.from_preset("tiny")).double().eval()
    ids = torch.randint(2, model.config.vocab_size, (3, 13))
    with torch.no_grad():
        expected = model(ids, compute_mtp=False).logits
    engine = Engine(model, block_size=4, max_batch=4, runner_cls=static_runner(4))
    step = StaticStep(model)
    cache = engine.cache
    n_cached = [6, 9, 12]  # cache rows from a reference prefill, then the step feeds one or two more tokens
    for b, n in enumerate(n_cached):
        cache.add_sequence(b)
        cache.ensure(b, n + 1)
        start = torch.tensor([0])
        with torch.no_grad():
            model(ids[b : b + 1, :n], cache=cache.view([b], start, n), start_pos=start, compute_mtp=False)
    table = torch.tensor([cache.block_tables[b][:4] + [0] * (4 - len(cache.block_tables[b][:4])) for b in range(3)])
    lengths = torch.tensor(n_cached)
    new_ids = torch.stack([ids[b, n : n + 1] for b, n in enumerate(n_cached)])
    with torch.no_grad():
        logits, _, rows = step(new_ids, lengths, table, cache.pool_LNbX)
        one_row, _, _ = step(new_ids[:1], lengths[:1], table[:1], cache.pool_LNbX)  # the head as a reduction
    for b, n in enumerate(n_cached):
        torch.testing.assert_close(logits[b, 0], expected[b, n], rtol=1e-10, atol=1e-10)
    # one row: the fp32 router's matrix-vector product rounds unlike the forward's matrix product (1e-9 here)
    torch.testing.assert_close(one_row[0, 0], expected[0, n_cached[0]], rtol=1e-6, atol=1e-8)
    assert rows.shape == (model.config.num_hidden_layers, 3, 1, cache.width)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # compiling takes 1-2 minutes on a quiet 2-core machine, far longer on a busy one
def test_compiled_step_equals_the_eager_step_and_keeps_greedy_tokens(trained_tiny_mtp2, monkeypatch):
    """torch.compile (inductor) of the static step and the static draft: outputs within 1e-5 relative of the
    same steps run eagerly (fp32), and greedy tokens identical to the reference runner, plain and speculative.
    One block bucket keeps it to a few graphs (decode, verify and draft per batch bucket reached); the eager
    tests above cover the other shapes."""
    model = CausalLM(trained_tiny_mtp2.config)
    model.load_state_dict(trained_tiny_mtp2.state_dict())
    model = model.float().eval()
    prompts = random_prompts(model.config.vocab_size, 4, seed=2, longest=8)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    block = 32  # every length here stays in one block: one block bucket
    engine = Engine(model, block_size=block, max_batch=4, runner_cls=static_runner(4, compile=True))
    compiled = engine.runner
    reference = Engine(model, block_size=block, max_batch=4)
    assert [r.token_ids for r in engine.generate(prompts, params)] == \
        [r.token_ids for r in reference.generate(prompts, params)]
    spec = SpeculativeConfig(1)
    assert [r.token_ids for r in engine.generate(prompts, params, speculative=spec)] == \
        [r.token_ids for r in reference.generate(prompts, params)]
    if compiled.fallback_reason is not None:
        pytest.fail(f"torch.compile is unavailable here: {compiled.fallback_reason}")
    graphs = set(compiled.compile_seconds)
    assert {(S, N) for _, S, N in (k for k in graphs if k[0] != "mtp1")} == {(1, 1), (2, 1)}  # decode, verify
    assert {k[0] for k in graphs} - {1, 2, 4} == {"mtp1"}  # and the draft windows of MTP module 1
    # the compiled graph against the same step run eagerly, on live cache contents
    cache = engine.cache
    cache.add_sequence("x")
    cache.ensure("x", 20)
    ids = torch.tensor([prompts[0] + [5] * (20 - len(prompts[0]))])
    start = torch.tensor([0])
    with torch.no_grad():
        model(ids, cache=cache.view(["x"], start, 20), start_pos=start, compute_mtp=False)
        args = (torch.tensor([[7]] * 4), torch.tensor([20, 19, 3, 0]), torch.tensor([cache.block_tables["x"][:1]] * 4),
                cache.pool_LNbX)
        eager = compiled.step(*args)
        fast = compiled._compiled(*args)
        draft_args = (torch.randn(4, 2, model.config.hidden_size), torch.tensor([[7, 8]] * 4), *args[1:])
        eager_draft = compiled.drafts[0](*draft_args)
        fast_draft = compiled._compiled_drafts[0](*draft_args)
    for a, b in [*zip(fast, eager, strict=True), *zip(fast_draft, eager_draft, strict=True)]:
        assert ((a - b).norm() / b.norm()).item() <= 1e-5
    # large gathers call aten's copy as an opaque op inside the graph: the same step with every gather so
    monkeypatch.setattr(decode_step, "EXTERN_GATHER_BYTES", 0)
    extern = torch.compile(StaticStep(model), dynamic=False, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(extern(*args), eager, strict=True):
            assert ((a - b).norm() / b.norm()).item() <= 1e-5
