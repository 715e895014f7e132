"""Small slices of the shipped corpus, so tokenizer tests train in well under a second."""

import pytest

from latentmoe.data.corpus import CorpusSplits, read_shipped_documents, split_documents
from latentmoe.data.tokenizer import train_tokenizer

SLICE_DOCUMENTS = ("hamlet", "sonnets", "tempest")
SLICE_CHARS = 40_000
SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_splits() -> CorpusSplits:
    documents = read_shipped_documents()
    return split_documents({name: documents[name][:SLICE_CHARS] for name in SLICE_DOCUMENTS})


@pytest.fixture(scope="session")
def small_tokenizer(small_splits):
    return train_tokenizer(small_splits.train_parts, SMALL_VOCAB)
