"""``latentmoe convert`` both ways and ``latentmoe generate --checkpoint HF_DIR``, through the CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch

from latentmoe.checkpoint import load_model, save_checkpoint
from latentmoe.cli import main
from latentmoe.data.tokenizer import train_tokenizer
from latentmoe.hf import inspect_checkpoint, load_pretrained
from tests.hf.helpers import hf_v3, ours, quantize_checkpoint
from tests.hf.test_fp8 import ALIGNED

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A latentmoe run directory: checkpoint-000007/ and tokenizer.json, as the trainer leaves them."""
    root = tmp_path_factory.mktemp("run")
    model = ours("tiny", vocab_size=300)
    save_checkpoint(root, 7, model, None, {}, model.config)
    train_tokenizer(TEXT, 300).save(str(root / "tokenizer.json"))
    return root, model


def test_convert_to_hf_and_back_is_bit_exact(run_dir, tmp_path, capsys):
    root, model = run_dir
    assert main(["convert", str(root), str(tmp_path / "hf")]) == 0
    assert "(latentmoe) ->" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert inspect_checkpoint(tmp_path / "hf").mtp_layers == 1
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert "1 MTP module(s)" in capsys.readouterr().out
    back, _ = load_model(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_generate_reads_a_hugging_face_directory(run_dir, tmp_path, capsys):
    root, _ = run_dir
    assert main(["convert", str(root), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["--prompt", "To be", "--max-tokens", "6", "--temperature", "0"]
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), *args]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(root), *args]) == 0
    assert from_hf == capsys.readouterr().out and from_hf.startswith("To be")


def test_fp8_source_needs_dequantize_then_converts_to_bf16(tmp_path, capsys):
    hf_v3(**ALIGNED).save_pretrained(tmp_path / "bf")
    quantize_checkpoint(tmp_path / "bf", tmp_path / "fp8")
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentmoe: error: ") and "--dequantize" in err and "\n" not in err
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "out"), "--to", "hf", "--dequantize",
                 "--max-shard-size", "1MB"]) == 0
    assert "FP8 tensors dequantised" in capsys.readouterr().out
    info = inspect_checkpoint(tmp_path / "out")
    assert info.stored_dtype == torch.bfloat16 and info.fp8_tensors == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    expected = load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).state_dict()
    for key, value in load_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_bad_source_is_one_line_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: neither a Hugging Face checkpoint" in err
