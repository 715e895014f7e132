"""One error line for every failure a user can cause — OS errors included — naming the file, a non-zero exit,
and no damage; a traceback only with --debug."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import TINY, cli_env, run_cli, snapshot


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(cli, trained_run, small_disk):
    checkpoint = sum(p.stat().st_size for p in (trained_run / "checkpoint-000002").iterdir())
    others = sum(p.stat().st_size for p in trained_run.iterdir() if p.is_file())
    disk = small_disk(others + int(1.5 * checkpoint))  # room for one checkpoint, not two
    out = disk / "run"
    done = cli("train", *TINY, "--steps", "4", "--save-every", "2", "--keep-last", "5", "--out", out)
    done.one_error_line("No space left on device", str(out))
    from latentmoe.checkpoint import latest_checkpoint, verify_checkpoint

    assert latest_checkpoint(out).name == "checkpoint-000002"
    verify_checkpoint(out / "checkpoint-000002", hashes=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".latentmoe-tmp")]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--temperature", "nan"], "--temperature: must be in [0, 100], got nan"),
        (["--temperature", "-1"], "--temperature: must be in [0, 100], got -1"),
        (["--top-p", "inf"], "--top-p: must be in (0, 1], got inf"),
        (["--max-tokens", "0"], "--max-tokens: must be an integer in [1,"),
        (["--max-tokens", "2.5"], "--max-tokens: '2.5' is not an integer"),
    ],
)
def test_bad_sampling_values_are_one_line(cli, trained_run, args, fragment):
    cli("generate", "--checkpoint", trained_run, "--prompt", "a", *args).one_error_line(fragment)


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path, cache_dir, trained_run):
    argv = [sys.executable.encode(), b"-m", b"latentmoe", b"generate", b"--checkpoint", os.fsencode(trained_run),
            b"--prompt", b"ROMEO \xff\xfe:"]
    proc = subprocess.run(argv, capture_output=True, cwd=tmp_path, env=cli_env(cache_dir), timeout=120)
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "--prompt is not valid UTF-8 text" in err[0] and "Traceback" not in err[0]
    batch = tmp_path / "prompts.txt"
    batch.write_bytes(b"ok\n\xff bad\n")
    done = run_cli("generate", "--checkpoint", trained_run, "--batch-file", batch, cwd=tmp_path, cache=cache_dir)
    done.one_error_line(str(batch), "not UTF-8")


def damaged_copy(tmp_path, trained_run, change):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    change(run)
    return run


def rewrite_model(run, edit):
    """Edit checkpoint-000004's weights and re-seal its manifest (as a bad training run would have written it)."""
    ckpt = run / "checkpoint-000004"
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    state = json.loads((ckpt / "trainer_state.json").read_text())
    from latentmoe.checkpoint.layout import describe_file

    state["checkpoint_files"]["model.safetensors"] = describe_file(ckpt / "model.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_sampling_from_nan_weights_is_refused_with_the_tensor_named(tmp_path, cli, trained_run):
    def poison(t):
        t["model.norm.weight"][0] = float("nan")

    run = damaged_copy(tmp_path, trained_run, lambda r: rewrite_model(r, poison))
    cli("generate", "--checkpoint", run, "--prompt", "a", "--temperature", "0").one_error_line(
        "model.norm.weight", "NaN or inf")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, cli, trained_run, cache_dir):
    from latentmoe.data.corpus import load_corpus
    from latentmoe.data.tokenizer import train_tokenizer

    big = train_tokenizer(load_corpus().train_parts[:2], 1024)  # the tiny preset has vocab_size 512
    run = damaged_copy(tmp_path, trained_run, lambda r: big.save(str(r / "tokenizer.json")))
    cli("generate", "--checkpoint", run, "--prompt", "a").one_error_line("1024 tokens", "vocab_size is 512")


