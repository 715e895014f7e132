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


# ---------------------------------------------------------------------------------------------- prepared datasets
# Documents for the prepare-data / TokenDataset tests: paragraphs of the slices above (a few hundred
# bytes to a few kB each) plus text that exercises UTF-8 and whitespace.
UNICODE_DOCUMENT = "naïve café — 東京\n\ttabs\r\n  and trailing spaces   \n"


@pytest.fixture(scope="session")
def documents(small_splits) -> list[str]:
    docs = []
    for text in small_splits.train_parts:
        paragraphs = [p + "\n" for p in text.split("\n\n") if p.strip()]
        # Join runs of paragraphs into documents of >= 1.5 kB, so there are a few dozen of them.
        current = ""
        for paragraph in paragraphs:
            current += paragraph
            if len(current) >= 1500:
                docs.append(current)
                current = ""
        if current:
            docs.append(current)
    return [*docs[:60], UNICODE_DOCUMENT]


@pytest.fixture(scope="session")
def tokenizer_file(small_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    small_tokenizer.save(str(path))
    return path
