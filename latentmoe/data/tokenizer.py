"""Byte-level BPE tokenizer, trained on the corpus's training split with Hugging Face ``tokenizers``.

How it works
------------
1. **Bytes, not characters.** The ``ByteLevel`` pre-tokenizer maps every UTF-8 byte to one of
   256 printable stand-in characters (GPT-2's trick) after splitting the text into words with
   GPT-2's regex (a word keeps its leading space: ``" the"``). Because all 256 bytes are in the
   initial alphabet, *any* string can be encoded, and the ``ByteLevel`` decoder maps the
   stand-ins back to bytes, so ``decode(encode(text)) == text`` exactly.
2. **Merges.** BPE starts from those 256 byte symbols and repeatedly merges the most frequent
   adjacent pair inside words, adding one token per merge, until the vocabulary reaches
   ``vocab_size`` (or no pair is left to merge, on small texts).
3. **Special tokens** come first, so their ids are fixed whatever the text: ``<|bos|>`` = 0,
   ``<|eos|>`` = 1, ``<|pad|>`` = 2 — the ``bos_token_id`` / ``eos_token_id`` of the model
   presets. :mod:`latentmoe.data.batching` puts BOS before and EOS after every document.

The trained vocabulary has at most ``vocab_size`` entries (specials and the 256 bytes
included); :func:`train_tokenizer` raises if it would not. :func:`load_or_train_tokenizer`
caches the result as ``tokenizer-v{vocab_size}-{corpus_digest[:12]}.json``, so a changed corpus
or split gets a fresh tokenizer and an unchanged one is never retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from latentmoe.data.corpus import CorpusSplits, load_corpus

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: the trainer gives special tokens the first ids, in this order.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE


def _empty_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: no space is invented before the first word, so decoding is exact.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(text: str | Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most ``vocab_size`` tokens on ``text``.

    text: one string, or an iterable of strings (e.g. one per document; pairs are never
        merged across two strings).
    vocab_size: upper bound on the vocabulary, special tokens and the 256 bytes included;
        must be at least ``MIN_VOCAB_SIZE`` (259).
    Returns a ``tokenizers.Tokenizer`` with ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (special tokens + 256 bytes), got {vocab_size}")
    texts = [text] if isinstance(text, str) else list(text)
    tokenizer = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    check_tokenizer(tokenizer, vocab_size)
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` fits ``vocab_size`` and has the fixed special ids."""
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual > vocab_size:
        raise ValueError(f"tokenizer has {actual} tokens, more than vocab_size={vocab_size}")
    for token, expected_id in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        if tokenizer.token_to_id(token) != expected_id:
            raise ValueError(f"{token} has id {tokenizer.token_to_id(token)}, expected {expected_id}")


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 hex digest of the tokenizer's JSON: the key for caches of encoded tokens."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def tokenizer_cache_path(cache_dir: Path, vocab_size: int, corpus_digest: str) -> Path:
    """Where :func:`load_or_train_tokenizer` keeps the tokenizer for this vocab size and corpus."""
    return Path(cache_dir) / f"tokenizer-v{vocab_size}-{corpus_digest[:12]}.json"


def load_or_train_tokenizer(vocab_size: int, cache_dir: Path, *, splits: CorpusSplits | None = None) -> Tokenizer:
    """The tokenizer for ``splits`` (default: the shipped corpus), trained once and cached.

    Trains on ``splits.train_parts`` (never on validation text) and saves the result to
    ``cache_dir/tokenizer-v{vocab_size}-{splits.digest[:12]}.json`` through a temporary file and
    ``os.replace``, so a concurrent reader sees either no file or a whole one. Later calls load it.
    """
    splits = load_corpus() if splits is None else splits
    path = tokenizer_cache_path(cache_dir, vocab_size, splits.digest)
    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
        check_tokenizer(tokenizer, vocab_size)
        return tokenizer
    tokenizer = train_tokenizer(splits.train_parts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return tokenizer


# ---------------------------------------------------------------------------------------------- bytes per token
PRINTABLE_BYTE_RANGES = ((ord("!"), ord("~")), (ord("\u00a1"), ord("\u00ac")), (ord("\u00ae"), ord("\u00ff")))


def byte_level_alphabet() -> dict[str, int]:
    """The stand-in character of every byte in a byte-level BPE (GPT-2's table), as ``{char: byte}``.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (controls, space, ...) are
    mapped in byte order onto the characters from U+0100 on."""
    printable = [b for low, high in PRINTABLE_BYTE_RANGES for b in range(low, high + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(BYTE_ALPHABET_SIZE) if b not in table.values())
    for n, b in enumerate(shifted):
        table[chr(BYTE_ALPHABET_SIZE + n)] = b
    return table


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` int64: how many bytes of UTF-8 text each token id stands for — what bits per byte divide
    by. Special tokens (BOS, EOS, pad, ...) and ids the tokenizer lacks stand for none.

    Exact for byte-level BPE tokenizers (ours, GPT-2's, DeepSeek's): each stand-in character is one byte. For
    other tokenizers each token is decoded on its own, which can miss a space a decoder adds between tokens."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    alphabet = byte_level_alphabet() if _is_byte_level(tokenizer) else None
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id >= vocab_size or token in specials:
            continue
        if alphabet is not None and all(ch in alphabet for ch in token):
            lengths[token_id] = len(token)
        elif alphabet is not None:  # an added (non-special) token is stored as its text
            lengths[token_id] = len(token.encode("utf-8"))
        else:
            lengths[token_id] = len(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))
    return lengths
