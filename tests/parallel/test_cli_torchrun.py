"""The user's command end to end: ``torchrun -m latentmoe train --ep 4 --gpus-per-node 2``, then ``ep-report``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.launch import loopback_env

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def latentmoe(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | loopback_env() | {"LATENTMOE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "latentmoe", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=240)


@pytest.mark.slow
def test_torchrun_trains_with_ep4_over_two_nodes_and_ep_report_summarises_it(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = os.environ | loopback_env() | {"LATENTMOE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "4", "-m", "latentmoe", "train", "--preset", "tiny",
         "--ep", "4", "--gpus-per-node", "2", "--steps", "2", "--batch-size", "4", "--seq-len", "32",
         "--eval-every", "0", "--eval-batches", "1", "--log-every", "1", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 2") == 1  # rank 0 alone reports
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["a2a_inter_node_bytes"] > 0 and records[-1]["a2a_intra_node_bytes"] > 0
    assert len(list((out / "checkpoint-000002").glob("model-experts-*-of-00004.safetensors"))) == 4

    report = latentmoe("ep-report", str(out), cwd=tmp_path, cache=cache)
    assert report.returncode == 0, report.stderr
    assert "4 ranks = 2 nodes x 2; EP 4 x DP 1" in report.stdout and "two-hop" in report.stdout
    assert (out / "ep_traffic.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads(latentmoe("ep-report", str(out), "--json", "--no-plot", cwd=tmp_path, cache=cache).stdout)
    assert data["node_limit"] == 2 and data["steps"] == [1, 2]


def test_ep_larger_than_the_world_is_a_one_line_error(tmp_path):
    r = latentmoe("train", "--preset", "tiny", "--ep", "2", "--out", str(tmp_path / "x"), cwd=tmp_path,
                  cache=tmp_path / "cache")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "latentmoe: error: --ep 2 needs at least 2 processes, this run has 1 (launch with torchrun --nproc-per-node N)"
    )


def test_ep_report_of_a_run_without_ep_names_what_is_missing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    r = latentmoe("ep-report", str(tmp_path), cwd=tmp_path, cache=tmp_path / "cache")
    assert r.returncode == 2 and "ep_layout.json: missing" in r.stderr
