"""The paged latent cache against a contiguous reference: contents, model logits, bytes, FP8, block reuse."""

import math
import random

import pytest
import torch

from latentmoe import ModelConfig
from latentmoe.infer import Engine
from latentmoe.infer.paged_cache import (
    BlockAllocator,
    PagedLatentCache,
    dequantize_fp8_rows,
    quantize_fp8_rows,
)

FP8_ROW_REL_ERR = 2**-4  # E4M3 keeps 3 mantissa bits: each element within half an ulp (2^-4 relative)
FP8_LOGITS_REL_ERR = 0.05  # stated tolerance of logits decoded from an FP8 cache against an fp32 one


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_paged_contents_with_random_lengths_and_block_sizes_equal_contiguous(block_size):
    """Chunks of random sequences written in interleaved order read back exactly as dense tensors."""
    config = ModelConfig.from_preset("tiny")
    rng = random.Random(block_size)
    lengths = [rng.randint(1, 150) for _ in range(5)]
    blocks = sum(math.ceil(n / block_size) for n in lengths)
    cache = PagedLatentCache(config, num_layers=2, num_blocks=blocks, block_size=block_size)
    C, R = config.kv_lora_rank, config.qk_rope_head_dim
    dense = {s: (torch.randn(2, n, C), torch.randn(2, n, R)) for s, n in enumerate(lengths)}
    written = dict.fromkeys(dense, 0)
    for s in dense:
        cache.add_sequence(s)
    while any(written[s] < lengths[s] for s in dense):
        s = rng.choice([s for s in dense if written[s] < lengths[s]])
        start = written[s]
        chunk = rng.randint(1, lengths[s] - start)
        cache.ensure(s, start + chunk)
        view = cache.view([s], torch.tensor([start]), chunk)
        for layer in range(2):
            kv, kr = dense[s][0][layer, start : start + chunk], dense[s][1][layer, start : start + chunk]
            got_kv, got_kr = view.write(layer, view.start_pos_B, kv[None], kr[None])
            assert torch.equal(got_kv[0], dense[s][0][layer, : start + chunk])  # the cached prefix comes back
            assert torch.equal(got_kr[0], dense[s][1][layer, : start + chunk])
        written[s] += chunk
    assert cache.num_free_blocks == 0  # memory grew exactly with the tokens held
    for s, n in enumerate(lengths):
        for layer in range(2):
            kv, kr = cache.read(layer, s, n)
            assert torch.equal(kv, dense[s][0][layer]) and torch.equal(kr, dense[s][1][layer])


@pytest.mark.parametrize("block_size, attention", [(1, "absorbed"), (5, "materialised"), (64, "auto")])
def test_batched_paged_decode_equals_contiguous_cache_per_sequence(random_tiny, block_size, attention):
    """Sequences of different lengths decoded in one batch over the paged cache give the logits each gets
    alone over the contiguous LatentCache."""
    model, config = random_tiny, random_tiny.config
    rng = random.Random(block_size)
    lengths = [rng.randint(1, 40) for _ in range(4)]
    steps = 6
    seqs = [torch.randint(0, config.vocab_size, (n + steps,)) for n in lengths]
    cache = PagedLatentCache(config, num_layers=config.num_hidden_layers, num_blocks=200, block_size=block_size)
    paged_logits = [[] for _ in seqs]
    with torch.no_grad():
        for s, (ids, n) in enumerate(zip(seqs, lengths, strict=True)):
            cache.add_sequence(s)
            cache.ensure(s, n)
            start = torch.tensor([0])
            out = model(ids[None, :n], cache=cache.view([s], start, n), start_pos=start, attention=attention)
            paged_logits[s].append(out.logits[0])
        for t in range(steps):
            starts = torch.tensor([n + t for n in lengths])
            for s, n in enumerate(lengths):
                cache.ensure(s, n + t + 1)
            ids = torch.stack([seq[n + t : n + t + 1] for seq, n in zip(seqs, lengths, strict=True)])
            view = cache.view(list(range(len(seqs))), starts, 1)
            out = model(ids, cache=view, start_pos=starts, attention=attention)
            for s in range(len(seqs)):
                paged_logits[s].append(out.logits[s])
        for s, (ids, n) in enumerate(zip(seqs, lengths, strict=True)):
            ref_cache = model.new_cache(batch_size=1, max_length=n + steps)
            ref = [model(ids[None, :n], cache=ref_cache, start_pos=0).logits[0]]
            ref += [model(ids[None, t : t + 1], cache=ref_cache, start_pos=t).logits[0] for t in range(n, n + steps)]
            torch.testing.assert_close(torch.cat(paged_logits[s]), torch.cat(ref), rtol=1e-4, atol=1e-5)


