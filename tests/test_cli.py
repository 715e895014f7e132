"""The command line end to end (real subprocesses): train → generate, and one-line errors on bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def run(*args, cwd, cache):
    env = os.environ | {"LATENTMOE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "latentmoe.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "run"
    r = run("train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "2", "--eval-batches", "1", "--no-progress", "--out", str(out), cwd=root, cache=root / "c")
    assert r.returncode == 0, r.stderr
    return root, out


def test_train_writes_checkpoint_metrics_and_plots(trained_run):
    _, out = trained_run
    ckpt = out / "checkpoint-000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and "val_loss" in records[-1]
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_from_trained_run(trained_run):
    root, out = trained_run
    r = run("generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-tokens", "5", "--seed", "1",
            cwd=root, cache=root / "c")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")


def test_resume_gives_weights_bit_identical_to_an_uninterrupted_run(trained_run):
    """6 steps in one go (saving at 3 on the way) vs a run that has only checkpoint-000003 and is resumed to 6:
    every tensor of the final checkpoint is bit-identical, and so are the logged losses after the resume."""
    root, _ = trained_run
    common = ("train", "--preset", "tiny", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-every",
              "0", "--log-every", "1", "--no-progress")
    straight, resumed = root / "straight", root / "resumed"
    r = run(*common, "--save-every", "3", "--out", str(straight), cwd=root, cache=root / "c")
    assert r.returncode == 0, r.stderr
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-000003", resumed / "checkpoint-000003")
    r = run(*common, "--resume", "--out", str(resumed), cwd=root, cache=root / "c")
    assert r.returncode == 0, r.stderr
    a = load_file(straight / "checkpoint-000006" / "model.safetensors")
    b = load_file(resumed / "checkpoint-000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, resumed)]
    assert losses[1] == losses[0][3:]  # steps 4..6, the same numbers


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--out", "x", "--steps", "0"], "--steps"),
        (["train", "--out", "x", "--preset", "nope"], "unknown preset 'nope'"),
        (["generate", "--checkpoint", "does-not-exist", "--prompt", "a"], "does-not-exist"),
        (["generate", "--checkpoint", ".", "--prompt", "a", "--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, args, message):
    r = run(*args, cwd=tmp_path, cache=tmp_path / "c")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, trained_run):
    _, out = trained_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (out / "checkpoint-000004").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"garbage")
    (bad / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    r = run("generate", "--checkpoint", str(bad), "--prompt", "a", cwd=tmp_path, cache=tmp_path / "c")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.safetensors" in r.stderr


def test_every_subcommand_has_help(tmp_path):
    for cmd in ([], ["train"], ["generate"], ["demo"]):
        r = run(*cmd, "--help", cwd=tmp_path, cache=tmp_path / "c")
        assert r.returncode == 0 and "usage:" in r.stdout
