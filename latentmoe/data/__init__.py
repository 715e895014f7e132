"""Data: the shipped corpus, its tokenizer, and the batches the trainer reads.

Text flows through three modules, each usable alone::

    splits = load_corpus()                                   # corpus.py: train / val text
    tokenizer = load_or_train_tokenizer(4096, cache_dir)     # tokenizer.py: byte-level BPE
    tokens = encode_splits(tokenizer, splits, cache_dir)     # batching.py: [N] int64 streams
    batch_BT = random_windows(tokens.train, batch_size=8, seq_len=256, seed=0, step=k)
"""

from latentmoe.data.batching import (
    TokenSplits,
    encode_documents,
    encode_splits,
    random_windows,
    unigram_cross_entropy,
    val_batches,
)
from latentmoe.data.corpus import CorpusSplits, load_corpus, split_documents, split_point
from latentmoe.data.tokenizer import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    load_or_train_tokenizer,
    tokenizer_digest,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "CorpusSplits",
    "TokenSplits",
    "encode_documents",
    "encode_splits",
    "load_corpus",
    "load_or_train_tokenizer",
    "random_windows",
    "split_documents",
    "split_point",
    "tokenizer_digest",
    "train_tokenizer",
    "unigram_cross_entropy",
    "val_batches",
]
