"""Prepared datasets and a trained tiny run for the training-on-your-data tests (built once per session)."""

from pathlib import Path

import pytest

from latentmoe.data.corpus import read_shipped_documents
from latentmoe.data.prepare import prepare_data
from latentmoe.data.tokenizer import train_tokenizer
from latentmoe.train import TrainConfig

DOCUMENTS = ("hamlet", "sonnets", "tempest", "macbeth")
DOC_CHARS = 30_000
VOCAB = 512  # the tiny preset's
SHARD_BYTES = 24_000  # several shards, so windows cross shard boundaries
VAL_FRACTION = 0.1


def corpus_texts() -> dict[str, str]:
    documents = read_shipped_documents()
    return {name: documents[name][:DOC_CHARS] for name in DOCUMENTS}


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, text in corpus_texts().items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(list(corpus_texts().values()), VOCAB)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    out = root / "data"
    prepare_data([write_corpus(root / "corpus")], out, tokenizer=tokenizer, split="tail", val_fraction=VAL_FRACTION,
                 shard_bytes=SHARD_BYTES)
    return out


def tiny_cfg(out_dir: Path, **kw) -> TrainConfig:
    base = dict(out_dir=out_dir, preset="tiny", steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                log_every=1, eval_every=0, eval_batches=2, save_every=0, keep_last=None)
    return TrainConfig(**(base | kw)).validate()


@pytest.fixture(scope="session")
def source_run(tmp_path_factory, dataset_dir):
    """A tiny run trained on ``dataset_dir`` (the checkpoint the --init-from tests start from)."""
    from latentmoe.train.run import train_on_corpus

    out = tmp_path_factory.mktemp("source") / "run"
    result, data = train_on_corpus(tiny_cfg(out, steps=12, eval_every=6), data=dataset_dir, progress=False)
    return result, data
