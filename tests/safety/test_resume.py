"""Resume is explicit: a damaged newest checkpoint is reported by name and reason and an older one is used only
with a warning saying so; with nothing valid, --resume fails and touches nothing; --resume needs a checkpoint
(--resume auto starts fresh, announced); options contradicting the checkpoint are errors."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.cli_helpers import TINY, snapshot

NEWEST, OLDER = "checkpoint-000004", "checkpoint-000002"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": (lambda c: truncate(c / "model.safetensors"), "model.safetensors", "truncated or corrupt"),
    "flipped byte": (lambda c: flip(c / "model.safetensors"), "model.safetensors", "sha256 mismatch"),
    "missing config": (lambda c: (c / "config.json").unlink(), "config.json", "missing"),
    "missing optimizer": (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors", "missing"),
    "garbage state": (lambda c: (c / "trainer_state.json").write_text("{garbage"), "trainer_state.json", "unreadable"),
    "state without rng": (
        lambda c: (c / "trainer_state.json").write_text(json.dumps(
            {k: v for k, v in json.loads((c / "trainer_state.json").read_text()).items() if k != "torch_rng_state"})),
        "trainer_state.json", "torch_rng_state",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_fallback_announced(damage, cli, run_copy):
    hurt, name, reason = DAMAGE[damage]
    hurt(run_copy / NEWEST)
    damaged = snapshot(run_copy / NEWEST)
    done = cli("train", *TINY, "--steps", "6", "--save-every", "2", "--keep-last", "5", "--resume", "--out", run_copy)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.lines if "warning" in line]
    assert any(NEWEST in w and name in w and reason in w for w in warnings), done.stderr
    assert any(f"resuming from the older {OLDER}" in w for w in warnings), done.stderr
    # The retrained step 4 did not overwrite the damaged one: it was set aside, byte for byte.
    assert snapshot(run_copy / f"{NEWEST}.damaged-1") == damaged
    assert (run_copy / "checkpoint-000006").is_dir()


def test_with_no_valid_checkpoint_resume_fails_and_touches_nothing(cli, run_copy):
    truncate(run_copy / NEWEST / "model.safetensors")
    (run_copy / OLDER / "config.json").unlink()
    before = snapshot(run_copy)
    cli("train", *TINY, "--steps", "6", "--resume", "--out", run_copy).one_error_line(
        "no valid checkpoint", "nothing was changed", NEWEST)
    cli("train", *TINY, "--steps", "6", "--resume", "auto", "--out", run_copy).one_error_line("no valid checkpoint")
    assert snapshot(run_copy) == before


def test_resume_needs_a_checkpoint_and_auto_starts_fresh_saying_so(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    cli("train", *TINY, "--steps", "2", "--resume", "--out", empty).one_error_line(
        "nothing to resume", "--resume auto")
    assert list(empty.iterdir()) == []
    missing = tmp_path / "missing"
    cli("train", *TINY, "--steps", "2", "--resume", "--out", missing).one_error_line("nothing to resume")
    assert not missing.exists()
    done = cli("train", *TINY, "--steps", "2", "--resume", "auto", "--out", missing)
    assert done.returncode == 0, done.stderr
    assert any("no checkpoint to resume; starting from step 0" in line for line in done.lines), done.stderr
    assert (missing / "checkpoint-000002").is_dir()


def test_a_fresh_run_refuses_a_directory_holding_a_run(cli, run_copy):
    before = snapshot(run_copy)
    cli("train", *TINY, "--steps", "2", "--out", run_copy).one_error_line("already holds a run", NEWEST, "--resume")
    assert snapshot(run_copy) == before


def test_overwrite_starts_over_replacing_only_our_files(cli, run_copy):
    (run_copy / "notes.txt").write_text("mine\n")
    done = cli("train", *TINY, "--steps", "1", "--out", run_copy, "--overwrite")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in run_copy.iterdir())
    assert "notes.txt" in names and "checkpoint-000001" in names
    assert NEWEST not in names and OLDER not in names  # the old run's checkpoints were ours: replaced


def test_options_that_contradict_the_checkpoint_are_errors(cli, run_copy):
    before = snapshot(run_copy)
    cli("train", "--preset", "small", *TINY[2:], "--steps", "6", "--resume", "--out", run_copy).one_error_line(
        "--preset small", "another model")
    cli("train", *TINY, "--steps", "6", "--seed", "3", "--resume", "--out", run_copy).one_error_line("seed")
    assert snapshot(run_copy) == before


def test_a_temporary_left_by_an_interrupted_save_is_removed_and_reported(cli, run_copy):
    leftover = run_copy / ".latentmoe-tmp-checkpoint-000006-abcd1234"
    shutil.copytree(run_copy / NEWEST, leftover)
    legacy = run_copy / ".checkpoint-000008.tmp-x1y2"  # latentmoe 0.1.0's name for the same thing
    legacy.mkdir()
    done = cli("train", *TINY, "--steps", "6", "--save-every", "2", "--resume", "--out", run_copy)
    assert done.returncode == 0, done.stderr
    assert not leftover.exists() and not legacy.exists()
    assert any(leftover.name in line and "interrupted" in line for line in done.lines), done.stderr


def test_a_failed_validation_leaves_no_directory_behind(tmp_path, cli):
    out = tmp_path / "new"
    cli("train", *TINY[:-1], "--seq-len", "4096", "--steps", "2", "--out", out).one_error_line(
        "seq_len (4096) exceeds the model's max_position_embeddings (512)")
    assert not out.exists()


def test_a_read_only_run_directory_is_one_line_and_unchanged(cli, run_copy, read_only):
    with read_only(run_copy):
        before = snapshot(run_copy)
        cli("train", *TINY, "--steps", "6", "--resume", "--out", run_copy).one_error_line(str(run_copy))
        assert snapshot(run_copy) == before
