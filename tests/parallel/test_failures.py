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
    from latentmoe.checkpoint import load_model
    from latentmoe.train.metrics import read_metrics
    from tests.parallel.restart_worker import KILLED_MARKER

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
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]

    restarted, _ = load_model(out)  # the final checkpoint is complete (exact resume itself: test_training)
    assert restarted.config.n_routed_experts == 8
