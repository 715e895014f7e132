"""The user's commands end to end: ``torchrun -m latentmoe train --pp 2 --ep 2 --pp-schedule dualpipev`` matches the
single-process run, ``plan pipeline --measured`` reads it, and a killed rank under ``torchrun --max-restarts 1``
resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.launch import loopback_env

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SMALL_RUN = ("--preset", "tiny", "--steps", "2", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0",
             "--eval-batches", "1", "--log-every", "1", "--no-progress")
LOSS_RTOL = 1e-5


def env(cache: Path) -> dict[str, str]:
    return os.environ | loopback_env() | {"LATENTMOE_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_pp2_ep2_dualpipev_matches_one_process_and_plan_reads_its_bubble(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "4", "-m", "latentmoe", "train", "--pp", "2", "--ep", "2",
         "--pp-schedule", "dualpipev", "--out", str(tmp_path / "pp"), *SMALL_RUN],
        capture_output=True, text=True, env=env(cache), cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 2") == 1  # rank 0 alone reports
    single = subprocess.run([sys.executable, "-m", "latentmoe", "train", "--out", str(tmp_path / "one"), *SMALL_RUN],
                            capture_output=True, text=True, env=env(cache), cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for a, b in zip(read(tmp_path / "pp"), read(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
    layout = json.loads((tmp_path / "pp" / "pp_layout.json").read_text())
    assert layout["stage_to_rank"] == [0, 1, 1, 0] and layout["ep_groups_intra_node"]

    plan = subprocess.run([sys.executable, "-m", "latentmoe", "plan", "pipeline", "--model", "tiny", "--pp", "4",
                           "--measured", str(tmp_path / "pp")],
                          capture_output=True, text=True, env=env(cache), cwd=tmp_path, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "measured" in plan.stdout and "(PP/2-1)(F&B+B-3W) predicts" in plan.stdout


def test_a_pipeline_larger_than_the_world_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentmoe", "train", "--pp", "2", "--ep", "2", "--out",
                        str(tmp_path / "x"), *SMALL_RUN], capture_output=True, text=True, env=env(tmp_path / "c"),
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "latentmoe: error: --pp 2 x --ep 2 needs at least 4 processes, this run has 1 (launch with torchrun "
        "--nproc-per-node N)"
    )


@pytest.mark.slow
def test_torchrun_restarts_a_killed_pipeline_rank_from_the_last_checkpoint(tmp_path):
    from latentmoe.checkpoint import load_model
    from tests.parallel.pp_restart_worker import KILLED_MARKER

    out = tmp_path / "restarted"
    out.mkdir()
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
         str(REPO / "tests" / "parallel" / "pp_restart_worker.py"), str(out)],
        capture_output=True, text=True, env=env(tmp_path / "cache"), timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out.parent / KILLED_MARKER).is_file()  # the first attempt really lost rank 1
    records = read(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    model, _ = load_model(out)  # the final checkpoint is complete and loads in one process
    assert model.config.num_hidden_layers == 2
