"""prepare-data: identical shards from every format, tokenizers given or trained, the shipped corpus, appends,
and a destination that is never damaged."""

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from latentmoe.data import (
    BOS_ID,
    EOS_ID,
    DatasetError,
    DataSourceError,
    TokenDataset,
    encode_documents,
    encode_splits,
    load_corpus,
    load_or_train_tokenizer,
    prepare_data,
    prepare_shipped_corpus,
    train_tokenizer,
)
from latentmoe.data.prepare import document_in_validation
from latentmoe.data.shards import LOCK_NAME, MANIFEST_NAME

from .formats import write_hf_dataset, write_jsonl, write_parquet, write_text_dir

VAL_FRACTION = 0.2


def independent_val_rule(text: str) -> bool:
    """The documented split rule, written out again: blake2b-64 of the UTF-8 text, little-endian, / 2**64."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return sum(b << (8 * i) for i, b in enumerate(h)) < VAL_FRACTION * 2**64


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*"))}


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def prepare(inputs, out, tokenizer_file, **kwargs):
    kwargs.setdefault("val_fraction", VAL_FRACTION)
    return prepare_data(inputs, out, tokenizer=kwargs.pop("tokenizer", tokenizer_file), **kwargs)


def test_every_format_gives_identical_shards_and_the_reference_streams(documents, tokenizer_file, tmp_path):
    inputs = {
        "text": write_text_dir(documents, tmp_path / "in" / "txt"),
        "jsonl": write_jsonl(documents, tmp_path / "in" / "d.jsonl"),
        "parquet": write_parquet(documents, tmp_path / "in" / "d.parquet"),
        "hf": write_hf_dataset(documents, tmp_path / "in" / "hf"),
    }
    digests = {}
    for name, path in inputs.items():
        prepare([path], tmp_path / name, tokenizer_file)
        digests[name] = shard_digests(tmp_path / name)
    assert digests["text"] and all(d == digests["text"] for d in digests.values())

    # The reference: encode_documents over the documents the stated rule puts in each split.
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    val_docs = [d for d in documents if independent_val_rule(d)]
    train_docs = [d for d in documents if not independent_val_rule(d)]
    assert 0 < len(val_docs) < len(documents) / 2
    data = TokenDataset.open(tmp_path / "jsonl", verify_hashes=True)
    assert torch.equal(data.ids("train"), encode_documents(tokenizer, train_docs))
    assert torch.equal(data.ids("val"), encode_documents(tokenizer, val_docs))
    assert data.manifest["dtype"] == "uint16"


def test_document_rule_is_the_stated_formula():
    for i in range(200):
        text = f"document {i}\n" * (i % 7 + 1)
        assert document_in_validation(text, VAL_FRACTION) == independent_val_rule(text)
    assert not document_in_validation("anything", 0.0)


def test_shard_size_and_workers_do_not_change_the_streams(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    one = prepare([source], tmp_path / "one", tokenizer_file)
    assert one.shards_total == 1
    many = prepare([source], tmp_path / "many", tokenizer_file, shard_bytes=10_000, encode_batch_bytes=3_000)
    assert many.shards_total > 5
    parallel = prepare([source], tmp_path / "par", tokenizer_file, shard_bytes=10_000, encode_batch_bytes=3_000,
                       workers=2)
    assert shard_digests(tmp_path / "par") == shard_digests(tmp_path / "many")
    a, b = TokenDataset.open(tmp_path / "one"), TokenDataset.open(tmp_path / "many")
    for split in ("train", "val"):
        assert torch.equal(a.ids(split), b.ids(split))
        assert (a.document_starts(split) == b.document_starts(split)).all()
    assert parallel.train_tokens == one.train_tokens and parallel.train_documents == one.train_documents


@pytest.mark.parametrize("given", ["file", "directory", "trained"])
def test_tokenizer_given_or_trained_round_trips_every_document(documents, tokenizer_file, tmp_path, given):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    spec = {"file": tokenizer_file, "directory": tokenizer_file.parent, "trained": "train"}[given]
    result = prepare([source], tmp_path / "out", spec, vocab_size=400, tokenizer_sample_bytes=50_000)
    data = TokenDataset.open(result.out_dir)
    tokenizer = data.tokenizer
    assert Path(result.tokenizer_path).is_file()
    if given == "trained":
        assert tokenizer.get_vocab_size() == 400 and data.manifest["tokenizer"]["origin"]["kind"] == "trained"
        assert (tokenizer.token_to_id("<|bos|>"), tokenizer.token_to_id("<|eos|>")) == (BOS_ID, EOS_ID)
    decoded = []
    for split in ("train", "val"):
        ids = data.ids(split)
        starts = [*data.document_starts(split).tolist(), len(ids)]
        for start, end in zip(starts[:-1], starts[1:]):
            assert ids[start] == BOS_ID and ids[end - 1] == EOS_ID
            decoded.append(tokenizer.decode(ids[start + 1 : end - 1].tolist()))
    assert sorted(decoded) == sorted(documents)


def test_trained_tokenizer_sees_only_training_text(tmp_path):
    # Training documents without the rare word, validation documents (by the split rule) full of it.
    train_docs = [d for d in (f"the cat sat on the mat {i}\n" * 30 for i in range(60)) if not independent_val_rule(d)]
    val_docs = [d for d in (f"zyxwvuts {i} " * 200 for i in range(40)) if independent_val_rule(d)]
    assert len(val_docs) >= 3 and len(train_docs) >= 30
    vocab_size = 300
    control = train_tokenizer([*train_docs, *val_docs], vocab_size)
    assert any("zy" in token for token in control.get_vocab()), "the marker is frequent enough to be merged"
    result = prepare([write_jsonl([*train_docs, *val_docs], tmp_path / "d.jsonl")], tmp_path / "out", None,
                     tokenizer="train", vocab_size=vocab_size)
    data = TokenDataset.open(result.out_dir)
    assert result.val_documents == len(val_docs)
    assert not any("zy" in token for token in data.tokenizer.get_vocab())


def test_tokenizer_config_names_bos_and_eos(documents, small_tokenizer, tmp_path):
    tokenizer = Tokenizer.from_str(small_tokenizer.to_str())
    tokenizer.add_special_tokens(["<s>", "</s>"])
    folder = tmp_path / "tok"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    result = prepare([write_jsonl(documents[:5], tmp_path / "d.jsonl")], tmp_path / "out", folder)
    data = TokenDataset.open(result.out_dir)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert (data.bos_id, data.eos_id) == (bos, eos)
    ids = data.ids("train")
    assert ids[0] == bos and ids[-1] == eos


def test_a_tokenizer_without_the_bos_token_is_refused(documents, small_tokenizer, tmp_path):
    source = write_jsonl(documents[:3], tmp_path / "d.jsonl")
    with pytest.raises(DatasetError, match="no BOS token '<s>'"):
        prepare([source], tmp_path / "out", small_tokenizer, bos_token="<s>")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.slow
def test_shipped_corpus_is_a_prepared_dataset_with_the_encode_splits_streams(tmp_path):
    vocab = 512
    data = prepare_shipped_corpus(tmp_path, vocab)
    reference = encode_splits(load_or_train_tokenizer(vocab, tmp_path), load_corpus())
    assert torch.equal(data.ids("train"), reference.train)
    assert torch.equal(data.ids("val"), reference.val)
    again = prepare_shipped_corpus(tmp_path, vocab)  # cached: opened, not prepared again
    assert again.path == data.path and again.manifest_sha256 == data.manifest_sha256


# ------------------------------------------------------------------------------------------------ re-runs
def test_a_rerun_skips_finished_shards_and_rewrites_nothing(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    first = prepare([source], tmp_path / "out", tokenizer_file, shard_bytes=20_000)
    before = tree_state(tmp_path / "out")
    again = prepare([source], tmp_path / "out", tokenizer_file, shard_bytes=20_000)
    assert (again.shards_written, again.shards_skipped) == (0, first.shards_total)
    after = tree_state(tmp_path / "out")
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME
    }


def test_a_truncated_shard_is_redone_by_a_rerun(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    prepare([source], tmp_path / "out", tokenizer_file, shard_bytes=20_000)
    digests = shard_digests(tmp_path / "out")
    victim = tmp_path / "out" / "shard-00001.tokens"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(DatasetError, match="truncated"):
        TokenDataset.open(tmp_path / "out")
    again = prepare([source], tmp_path / "out", tokenizer_file, shard_bytes=20_000)
    assert again.shards_written == 1
    assert shard_digests(tmp_path / "out") == digests
    TokenDataset.open(tmp_path / "out", verify_hashes=True)


def test_rerun_with_other_settings_or_changed_inputs_is_refused(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    out = tmp_path / "out"
    prepare([source], out, tokenizer_file)
    before = tree_state(out)
    with pytest.raises(DatasetError, match="text_field"):
        prepare([source], out, tokenizer_file, text_field="body")
    with pytest.raises(DatasetError, match="asked for a tokenizer trained with vocab_size=300"):
        prepare([source], out, "train", vocab_size=300)
    with open(source, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(DatasetError, match="changed since"):
        prepare([source], out, tokenizer_file)
    assert tree_state(out) == before
    redone = prepare([source], out, tokenizer_file, overwrite=True)
    assert redone.train_documents + redone.val_documents == len(documents) + 1


def test_append_adds_shards_after_the_existing_ones(documents, tokenizer_file, tmp_path):
    first_half = write_jsonl(documents[:30], tmp_path / "a.jsonl")
    second_half = write_jsonl(documents[30:], tmp_path / "b.jsonl")
    out = tmp_path / "out"
    prepare([first_half], out, tokenizer_file, shard_bytes=20_000)
    kept = shard_digests(out)
    result = prepare([first_half, second_half], out, None, shard_bytes=20_000, append=True)
    assert result.shards_written >= 1 and result.shards_skipped == len(kept) // 2  # .tokens + .docs per shard
    assert {k: v for k, v in shard_digests(out).items() if k in kept} == kept
    first_half.unlink()  # old sources are not needed to append again
    nothing = prepare([second_half], out, None, shard_bytes=20_000, append=True)
    assert nothing.shards_written == 0
    alone = TokenDataset.open(prepare([second_half], tmp_path / "alone", tokenizer_file).out_dir)
    appended = TokenDataset.open(out)
    # The appended stream is the first half's documents, then the second half's.
    for split in ("train", "val"):
        tail = alone.ids(split)
        assert torch.equal(appended.ids(split)[-len(tail) :], tail)
        assert appended.num_tokens(split) > alone.num_tokens(split)


# ------------------------------------------------------------------------------------------------ destination
def test_a_foreign_directory_is_refused_and_left_alone(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents[:5], tmp_path / "d.jsonl")
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = tree_state(out)
    with pytest.raises(DatasetError) as excinfo:
        prepare([source], out, tokenizer_file)
    assert "holds files latentmoe did not write (notes.txt)" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert tree_state(out) == before
    # overwrite=True writes beside their files and never removes them, now or on the next overwrite.
    prepare([source], out, tokenizer_file, overwrite=True)
    prepare([source], out, tokenizer_file, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    TokenDataset.open(out)


def test_overwrite_refuses_to_replace_a_file_of_theirs_with_our_name(documents, tokenizer_file, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "tokenizer.json").write_text("their tokenizer")
    with pytest.raises(DatasetError, match="not written by latentmoe"):
        prepare([write_jsonl(documents[:3], tmp_path / "d.jsonl")], out, tokenizer_file, overwrite=True)
    assert (out / "tokenizer.json").read_text() == "their tokenizer"


@pytest.mark.parametrize("problem", ["missing", "empty-dataset", "parquet-column"])
def test_bad_inputs_fail_before_the_destination_is_touched(documents, tokenizer_file, tmp_path, problem):
    if problem == "missing":
        inputs = [tmp_path / "nope"]
    elif problem == "empty-dataset":
        inputs = [write_hf_dataset([], tmp_path / "hf")]
    else:
        inputs = [write_parquet(documents[:3], tmp_path / "d.parquet", field="content")]
    with pytest.raises(DataSourceError) as excinfo:
        prepare(inputs, tmp_path / "out", tokenizer_file)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_a_second_concurrent_run_is_refused(documents, tokenizer_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(DatasetError, match="another prepare-data"):
            prepare([write_jsonl(documents[:3], tmp_path / "d.jsonl")], out, tokenizer_file)
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_a_bad_line_stops_the_run_and_the_dataset_stays_unusable(documents, tokenizer_file, tmp_path):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    with open(source, "a") as f:
        f.write("{broken\n")
    with pytest.raises(DataSourceError, match=f"line {len(documents) + 1}: not valid JSON"):
        prepare([source], tmp_path / "out", tokenizer_file)
    with pytest.raises(DatasetError, match="has not finished"):
        TokenDataset.open(tmp_path / "out")
