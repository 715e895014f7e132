"""Data: sources of text, tokenizers, token shards on disk, and the batches the trainer reads.

Two paths lead from text to batches. The in-memory path (the shipped corpus, small texts)::

    splits = load_corpus()                                   # corpus.py: train / val text
    tokenizer = load_or_train_tokenizer(4096, cache_dir)     # tokenizer.py: byte-level BPE
    tokens = encode_splits(tokenizer, splits, cache_dir)     # batching.py: [N] int64 streams
    batch_BT = random_windows(tokens.train, batch_size=8, seq_len=256, seed=0, step=k)

and the prepared-dataset path (any size; docs/data.md)::

    prepare_data(["corpus/"], "data/mine", tokenizer="train", vocab_size=16384)   # prepare.py
    data = TokenDataset.open("data/mine")                                         # dataset.py
    batch_BT = data.batch(k, batch_size=8, seq_len=256, seed=0)

The shipped corpus is one dataset prepared that way (:func:`prepare_shipped_corpus`), with the same
token streams as the in-memory path. Names are imported on first use, so the tokenising workers of
:func:`prepare_data` (numpy + tokenizers) never import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentmoe.data.batching import (
        TokenSplits,
        encode_documents,
        encode_splits,
        random_windows,
        unigram_cross_entropy,
        val_batches,
    )
    from latentmoe.data.corpus import CorpusSplits, load_corpus, split_documents, split_point
    from latentmoe.data.dataset import SAMPLING_MODES, TokenDataset
    from latentmoe.data.prepare import PrepareProgress, PrepareResult, prepare_data, prepare_shipped_corpus
    from latentmoe.data.shards import DatasetError
    from latentmoe.data.sources import DataSourceError, Document, SourceFile, find_sources, read_documents
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

# name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(
        ("TokenSplits", "encode_documents", "encode_splits", "random_windows", "unigram_cross_entropy", "val_batches"),
        "batching",
    ),
    **dict.fromkeys(("CorpusSplits", "load_corpus", "split_documents", "split_point"), "corpus"),
    **dict.fromkeys(("SAMPLING_MODES", "TokenDataset"), "dataset"),
    **dict.fromkeys(("PrepareProgress", "PrepareResult", "prepare_data", "prepare_shipped_corpus"), "prepare"),
    "DatasetError": "shards",
    **dict.fromkeys(("DataSourceError", "Document", "SourceFile", "find_sources", "read_documents"), "sources"),
    **dict.fromkeys(
        (
            "BOS_ID",
            "BOS_TOKEN",
            "EOS_ID",
            "EOS_TOKEN",
            "PAD_ID",
            "PAD_TOKEN",
            "SPECIAL_TOKENS",
            "load_or_train_tokenizer",
            "tokenizer_digest",
            "train_tokenizer",
        ),
        "tokenizer",
    ),
}

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "CorpusSplits",
    "DataSourceError",
    "DatasetError",
    "Document",
    "EOS_ID",
    "EOS_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "PrepareProgress",
    "PrepareResult",
    "SAMPLING_MODES",
    "SPECIAL_TOKENS",
    "SourceFile",
    "TokenDataset",
    "TokenSplits",
    "encode_documents",
    "encode_splits",
    "find_sources",
    "load_corpus",
    "load_or_train_tokenizer",
    "prepare_data",
    "prepare_shipped_corpus",
    "random_windows",
    "read_documents",
    "split_documents",
    "split_point",
    "tokenizer_digest",
    "train_tokenizer",
    "unigram_cross_entropy",
    "val_batches",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'latentmoe.data' has no attribute {name!r}")
    return getattr(import_module(f"latentmoe.data.{module}"), name)


def __dir__() -> list[str]:
    return __all__
