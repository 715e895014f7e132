"""Never delete or overwrite what we did not write: every command that writes a directory either leaves a
directory seeded with a user's file byte-identical or refuses it with one line naming the file; --overwrite
writes beside such files and never touches them; our own earlier output is replaced, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import TINY, snapshot

USER_FILE = "notes.txt"
USER_TEXT = "my own notes\n"
DEMO = ("demo", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
        "--sample-tokens", "2", "--no-progress")


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, trained_run):
    from latentmoe.cli import main

    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["convert", str(trained_run), str(out), "--to", "hf"]) == 0
    return out


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} of a small corpus, " * 20}) + "\n" for i in range(40)))
    return path


def commands(dst: Path, run: Path, hf: Path, source: Path) -> dict[str, list]:
    """Every subcommand that writes a directory, writing into ``dst`` (a name: what the test calls it)."""
    return {
        "train": ["train", *TINY, "--steps", "2", "--out", dst],
        "demo": [*DEMO, "--out", dst],
        "convert-to-hf": ["convert", run, dst, "--to", "hf"],
        "convert-to-latentmoe": ["convert", hf, dst, "--to", "latentmoe"],
        "prepare-data": ["prepare-data", source, "--out", dst, "--tokenizer", "train", "--vocab-size", "300",
                         "--no-progress"],
        "plan-plot": ["plan", "--model", "small", "--plot", dst],
        "plan-network-plot": ["plan", "network", "--plot", dst],
    }


# A file of each command's own that a user might happen to have: with --overwrite it is still refused.
OWN_NAME = {
    "train": "metrics.jsonl",
    "demo": "loss.png",
    "convert-to-hf": "config.json",
    "convert-to-latentmoe": "tokenizer.json",
    "prepare-data": "manifest.json",
    "plan-plot": "kv_cache_per_token.png",
    "plan-network-plot": "cost_per_endpoint.png",
}
NAMES = sorted(OWN_NAME)


def owned_entries(directory: Path) -> list[str]:
    """What the directory's marker says we wrote: ``.latentmoe.json``, or a prepared dataset's manifest."""
    marker = directory / ".latentmoe.json"
    if marker.is_file():
        return json.loads(marker.read_text())["entries"]
    manifest = json.loads((directory / "manifest.json").read_text())
    return ["manifest.json", *(s["file"] for s in manifest["shards"])]


def seeded(tmp_path: Path, name: str = USER_FILE) -> Path:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / name).write_text(USER_TEXT)
    return dst


@pytest.mark.parametrize("command", NAMES)
def test_a_directory_holding_a_user_file_is_refused_and_left_byte_identical(
    command, tmp_path, cli, trained_run, hf_export, text_source
):
    dst = seeded(tmp_path)
    before = snapshot(tmp_path)
    done = cli(*commands(dst, trained_run, hf_export, text_source)[command])
    done.one_error_line(str(dst), USER_FILE, "--overwrite")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", NAMES)
def test_overwrite_writes_beside_a_user_file_and_never_touches_it(
    command, tmp_path, cli, trained_run, hf_export, text_source
):
    dst = seeded(tmp_path)
    done = cli(*commands(dst, trained_run, hf_export, text_source)[command], "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (dst / USER_FILE).read_text() == USER_TEXT
    assert USER_FILE not in owned_entries(dst) and owned_entries(dst)
    assert all((dst / name).exists() for name in owned_entries(dst))


@pytest.mark.parametrize("command", NAMES)
def test_overwrite_still_refuses_a_user_file_named_like_one_of_ours(
    command, tmp_path, cli, trained_run, hf_export, text_source
):
    dst = seeded(tmp_path, OWN_NAME[command])
    before = snapshot(tmp_path)
    done = cli(*commands(dst, trained_run, hf_export, text_source)[command], "--overwrite")
    done.one_error_line(OWN_NAME[command], "not written by latentmoe")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["demo", "convert-to-hf", "convert-to-latentmoe", "plan-plot", "prepare-data"])
def test_running_again_replaces_our_own_earlier_output(command, tmp_path, cli, trained_run, hf_export, text_source):
    dst = tmp_path / "dst"
    argv = commands(dst, trained_run, hf_export, text_source)[command]
    first = cli(*argv)
    assert first.returncode == 0, first.stderr
    extra = ["--overwrite"] if command in ("prepare-data",) else []  # a prepared dataset resumes unless told
    second = cli(*argv, *extra)
    assert second.returncode == 0, second.stderr
    assert not [p for p in dst.iterdir() if p.name.startswith(".latentmoe-tmp")]


def test_demo_into_the_current_directory_refuses_and_deletes_nothing(tmp_path, cli, monkeypatch):
    (tmp_path / "thesis.tex").write_text("years of work\n")
    (tmp_path / "data").mkdir()
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    cli(*DEMO, "--out", ".").one_error_line("data", "--overwrite")
    assert snapshot(tmp_path) == before


def test_an_export_never_writes_over_its_source_or_into_a_training_run(tmp_path, cli, run_copy):
    ckpt = run_copy / "checkpoint-000004"
    before = snapshot(run_copy)
    cli("convert", ckpt, ckpt, "--to", "hf").one_error_line("the source")
    cli("convert", ckpt, ckpt, "--to", "hf", "--overwrite").one_error_line("the source")
    cli("convert", run_copy, run_copy / "hf", "--to", "hf").one_error_line("the source")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    cli("convert", other.parent / "missing", ckpt).one_error_line("missing")
    assert snapshot(run_copy) == before


def test_hf_to_latentmoe_into_a_training_run_is_refused_and_the_run_still_generates(
    tmp_path, cli, run_copy, hf_export
):
    before = snapshot(run_copy)
    cli("convert", hf_export, run_copy, "--to", "latentmoe").one_error_line(str(run_copy), "training run")
    cli("convert", hf_export, run_copy, "--to", "latentmoe", "--overwrite").one_error_line("training run")
    assert snapshot(run_copy) == before
    done = cli("generate", "--checkpoint", run_copy, "--prompt", "ROMEO:", "--max-tokens", "3", "--seed", "0")
    assert done.returncode == 0, done.stderr


def test_a_checkpoint_with_a_user_file_inside_is_kept_when_pruned(tmp_path, cli):
    out = tmp_path / "run"
    assert cli("train", *TINY, "--steps", "2", "--save-every", "1", "--keep-last", "1", "--out", out).returncode == 0
    # checkpoint-000002 is the only one kept; put a note in it, then train on: it is pruned but the note stays
    (out / "checkpoint-000002" / USER_FILE).write_text(USER_TEXT)
    done = cli("train", *TINY, "--steps", "4", "--save-every", "1", "--keep-last", "1", "--resume", "--out", out)
    assert done.returncode == 0, done.stderr
    assert (out / "checkpoint-000002" / USER_FILE).read_text() == USER_TEXT
    assert sorted(p.name for p in (out / "checkpoint-000002").iterdir()) == [USER_FILE]
    assert (out / "checkpoint-000004").is_dir() and not (out / "checkpoint-000003").exists()
