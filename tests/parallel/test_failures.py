"""Failure behaviour: a silent peer turns into a clear error within the collective timeout; a killed rank
is restarted by ``torchrun --max-restarts`` from the last checkpoint and finishes (resuming is bit-exact:
tests/parallel/test_training.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.parallel.launch import loopback_env, run_ranks

TIMEOUT_S = 2.0
REPO = Path(__file__).resolve().parents[2]


def _silent_peer(rank: int, world: int, done_file: str) -> None:
    from latentmoe.parallel import Topology, build_groups, enable_expert_parallel
    from latentmoe.parallel.runtime import CollectiveError, collective_errors
    from tests.parallel.test_ep_layer import build, moe_config

    config = moe_config()
    groups = build_groups(Topology(world_size=world, rank=rank, gpus_per_node=1, ep_size=world))
    moe = build(config)
    enable_expert_parallel(moe, groups)
    done = Path(done_file)
    if rank == 1:  # alive, but never joins the all-to-all; leaves once rank 0 has seen the error
        end = time.monotonic() + 5 * TIMEOUT_S
        while not done.exists() and time.monotonic() < end:
            time.sleep(0.1)
        return
    try:
        with pytest.raises(CollectiveError, match=r"rank 0 of 2: a collective failed .* timeout 2 s"):
            with collective_errors(rank, world, TIMEOUT_S):
                moe(torch.randn(1, 4, config.hidden_size))
    finally:
        done.touch()


def test_a_rank_that_stops_answering_makes_the_others_fail_with_a_clear_error(tmp_path):
    run_ranks(_silent_peer, 2, str(tmp_path / "done"), collective_timeout_s=TIMEOUT_S, deadline_s=60)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(tmp_path):
    from latentmoe import CausalLM
    from latentmoe.checkpoint import load_model
    from latentmoe.train.metrics import read_metrics
    from latentmoe.train.trainer import train
    from tests.parallel.restart_worker import KILLED_MARKER, RESUMED_FROM
    from tests.parallel.test_training import LOSS_RTOL, batch_fn, config, train_cfg

    out = tmp_path / "restarted"
    out.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | loopback_env() | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
         str(REPO / "tests" / "parallel" / "restart_worker.py"), str(out)],
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out.parent / KILLED_MARKER).is_file()  # the first attempt really lost rank 1
    assert (out.parent / RESUMED_FROM).read_text() == "checkpoint-000002"  # the restart resumed, it did not start over
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]

    # An uninterrupted run of the same training (one process; EP = single process to 1e-5: test_training).
    torch.manual_seed(0)
    straight = tmp_path / "straight"
    train(train_cfg(straight, save_every=2), batch_fn=batch_fn, model=CausalLM(config()), handle_signals=False)
    expected = read_metrics(straight / "metrics.jsonl")
    for got, want in zip(records, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), got["step"]
        assert got["mtp_loss"] == pytest.approx(want["mtp_loss"], rel=LOSS_RTOL), got["step"]
    restarted, _ = load_model(out)  # the final checkpoint is complete and loads into one process
    reference, _ = load_model(straight)
    for (name, p), q in zip(restarted.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
