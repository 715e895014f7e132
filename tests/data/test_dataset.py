"""TokenDataset: windows and validation batches read from shards equal the in-memory reference; corrupt
datasets are one-line errors."""

import json

import numpy as np
import pytest
import torch

from latentmoe.data import DatasetError, TokenDataset, prepare_data, random_windows, val_batches
from latentmoe.data.shards import MANIFEST_NAME

from .formats import write_jsonl

SEQ = 32


@pytest.fixture(scope="module")
def many_shards(documents, tokenizer_file, tmp_path_factory):
    """~100 kB of text in a dozen shards, so windows cross shard boundaries."""
    root = tmp_path_factory.mktemp("many")
    source = write_jsonl(documents, root / "d.jsonl")
    result = prepare_data([source], root / "ds", tokenizer=tokenizer_file, val_fraction=0.2, shard_bytes=8_000)
    assert result.shards_total >= 10
    return result.out_dir


@pytest.fixture
def data(many_shards):
    return TokenDataset.open(many_shards)


def test_reads_equal_slices_of_the_whole_stream_across_shard_boundaries(data):
    for split in ("train", "val"):
        whole = data.ids(split).numpy()
        n = len(whole)
        ends = np.cumsum([r.train_tokens if split == "train" else r.val_tokens for r in data.records])
        edges = [0, n, *ends.tolist(), *(ends - 1).tolist(), *(ends + 1).tolist()]
        rng = np.random.default_rng(0)
        for start in [*edges, *rng.integers(0, n, 50).tolist()]:
            for length in (0, 1, SEQ, 3000):
                a, b = max(min(start, n), 0), min(max(start, 0) + length, n)
                assert (data.read(split, a, b) == whole[a:b]).all()
    with pytest.raises(IndexError):
        data.read("train", 0, data.train_tokens + 1)


def test_random_batches_equal_random_windows_over_the_stream(data):
    stream = data.ids("train")
    for step in (0, 1, 7, 1000):
        expected = random_windows(stream, batch_size=8, seq_len=SEQ, seed=3, step=step)
        got = data.batch(step, batch_size=8, seq_len=SEQ, seed=3)
        assert got.dtype == torch.int64 and torch.equal(got, expected)


def test_batch_at_step_k_does_not_depend_on_what_came_before(data, many_shards):
    kwargs = dict(batch_size=4, seq_len=SEQ, seed=11)
    fresh = TokenDataset.open(many_shards).batch(42, **kwargs)
    torch.manual_seed(5)
    torch.rand(3)  # global RNG traffic must not matter
    for step in range(42):
        data.batch(step, **kwargs)
    data.batch(42, batch_size=4, seq_len=SEQ, seed=12)
    assert torch.equal(data.batch(42, **kwargs), fresh)
    assert not torch.equal(data.batch(43, **kwargs), fresh)


