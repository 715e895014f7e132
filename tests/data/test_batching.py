import math

import pytest
import torch

from latentmoe.data import (
    BOS_ID,
    EOS_ID,
    encode_splits,
    random_windows,
    unigram_cross_entropy,
    val_batches,
)


def test_encode_splits_frames_each_document_with_bos_and_eos(small_tokenizer, small_splits):
    tokens = encode_splits(small_tokenizer, small_splits)
    for stream_N, parts in ((tokens.train, small_splits.train_parts), (tokens.val, small_splits.val_parts)):
        assert stream_N.dtype == torch.int64 and stream_N.dim() == 1
        bos_positions = (stream_N == BOS_ID).nonzero().flatten().tolist()
        eos_positions = (stream_N == EOS_ID).nonzero().flatten().tolist()
        assert bos_positions[0] == 0 and eos_positions[-1] == len(stream_N) - 1
        assert len(bos_positions) == len(eos_positions) == len(parts)
        for start, end, text in zip(bos_positions, eos_positions, parts, strict=True):
            assert small_tokenizer.decode(stream_N[start + 1 : end].tolist()) == text


def test_random_windows_depend_only_on_seed_and_step():
    ids_N = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    kwargs = dict(batch_size=4, seq_len=16)
    first = random_windows(ids_N, seed=3, step=7, **kwargs)
    torch.manual_seed(123)
    torch.rand(10)  # global RNG traffic and earlier draws must not matter
    random_windows(ids_N, seed=3, step=6, **kwargs)
    again = random_windows(ids_N, seed=3, step=7, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, random_windows(ids_N, seed=3, step=8, **kwargs))
    assert not torch.equal(first, random_windows(ids_N, seed=4, step=7, **kwargs))


def test_random_windows_are_contiguous_in_range_slices_of_the_stream():
    n, seq_len = 200, 32
    positions_N = torch.arange(n, dtype=torch.int32)  # ids equal to their positions
    for step in range(20):
        batch_BT = random_windows(positions_N, batch_size=8, seq_len=seq_len, seed=0, step=step)
        assert batch_BT.shape == (8, seq_len) and batch_BT.dtype == torch.int64
        starts_B = batch_BT[:, 0]
        assert torch.equal(batch_BT, starts_B[:, None] + torch.arange(seq_len))
        assert int(starts_B.min()) >= 0 and int(starts_B.max()) <= n - seq_len
    # With a stream exactly seq_len long the only window is the whole stream.
    whole = random_windows(positions_N[:seq_len], batch_size=2, seq_len=seq_len, seed=1, step=0)
    assert torch.equal(whole, positions_N[:seq_len].long().expand(2, -1))


def test_random_windows_reject_a_stream_shorter_than_a_window():
    with pytest.raises(ValueError, match="shorter"):
        random_windows(torch.arange(5), batch_size=1, seq_len=6, seed=0, step=0)


def test_val_batches_are_evenly_spaced_non_overlapping_and_fixed():
    positions_N = torch.arange(105)  # 10 slots of 10 tokens; the last 5 tokens are never used
    batches = val_batches(positions_N, batch_size=3, seq_len=10, max_batches=2)
    # W = 6 of S = 10 slots: floor(i * 10 / 6) = 0, 1, 3, 5, 6, 8.
    assert [b.shape for b in batches] == [(3, 10), (3, 10)]
    starts = torch.cat(batches)[:, 0].tolist()
    assert starts == [0, 10, 30, 50, 60, 80]
    assert all(
        torch.equal(a, b) for a, b in zip(batches, val_batches(positions_N, batch_size=3, seq_len=10, max_batches=2))
    )
    every_slot = val_batches(positions_N, batch_size=3, seq_len=10, max_batches=100)
    assert [b.shape[0] for b in every_slot] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(every_slot).flatten(), torch.arange(100))


def test_unigram_cross_entropy_matches_a_hand_computed_value():
    # train [0, 0, 1], V = 3, add-one: p = (2+1, 1+1, 0+1) / (3+3) = (1/2, 1/3, 1/6).
    train = torch.tensor([0, 0, 1])
    # eval [0, 1, 2]: -(ln 1/2 + ln 1/3 + ln 1/6) / 3 = ln(36) / 3.
    assert unigram_cross_entropy(train, torch.tensor([0, 1, 2]), 3) == pytest.approx(math.log(36) / 3)
    assert unigram_cross_entropy(train, torch.tensor([[0], [0]]), 3) == pytest.approx(math.log(2))
    # Empty train set: uniform over V.
    assert unigram_cross_entropy(torch.tensor([], dtype=torch.int64), torch.tensor([2]), 4) == pytest.approx(
        math.log(4)
    )
    with pytest.raises(ValueError, match="outside"):
        unigram_cross_entropy(train, torch.tensor([3]), 3)


def test_the_shipped_corpus_cache_is_keyed_by_the_tokenizer(small_tokenizer, small_splits, tmp_path):
    """Two tokenizers of the same vocabulary size, one cache directory: each gets its own prepared corpus (the
    name carries the tokenizer's digest), never the other's."""
    from latentmoe.data.prepare import shipped_corpus_dir
    from latentmoe.data.tokenizer import tokenizer_digest, train_tokenizer

    other = train_tokenizer(small_splits.train_parts[:1], 512)
    assert tokenizer_digest(other) != tokenizer_digest(small_tokenizer)
    first = shipped_corpus_dir(tmp_path, 512, small_tokenizer, small_splits.digest)
    second = shipped_corpus_dir(tmp_path, 512, other, small_splits.digest)
    assert first != second and first.parent == second.parent == tmp_path