def test_truncate_and_free_return_blocks_to_the_pool():
    config = ModelConfig.from_preset("tiny")
    cache = PagedLatentCache(config, num_layers=1, num_blocks=10, block_size=4)
    cache.add_sequence("a")
    cache.ensure("a", 13)  # 4 blocks
    assert cache.num_free_blocks == 6
    cache.truncate("a", 5)  # positions 0..4 need 2 blocks
    assert cache.num_free_blocks == 8 and len(cache.block_tables["a"]) == 2
    cache.free("a")
    assert cache.num_free_blocks == 10 and "a" not in cache.block_tables


def test_allocator_runs_out_with_memory_error_and_recovers():
    alloc = BlockAllocator(3)
    got = alloc.allocate(3)
    with pytest.raises(MemoryError, match="free blocks"):
        alloc.allocate(1)
    alloc.release(got[:1])
    assert alloc.allocate(1) == got[:1]


@pytest.mark.parametrize("dtype, bytes_per_element, scale_bytes", [("fp32", 4, 0), ("bf16", 2, 0), ("fp8", 1, 4)])
def test_engine_cache_bytes_per_token_equals_formula(random_tiny, dtype, bytes_per_element, scale_bytes):
    c = random_tiny.config
    engine = Engine(random_tiny, cache_dtype=dtype, num_blocks=4)
    expected = c.num_hidden_layers * ((c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_element + scale_bytes)
    assert engine.cache_bytes_per_token() == expected
    with_mtp = (c.num_hidden_layers + c.num_nextn_predict_layers) * expected // c.num_hidden_layers
    assert engine.cache_bytes_per_token(include_mtp=True) == with_mtp


def test_deepseek_v3_cache_is_70272_bytes_per_token_in_bf16():
    """Paper §2 (ISCA Table 1): (512 + 64) × 61 layers × 2 bytes; FP8 halves it (+ a 4-byte scale per layer)."""
    v3 = ModelConfig.from_preset("deepseek-v3")
    bf16 = PagedLatentCache(v3, num_layers=v3.num_hidden_layers, num_blocks=1, block_size=1, dtype="bf16")
    assert bf16.bytes_per_token() == 70_272
    fp8 = PagedLatentCache(v3, num_layers=v3.num_hidden_layers, num_blocks=1, block_size=1, dtype="fp8")
    assert fp8.bytes_per_token() == 61 * (576 + 4)


def test_fp8_rows_round_trip_within_half_an_ulp():
    torch.manual_seed(0)
    x = torch.randn(64, 80) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = dequantize_fp8_rows(q, scale, torch.float32)
    normal = x.abs() >= scale[:, None] * torch.finfo(torch.float8_e4m3fn).smallest_normal
    assert ((back - x).abs() <= FP8_ROW_REL_ERR * x.abs() + 1e-30)[normal].all()
    assert torch.equal(quantize_fp8_rows(torch.zeros(2, 8))[0].float(), torch.zeros(2, 8))  # no NaN from 0/0


def test_fp8_cache_logits_stay_within_stated_tolerance(random_tiny):
    model, config = random_tiny, random_tiny.config
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, 48))
    logits = {}
    with torch.no_grad():
        for dtype in ("fp32", "fp8"):
            cache = PagedLatentCache(config, num_layers=config.num_hidden_layers, num_blocks=4, block_size=16,
                                     dtype=dtype)
            cache.add_sequence(0)
            cache.ensure(0, 48)
            start = torch.tensor([0])
            steps = [model(ids[:, :32], cache=cache.view([0], start, 32), start_pos=start).logits]
            for t in range(32, 48):
                start = torch.tensor([t])
                steps.append(model(ids[:, t : t + 1], cache=cache.view([0], start, 1), start_pos=start).logits)
            logits[dtype] = torch.cat(steps, dim=1)
    err = rel_err(logits["fp8"], logits["fp32"])
    assert 0 < err < FP8_LOGITS_REL_ERR


def test_bad_cache_dtype_names_the_field(random_tiny):
    with pytest.raises(ValueError, match="cache_dtype"):
        Engine(random_tiny, cache_dtype="int4")


@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_copy_prefix_gives_the_destination_the_same_rows(dtype):
    config = ModelConfig.from_preset("tiny")
    cache = PagedLatentCache(config, num_layers=2, num_blocks=8, block_size=4, dtype=dtype)
    cache.add_sequence("src")
    cache.add_sequence("dst")
    cache.ensure("src", 10)
    view = cache.view(["src"], torch.tensor([0]), 10)
    for layer in range(2):
        view.write(layer, view.start_pos_B, torch.randn(1, 10, config.kv_lora_rank),
                   torch.randn(1, 10, config.qk_rope_head_dim))
    cache.copy_prefix("src", "dst", 10, num_layers=1)
    assert cache.block_tables["dst"] != cache.block_tables["src"][: len(cache.block_tables["dst"])]
    for a, b in zip(cache.read(0, "src", 10), cache.read(0, "dst", 10), strict=True):
        assert torch.equal(a, b)