def test_sequential_pass_walks_non_overlapping_slots_in_order_and_wraps(data):
    stream = data.ids("train")
    slots = len(stream) // SEQ
    batch = 6
    seen = torch.cat([data.batch(step, batch_size=batch, seq_len=SEQ, seed=0, sampling="sequential")
                      for step in range(slots // batch + 2)])
    expected = torch.stack([stream[(i % slots) * SEQ : (i % slots + 1) * SEQ] for i in range(len(seen))])
    assert torch.equal(seen, expected)
    assert torch.equal(seen[slots], stream[:SEQ]), "the second epoch starts at the beginning again"


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_ranks_read_their_rows_and_together_the_global_batch(data, sampling):
    kwargs = dict(batch_size=12, seq_len=SEQ, seed=2, sampling=sampling)
    for step in (0, 5):
        whole = data.batch(step, **kwargs)
        for world in (2, 3, 4):
            rows = [data.batch(step, rank=r, world_size=world, **kwargs) for r in range(world)]
            assert all(r.shape == (12 // world, SEQ) for r in rows)
            assert torch.equal(torch.cat(rows), whole)
    with pytest.raises(ValueError, match="multiple of the world size"):
        data.batch(0, rank=0, world_size=5, **kwargs)
    fn = data.batch_fn(rank=1, world_size=2, **kwargs)
    assert torch.equal(fn(5), data.batch(5, **kwargs)[6:])


def test_val_batches_equal_the_reference_over_the_validation_stream(data):
    got = data.val_batches(batch_size=5, seq_len=SEQ, max_batches=3)
    expected = val_batches(data.ids("val"), batch_size=5, seq_len=SEQ, max_batches=3)
    assert len(got) == len(expected) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_eval_batches_of_the_training_split_equal_the_reference_over_the_training_stream(data):
    got = data.val_batches(batch_size=5, seq_len=SEQ, max_batches=3, split="train")
    expected = val_batches(data.ids("train"), batch_size=5, seq_len=SEQ, max_batches=3)
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_document_starts_point_at_bos_and_eos_closes_each_document(data):
    for split in ("train", "val"):
        ids = data.ids(split)
        starts = data.document_starts(split)
        assert starts[0] == 0 and (np.diff(starts) > 1).all()
        assert (ids[torch.from_numpy(starts)] == data.bos_id).all()
        assert (ids[torch.from_numpy(starts[1:] - 1)] == data.eos_id).all() and ids[-1] == data.eos_id
    total_docs = sum(r.train_documents + r.val_documents for r in data.records)
    assert len(data.document_starts("train")) + len(data.document_starts("val")) == total_docs


def test_epochs_count_passes_over_the_training_stream(data):
    assert data.epochs(data.train_tokens * 3) == pytest.approx(3.0)


def test_model_vocabulary_check(data):
    data.check_model(data.vocab_size, bos_token_id=data.bos_id, eos_token_id=data.eos_id)
    data.check_model(data.vocab_size + 100)
    with pytest.raises(DatasetError) as excinfo:
        data.check_model(data.vocab_size - 1)
    message = str(excinfo.value)
    assert "\n" not in message and f"{data.vocab_size} tokens" in message
    assert f"vocab_size is {data.vocab_size - 1}" in message
    with pytest.raises(DatasetError, match="EOS id"):
        data.check_model(data.vocab_size, eos_token_id=data.eos_id + 7)


def test_too_little_validation_text_is_a_clear_error(data):
    with pytest.raises(DatasetError, match="fewer than seq_len"):
        data.val_batches(batch_size=1, seq_len=data.val_tokens + 1, max_batches=1)


# ------------------------------------------------------------------------------------------------ corruption
@pytest.fixture
def copy_of(many_shards, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(many_shards, target)
    return target


def expect_one_line(path, match, *, hashes=False):
    with pytest.raises(DatasetError) as excinfo:
        TokenDataset.open(path, verify_hashes=hashes)
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


def test_truncated_shard(copy_of):
    shard = copy_of / "shard-00003.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    message = expect_one_line(copy_of, "truncated")
    assert message.startswith(str(shard))


def test_flipped_byte_is_found_by_the_hash_check(copy_of):
    shard = copy_of / "shard-00002.tokens"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    TokenDataset.open(copy_of)  # sizes agree
    assert expect_one_line(copy_of, "SHA-256", hashes=True).startswith(str(shard))


def test_manifest_hash_that_does_not_match(copy_of):
    manifest = json.loads((copy_of / MANIFEST_NAME).read_text())
    manifest["shards"][1]["docs_sha256"] = "0" * 64
    (copy_of / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert expect_one_line(copy_of, "SHA-256", hashes=True).startswith(str(copy_of / "shard-00001.docs"))


def test_manifest_sizes_that_disagree(copy_of):
    manifest = json.loads((copy_of / MANIFEST_NAME).read_text())
    manifest["shards"][0]["tokens"] += 1
    (copy_of / MANIFEST_NAME).write_text(json.dumps(manifest))
    expect_one_line(copy_of, "manifest is damaged")


def test_missing_shard_and_missing_or_broken_manifest(copy_of):
    (copy_of / "shard-00004.docs").unlink()
    expect_one_line(copy_of, "missing")
    (copy_of / MANIFEST_NAME).write_text("{not json")
    expect_one_line(copy_of, "not valid JSON")
    (copy_of / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    expect_one_line(copy_of, "not a latentmoe dataset manifest")
    (copy_of / MANIFEST_NAME).unlink()
    expect_one_line(copy_of, "not a prepared dataset")


def test_shard_missing_from_the_manifest(copy_of):
    manifest = json.loads((copy_of / MANIFEST_NAME).read_text())
    del manifest["shards"][2]
    (copy_of / MANIFEST_NAME).write_text(json.dumps(manifest))
    expect_one_line(copy_of, "does not match the units")
