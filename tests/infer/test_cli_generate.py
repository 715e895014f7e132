"""`latentmoe generate` through the engine (in-process): speculative, batch file, streaming, one-line errors."""

import pytest
import torch

from latentmoe import CausalLM, ModelConfig
from latentmoe.checkpoint import save_checkpoint
from latentmoe.cli import main
from latentmoe.data.tokenizer import train_tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n" * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    save_checkpoint(root, 1, CausalLM(config), None, {}, config)
    train_tokenizer(TEXT, vocab_size=300).save(str(root / "tokenizer.json"))
    return root


@pytest.mark.parametrize("extra", [[], ["--speculative"], ["--stream"], ["--no-speculative", "--cache-dtype", "fp8"]])
def test_generate_prints_prompt_and_continuation_and_speed(run_dir, capsys, extra):
    code = main(["generate", "--checkpoint", str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "6",
                 "--temperature", "0", *extra])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("ROMEO:")
    assert "tokens/s" in err
    assert ("draft acceptance" in err) == ("--speculative" in extra)


def test_generate_batch_file_prints_one_block_per_prompt(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nJULIET:\nO Romeo\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--batch-file", str(prompts), "--max-tokens", "4",
                 "--seed", "1", "--speculative"]) == 0
    out, _ = capsys.readouterr()
    blocks = out.split("\n\n")
    assert [b.split(":")[0] if ":" in b else b[:7] for b in blocks][:2] == ["ROMEO", "JULIET"]
    assert len(blocks) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a", "--max-tokens", "0"], "--max-tokens: must be an integer in [1,"),
        (["--prompt", "a", "--max-tokens", "600"], "max_position_embeddings"),
        (["--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--prompt", "", "--max-tokens", "3"], "prompt"),
        (["--batch-file", "x.txt", "--stream"], "--stream"),
        (["--prompt", "a", "--cache-memory", "2XB"], "--cache-memory"),
        (["--prompt", "a", "--cache-memory", "100"], "cache_memory_bytes"),
        (["--prompt", "a", "--max-tokens", "200", "--cache-memory", "40KiB"], "cache pool holds 2 blocks"),
        ([], "--prompt"),
    ],
)
def test_bad_generate_input_is_one_line(run_dir, capsys, args, message):
    try:
        code = main(["generate", "--checkpoint", str(run_dir), *args])
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_generate_reports_the_cache_pool_it_sized_from_the_budget(run_dir, capsys):
    """tiny: 3 cache layers (2 + 1 MTP) x (16 + 8) x 4 bytes x 64 tokens = 18432 bytes a block."""
    code = main(["generate", "--checkpoint", str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "4",
                 "--cache-memory", "40KiB"])
    err = capsys.readouterr().err
    assert code == 0
    assert "cache: 2 blocks x 64 tokens = 128 tokens, 36.0 KiB" in err
