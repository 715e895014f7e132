"""Data: sources of text, tokenizers, token shards on disk, and the batches the trainer reads.

Training reads prepared datasets (any size; docs/data.md)::

    prepare_data(["corpus/"], "data/mine", tokenizer="train", vocab_size=16384)   # prepare.py
    data = TokenDataset.open("data/mine")                                         # dataset.py
    batch_BT = data.batch(k, batch_size=8, seq_len=256, seed=0)

The shipped corpus is one dataset prepared that way (:func:`prepare_shipped_corpus`, cached under
:func:`default_cache_dir`). The in-memory functions are its reference: ``load_corpus`` (corpus.py),
``load_or_train_tokenizer`` (tokenizer.py), ``encode_splits`` / ``random_windows`` / ``val_batches``
(batching.py) give the same streams and windows. Chat conversations for fine-tuning are chat.py's
(:class:`ChatDataset`). Names are imported on first use, so the tokenising workers of
:func:`prepare_data` (numpy + tokenizers) never import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latentmoe.data.batching import (
        TokenBatch,
        TokenSplits,
        encode_documents,
        encode_splits,
        random_windows,
        split_batch,
        unigram_cross_entropy,
        val_batches,
    )
    from latentmoe.data.chat import ChatDataset
    from latentmoe.data.corpus import CorpusSplits, load_corpus, split_documents, split_point
    from latentmoe.data.dataset import SAMPLING_MODES, TokenDataset
    from latentmoe.data.prepare import (
        PrepareProgress,
        PrepareResult,
        default_cache_dir,
        prepare_data,
        prepare_shipped_corpus,
    )
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
        ("TokenBatch", "TokenSplits", "encode_documents", "encode_splits", "random_windows", "split_batch",
         "unigram_cross_entropy", "val_batches"),
        "batching",
    ),
    **dict.fromkeys(("CorpusSplits", "load_corpus", "split_documents", "split_point"), "corpus"),
    **dict.fromkeys(("SAMPLING_MODES", "TokenDataset"), "dataset"),
    "ChatDataset": "chat",
    **dict.fromkeys(
        ("PrepareProgress", "PrepareResult", "default_cache_dir", "prepare_data", "prepare_shipped_corpus"), "prepare"
    ),
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
    "ChatDataset",
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
    "TokenBatch",
    "TokenDataset",
    "TokenSplits",
    "default_cache_dir",
    "encode_documents",
    "encode_splits",
    "find_sources",
    "load_corpus",
    "load_or_train_tokenizer",
    "prepare_data",
    "prepare_shipped_corpus",
    "random_windows",
    "read_documents",
    "split_batch",
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