def test_a_corrupt_tokenizer_is_named(tmp_path, cli, trained_run):
    run = damaged_copy(tmp_path, trained_run, lambda r: (r / "tokenizer.json").write_text('{"model": 3}'))
    cli("generate", "--checkpoint", run, "--prompt", "a").one_error_line("tokenizer.json", "not a valid tokenizer")


def test_a_config_without_a_shape_field_or_with_a_typo_is_refused_before_anything_is_written(tmp_path, cli):
    from latentmoe import ModelConfig

    data = ModelConfig.from_preset("tiny").to_dict()
    path = tmp_path / "config.json"
    out = tmp_path / "out"
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "hidden_size"}))
    cli("train", "--preset", path, "--steps", "1", "--out", out).one_error_line(
        str(path), "required field hidden_size is missing")
    path.write_text(json.dumps({**data, "num_hiden_layers": 3}))
    cli("train", "--preset", path, "--steps", "1", "--out", out).one_error_line(
        "unknown field 'num_hiden_layers'; did you mean num_hidden_layers?")
    assert not out.exists()


def test_an_unexpected_failure_is_one_line_unless_debug(cli, monkeypatch, trained_run):
    import latentmoe.pretrained

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(latentmoe.pretrained, "load", broken)
    done = cli("generate", "--checkpoint", trained_run, "--prompt", "a")
    assert done.returncode == 1 and len(done.lines) == 1, done.stderr
    assert "internal error: TypeError: a bug" in done.lines[0] and "--debug" in done.lines[0]
    with pytest.raises(TypeError, match="a bug"):
        cli("generate", "--checkpoint", trained_run, "--prompt", "a", "--debug")
    monkeypatch.setenv("LATENTMOE_DEBUG", "1")
    with pytest.raises(TypeError, match="a bug"):
        cli("generate", "--checkpoint", trained_run, "--prompt", "a")


def test_version_and_the_planner_with_default_options_on_our_own_preset(cli):
    from latentmoe import __version__

    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"latentmoe {__version__}"
    done = cli("plan", "--model", "small", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["name"] == "small"
    done = cli("plan", "all-to-all", "--radix", "16", "--json")
    assert done.returncode == 0, done.stderr
    assert [r["scenario"] for r in json.loads(done.stdout)][:3] == ["MRFT, PXN", "MRFT, direct (cross rails at "
                                                                    "spines)", "MPFT"]


def test_plan_json_help_says_what_it_prints(cli):
    done = cli("plan", "--help")
    assert "JSON list" in " ".join(done.stdout.split())


def test_a_checkpoint_save_failure_leaves_no_directory_of_ours_half_written(tmp_path, monkeypatch):
    from latentmoe import CausalLM, ModelConfig
    from latentmoe.checkpoint import latest_checkpoint, save_checkpoint, tensors

    config = ModelConfig.from_preset("tiny")
    model = CausalLM(config)
    save_checkpoint(tmp_path, 1, model, None, {}, config)
    before = snapshot(tmp_path)

    def enospc(*args, **kwargs):
        raise tensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tensors, "save_file", enospc)
    with pytest.raises(OSError, match=r"model\.safetensors: cannot write .*No space left on device"):
        save_checkpoint(tmp_path, 2, model, None, {}, config)
    assert snapshot(tmp_path) == before and latest_checkpoint(tmp_path).name == "checkpoint-000001"
    assert torch.isfinite(model.lm_head.weight).all()


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_train_takes_a_device(tmp_path, cli, device):
    done = cli("train", *TINY, "--steps", "1", "--device", device, "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr


def test_a_device_this_machine_lacks_is_one_line(tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    cli("train", *TINY, "--steps", "1", "--device", "cuda", "--out", tmp_path / "run").one_error_line(
        "no CUDA device")
    cli("train", *TINY, "--steps", "1", "--device", "tpu", "--out", tmp_path / "run").one_error_line("tpu")
    assert not (tmp_path / "run").exists()
