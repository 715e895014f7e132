"""The training, loading and conversion paths on a CUDA device, compared with the CPU (skipped without a GPU:
the engine's CUDA checks are tests/infer/test_engine_cuda.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_matches_the_cpu(tmp_path, cache_dir):
    from latentmoe.train import TrainConfig
    from latentmoe.train.run import train_on_corpus

    losses = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(out_dir=tmp_path / device, preset="tiny", steps=3, batch_size=2, seq_len=16, eval_every=0,
                          eval_batches=1, log_every=1)
        result, _ = train_on_corpus(cfg, progress=False, cache_dir=cache_dir, device=device)
        losses[device] = result.final_loss
        assert result.checkpoint.is_dir()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)


def test_loading_builds_straight_on_the_device(trained_run):
    from latentmoe import load

    model, _ = load(trained_run, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {b.device.type for b in model.buffers()} == {"cuda"}
