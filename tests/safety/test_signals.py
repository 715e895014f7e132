"""SIGTERM (schedulers, timeout, preemption, torchrun) and SIGINT save a checkpoint at the next step boundary and
exit with 143 / 130; wherever the signal lands, the newest checkpoint is valid and resuming from it gives
bit-identical weights to a run that was never interrupted — also with two ranks under torchrun."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import TINY, cli_env, run_cli, start_cli

STEPS = 40
SIGNAL_SEEDS = (1, 2, 3)
POLL_S = 0.02
WAIT_S = 240
ARGS = (*TINY, "--steps", str(STEPS), "--save-every", "0", "--log-every", "1")


def logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def signal_at(proc: subprocess.Popen, out: Path, step: int, signum: int) -> None:
    """Send ``signum`` once the run has logged ``step`` steps (the exact step it lands on does not matter)."""
    deadline = time.monotonic() + WAIT_S
    while logged_steps(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert proc.poll() is None, "the run ended before the signal was sent"
    proc.send_signal(signum)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from latentmoe.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"checkpoint-{STEPS:06d}", ckpt
    return load_file(str(ckpt / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("straight")
    done = run_cli("train", *ARGS, "--out", root / "run", cwd=root, cache=cache_dir)
    assert done.returncode == 0, done.stderr
    return final_weights(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SIGNAL_SEEDS)
def test_sigterm_at_a_random_step_saves_and_resume_is_bit_exact(seed, tmp_path, cache_dir, straight):
    from latentmoe.checkpoint import latest_checkpoint, verify_checkpoint

    out = tmp_path / "run"
    at = random.Random(seed).randint(1, STEPS // 2)
    proc = start_cli("train", *ARGS, "--out", out, cwd=tmp_path, cache=cache_dir)
    signal_at(proc, out, at, signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentmoe: interrupted at step "), err
    newest = latest_checkpoint(out)
    assert newest is not None and f"checkpoint saved at {newest}" in lines[0]
    verify_checkpoint(newest, hashes=True, require_state_keys=("torch_rng_state",))
    done = run_cli("train", *ARGS, "--resume", "--out", out, cwd=tmp_path, cache=cache_dir)
    assert done.returncode == 0, done.stderr
    resumed = final_weights(out)
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_sigint_saves_and_exits_130(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = start_cli("train", *ARGS, "--out", out, cwd=tmp_path, cache=cache_dir)
    signal_at(proc, out, 3, signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "interrupted at step" in err and "checkpoint saved" in err


def test_periodic_checkpoints_are_on_by_default():
    from latentmoe.cli import build_parser
    from latentmoe.train import TrainConfig

    args = build_parser().parse_args(["train", "--out", "x"])
    assert args.save_every == TrainConfig().save_every > 0


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path, cache_dir):
    from latentmoe.checkpoint import latest_checkpoint, shard_files, verify_checkpoint
    from tests.parallel.launch import loopback_env

    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = cli_env(cache_dir) | loopback_env()
    proc = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "latentmoe", "train", "--preset", "tiny",
         "--ep", "2", "--gpus-per-node", "1", "--steps", "400", "--batch-size", "4", "--seq-len", "16",
         "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--no-progress", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
        start_new_session=True,
    )
    try:
        signal_at(proc, out, 3, signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err.count("latentmoe: interrupted at step") == 1, err  # rank 0 reports, for both
    newest = latest_checkpoint(out)
    assert newest is not None and f"interrupted at step {int(newest.name.split('-')[1])};" in err
    verify_checkpoint(newest, hashes=True)
    assert len(shard_files(newest, "model")) == 2  # both ranks wrote their experts into the same step
