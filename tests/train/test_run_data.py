"""Training on a prepared dataset (``train_on_corpus(data=DIR)``): exact resume from shards on one process and on
two data-parallel ranks, each rank reading only its rows, the feedback (epochs, manifest hash, summary), and a
fresh model taking the dataset's vocabulary."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from latentmoe.checkpoint import load_model
from latentmoe.data import TokenDataset
from latentmoe.io import read_json
from latentmoe.train.metrics import read_metrics
from latentmoe.train.run import train_on_corpus
from tests.parallel.launch import run_ranks
from tests.train.conftest import tiny_cfg

STEPS, HALF = 20, 10
LOSS_RTOL = 1e-5


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(run_dir)
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dataset_dir):
    """20 steps in one go, saving at step 10 on the way (which must not change anything)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result, _ = train_on_corpus(tiny_cfg(out, steps=STEPS, save_every=HALF, eval_every=HALF), data=dataset_dir,
                                progress=False)
    return out, result


def resume_half(src: Path, dst: Path) -> None:
    """A run directory holding what ``src`` held at step 10: its checkpoint and metrics."""
    dst.mkdir(parents=True)
    shutil.copytree(src / f"checkpoint-{HALF:06d}", dst / f"checkpoint-{HALF:06d}")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")


def test_resume_from_shards_is_bit_exact(tmp_path, dataset_dir, straight):
    out, result = straight
    resume_half(out, tmp_path / "run")
    resumed, _ = train_on_corpus(tiny_cfg(tmp_path / "run", steps=STEPS, save_every=HALF, eval_every=HALF),
                                 data=dataset_dir, resume=True, progress=False)
    assert resumed.resumed_from.name == f"checkpoint-{HALF:06d}" and resumed.final_step == STEPS
    assert_same_weights(weights(out), weights(tmp_path / "run"))
    ours = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    ref = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert ours == ref and len(ref) == STEPS
    assert resumed.final_val_loss == result.final_val_loss


def test_sequential_sampling_reads_consecutive_slots_and_counts_epochs(tmp_path, dataset_dir):
    data = TokenDataset.open(dataset_dir)
    seen = []
    original = TokenDataset.batch

    def spy(self, step, **kw):
        seen.append((step, kw["sampling"]))
        return original(self, step, **kw)

    TokenDataset.batch = spy
    try:
        result, run = train_on_corpus(tiny_cfg(tmp_path / "run", steps=3), data=dataset_dir, sampling="sequential",
                                      progress=False)
    finally:
        TokenDataset.batch = original
    assert seen == [(0, "sequential"), (1, "sequential"), (2, "sequential")]
    tokens = 3 * 4 * 32
    assert result.tokens_seen == tokens
    assert run.info.sampling == "sequential"
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["dataset_epochs"] == pytest.approx(tokens / data.train_tokens, rel=1e-12)


def test_metrics_and_checkpoints_record_the_dataset(source_run, dataset_dir):
    result, run = source_run
    manifest_sha = hashlib.sha256((dataset_dir / "manifest.json").read_bytes()).hexdigest()
    train_tokens = json.loads((dataset_dir / "manifest.json").read_text())["totals"]["train_tokens"]
    records = read_metrics(result.metrics_path)
    assert records and all(r["dataset_manifest_sha256"] == manifest_sha for r in records)
    for r in records:  # epochs = tokens read / tokens in one pass, every record
        assert r["dataset_epochs"] == pytest.approx(r["tokens_seen"] / train_tokens, rel=1e-12)
    state = read_json(result.checkpoint / "trainer_state.json")
    assert state["data"]["dataset"] == {"path": str(dataset_dir), "manifest_sha256": manifest_sha,
                                        "train_tokens": train_tokens, "sampling": "random"}
    assert run.label == str(dataset_dir) and run.dataset.manifest_sha256 == manifest_sha


def test_a_fresh_model_takes_the_dataset_vocabulary(tmp_path, tokenizer):
    from latentmoe.data.prepare import prepare_data
    from latentmoe.data.tokenizer import train_tokenizer
    from tests.train.conftest import corpus_texts, write_corpus

    small = train_tokenizer(list(corpus_texts().values()), 300)
    prepare_data([write_corpus(tmp_path / "corpus")], tmp_path / "data", tokenizer=small, split="tail",
                 val_fraction=0.1)
    result, run = train_on_corpus(tiny_cfg(tmp_path / "run", steps=1), data=tmp_path / "data", progress=False)
    model, config = load_model(result.checkpoint)
    assert config.vocab_size == 300 == small.get_vocab_size()
    assert model.lm_head.weight.shape[0] == 300
    assert run.tokenizer.tokenizer.get_vocab() == small.get_vocab()


# ---------------------------------------------------------------------------------------------- two DP ranks


def _dp_ranks(rank: int, world: int, root: str, dataset_dir: str) -> None:
    import torch.distributed as dist

    from latentmoe.parallel.strategy import ExpertParallelStrategy, ParallelConfig
    from latentmoe.parallel.topology import build_groups

    parallel = ParallelConfig(ep=1)
    strategy = ExpertParallelStrategy(build_groups(parallel.topology(rank, world)), parallel)
    root = Path(root)
    rows = []
    original = TokenDataset.windows

    def spy(self, starts, *, seq_len, split="train"):
        if split == "train":
            rows.append(len(starts))
        return original(self, starts, seq_len=seq_len, split=split)

    TokenDataset.windows = spy
    cfg = tiny_cfg(root / "dp", steps=STEPS, save_every=HALF, eval_every=HALF)
    train_on_corpus(cfg, data=dataset_dir, strategy=strategy, progress=False)
    assert rows == [cfg.batch_size // world] * STEPS, f"rank {rank} read {rows} training rows per step"
    if rank == 0:
        resume_half(root / "dp", root / "dp-resumed")
    dist.barrier()
    train_on_corpus(tiny_cfg(root / "dp-resumed", steps=STEPS, save_every=HALF, eval_every=HALF), data=dataset_dir,
                    strategy=strategy, resume=True, progress=False)


@pytest.mark.slow
def test_two_data_parallel_ranks_read_their_rows_resume_exactly_and_match_one_process(tmp_path, dataset_dir, straight):
    run_ranks(_dp_ranks, 2, str(tmp_path), str(dataset_dir), deadline_s=300)
    assert_same_weights(weights(tmp_path / "dp"), weights(tmp_path / "dp-resumed"))
    dp = read_metrics(tmp_path / "dp" / "metrics.jsonl")
    assert [r["loss"] for r in read_metrics(tmp_path / "dp-resumed" / "metrics.jsonl")] == [r["loss"] for r in dp]
    single = read_metrics(straight[0] / "metrics.jsonl")
    assert [r["step"] for r in dp] == [r["step"] for r in single]
    for a, b in zip(dp, single, strict=True):  # the same global batch: the one-process run's losses
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), a["step"]
        assert a["tokens_seen"] == b["tokens_seen"]
