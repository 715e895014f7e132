import pytest
from tokenizers import Tokenizer

import latentmoe.data.tokenizer as tokenizer_module
from latentmoe.data import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    load_or_train_tokenizer,
    split_documents,
    tokenizer_digest,
    train_tokenizer,
)
from latentmoe.data.tokenizer import MIN_VOCAB_SIZE, tokenizer_cache_path

from .conftest import SMALL_VOCAB


def test_special_tokens_have_ids_0_1_2(small_tokenizer):
    assert (BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2)
    assert small_tokenizer.token_to_id(BOS_TOKEN) == 0
    assert small_tokenizer.token_to_id(EOS_TOKEN) == 1
    assert small_tokenizer.token_to_id(PAD_TOKEN) == 2
    assert small_tokenizer.encode(f"{BOS_TOKEN}Ay{EOS_TOKEN}").ids[0] == BOS_ID


def test_round_trip_of_corpus_text_and_arbitrary_unicode(small_tokenizer, small_splits):
    for text in (*small_splits.val_parts, "  naïve café — 東京\n\ttabs\r\n  and trailing spaces   "):
        ids = small_tokenizer.encode(text, add_special_tokens=False).ids
        assert small_tokenizer.decode(ids) == text


def test_bpe_compresses_the_text(small_tokenizer, small_splits):
    text = small_splits.val
    assert len(small_tokenizer.encode(text).ids) < 0.6 * len(text.encode("utf-8"))


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, SMALL_VOCAB])
def test_vocab_size_is_an_upper_bound(small_splits, vocab_size):
    tokenizer = train_tokenizer(small_splits.train_parts, vocab_size)
    assert tokenizer.get_vocab_size() <= vocab_size
    assert tokenizer.get_vocab_size() == vocab_size  # 120 kB of text has merges to spare


def test_vocab_below_bytes_plus_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("some text", MIN_VOCAB_SIZE - 1)


def test_training_is_deterministic(small_splits, small_tokenizer):
    again = train_tokenizer(small_splits.train_parts, SMALL_VOCAB)
    assert tokenizer_digest(again) == tokenizer_digest(small_tokenizer)


def test_cached_tokenizer_is_reused_without_retraining(small_splits, tmp_path, monkeypatch):
    first = load_or_train_tokenizer(SMALL_VOCAB, tmp_path, splits=small_splits)
    path = tokenizer_cache_path(tmp_path, SMALL_VOCAB, small_splits.digest)
    assert path.name == f"tokenizer-v{SMALL_VOCAB}-{small_splits.digest[:12]}.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no temp files left behind"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    second = load_or_train_tokenizer(SMALL_VOCAB, tmp_path, splits=small_splits)
    assert tokenizer_digest(second) == tokenizer_digest(first)
    assert tokenizer_digest(Tokenizer.from_file(str(path))) == tokenizer_digest(first)


def test_tokenizer_is_trained_on_train_text_only(tmp_path):
    # The rare word is only in the validation part; the train text alone would never merge it.
    train = "the cat sat on the mat\n" * 200
    splits = split_documents({"doc": train + "zyxwvuts zyxwvuts zyxwvuts\n"}, val_fraction=0.05)
    assert "zyxw" in splits.val and "zyxw" not in splits.train
    tokenizer = load_or_train_tokenizer(MIN_VOCAB_SIZE + 20, tmp_path, splits=splits)
    assert not any("zy" in token for token in tokenizer.get_vocab())
