"""The user's commands on their own data: ``train --data`` reports dataset, tokens and final validation loss;
``eval`` reproduces that loss (and transformers' on an HF directory), with bits per byte; bad input is one error
line, exit status 2, and nothing is written or overwritten."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from latentmoe.cli import main
from latentmoe.data import TokenDataset
from latentmoe.data.prepare import prepare_data
from latentmoe.data.tokenizer import token_byte_lengths, train_tokenizer
from latentmoe.train.metrics import read_metrics
from tests.train.conftest import corpus_texts, write_corpus

SMALL_RUN = ["--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--lr", "3e-3", "--no-progress"]
TINY = ["--preset", "tiny", *SMALL_RUN]


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch, tmp_path_factory):
    """Library messages go to the stderr pytest captures for this test (setup_messages adds one handler); the
    shipped corpus, if anything prepares it, is cached in a temporary directory."""
    monkeypatch.setenv("LATENTMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    logger = logging.getLogger("latentmoe")
    for handler in [h for h in logger.handlers if getattr(h, "_latentmoe", False)]:
        logger.removeHandler(handler)
    yield


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", *TINY, "--steps", "4", "--eval-every", "2", "--data", str(dataset_dir), "--out", str(out)])
    assert code == 0
    return out


def test_train_on_data_reports_dataset_tokens_and_final_val_loss(trained, dataset_dir, capsys):
    # the module fixture ran first; run one more step on the same data to see the summary printed
    code = main(["train", *TINY, "--steps", "5", "--eval-every", "0", "--data", str(dataset_dir), "--out",
                 str(trained), "--resume"])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out
    final = read_metrics(trained / "metrics.jsonl")[-1]
    # without a progress bar every metrics record is a log line with the tokens seen and the epochs
    assert f"step 5: loss {final['loss']:.4f}, val loss {final['val_loss']:.4f}, 640 tokens seen, " \
           f"{final['dataset_epochs']:.3g} epochs\n" in out
    data = TokenDataset.open(dataset_dir)
    assert f"trained to step 5 on {dataset_dir} ({5 * 4 * 32:,} tokens trained" in out
    assert f"{5 * 4 * 32 / data.train_tokens:.3g} epochs" in out
    assert f"final val loss {final['val_loss']:.3f}" in out


def test_eval_reproduces_the_runs_validation_loss_with_perplexity_and_bits_per_byte(trained, dataset_dir, capsys):
    final = [r for r in read_metrics(trained / "metrics.jsonl") if "val_loss" in r][-1]
    assert main(["eval", "--checkpoint", str(trained / f"checkpoint-{final['step']:06d}"), "--data",
                 str(dataset_dir), "--max-batches", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == pytest.approx(final["val_loss"], rel=1e-6)  # the trainer's windows: its number
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert (got["split"], got["seq_len"], got["batch_size"], got["windows"]) == ("val", 32, 4, 8)
    # equal batches: the mean of batch means is the token mean, so nats = loss x tokens
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * got["tokens"] / math.log(2) / got["bytes"], rel=1e-5)
    assert main(["eval", "--checkpoint", str(trained), "--data", str(dataset_dir)]) == 0  # every window
    text = capsys.readouterr().out
    assert "perplexity" in text and "bits per byte" in text


def test_byte_counts_per_token_add_up_to_the_utf8_text(tokenizer):
    lengths = token_byte_lengths(tokenizer, tokenizer.get_vocab_size())
    for text in [*corpus_texts().values(), "naïve café — 東京\n\ttabs"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[tokenizer.token_to_id("<|bos|>")] == lengths[tokenizer.token_to_id("<|eos|>")] == 0


def test_eval_of_raw_text_frames_documents_like_prepare_data(trained, tmp_path, tokenizer, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["eval", "--checkpoint", str(trained), "--data", str(corpus), "--seq-len", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    framed = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) + 2 for text in corpus_texts().values())
    assert got["split"] is None and got["windows"] == framed // 64  # BOS ids EOS per file, every whole window
    assert got["tokens"] == got["windows"] * 63 and math.isfinite(got["bits_per_byte"])


def test_eval_of_a_transformers_directory_equals_transformers_loss(tmp_path, dataset_dir, tokenizer, capsys):
    from transformers import PreTrainedTokenizerFast

    from tests.hf.helpers import hf_v3

    model = hf_v3(vocab_size=512)
    model.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>").save_pretrained(
        tmp_path / "hf")
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--data", str(dataset_dir), "--seq-len", "32",
                 "--batch-size", "4", "--max-batches", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    batches = TokenDataset.open(dataset_dir).val_batches(batch_size=4, seq_len=32, max_batches=2)
    with torch.no_grad():
        theirs = sum(float(model.eval()(ids, labels=ids).loss) for ids in batches) / len(batches)
    assert got["loss"] == pytest.approx(theirs, rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentmoe: error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_data_and_chat_files_and_conflicting_options(tmp_path, trained, dataset_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    one_error_line(capsys, str(tmp_path / "nope"))
    assert main(["train", *SMALL_RUN, "--init-from", str(trained), "--sft", str(tmp_path / "none.jsonl"), "--out",
                 str(out)]) == 2
    one_error_line(capsys, "none.jsonl: no such file")
    assert main(["train", *SMALL_RUN, "--sft", str(tmp_path / "c.jsonl"), "--data", str(dataset_dir), "--out",
                 str(out)]) == 2
    one_error_line(capsys, "--data and --sft exclude each other")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}) + "\n")
    assert main(["train", "--batch-size", "4", "--seq-len", "32", "--no-progress", "--sft", str(tmp_path / "c.jsonl"),
                 "--out", str(out)]) == 2
    one_error_line(capsys, "--sft needs --init-from")
    assert main(["train", *TINY, "--init-from", str(trained), "--out", str(out)]) == 2
    one_error_line(capsys, "drop --preset")
    assert main(["train", "--no-progress", "--init-from", str(trained), "--out", str(trained / "inner")]) == 2
    one_error_line(capsys, "overlap")
    assert not out.exists() and not (trained / "inner").exists()


def test_a_dataset_with_too_few_tokens_or_another_vocabulary_is_refused(tmp_path, trained, capsys):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("A few words.")
    small = train_tokenizer(list(corpus_texts().values()), 300)
    prepare_data([tmp_path / "tiny"], tmp_path / "tiny-ds", tokenizer=small, split="tail", val_fraction=0.1)
    assert main(["train", *TINY, "--data", str(tmp_path / "tiny-ds"), "--out", str(tmp_path / "a")]) == 2
    one_error_line(capsys, "fewer than --seq-len 32")
    prepare_data([write_corpus(tmp_path / "corpus")], tmp_path / "ds300", tokenizer=small, split="tail",
                 val_fraction=0.1)
    args = ["--batch-size", "4", "--seq-len", "32", "--no-progress", "--data", str(tmp_path / "ds300")]
    assert main(["train", *args, "--init-from", str(trained), "--out", str(tmp_path / "b")]) == 2
    one_error_line(capsys, "another tokenizer", str(trained))
    assert main(["eval", "--checkpoint", str(trained), "--data", str(tmp_path / "ds300")]) == 2
    one_error_line(capsys, "another tokenizer")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_shards_stop_a_run_before_it_touches_the_previous_one(tmp_path, trained, dataset_dir, capsys):
    before = snapshot(trained)
    broken = tmp_path / "truncated"
    shutil.copytree(dataset_dir, broken)
    shard = broken / "shard-00001.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert main(["train", *TINY, "--data", str(broken), "--out", str(trained), "--overwrite"]) == 2
    one_error_line(capsys, str(shard), "truncated")
    rehashed = tmp_path / "rehashed"
    shutil.copytree(dataset_dir, rehashed)
    manifest = json.loads((rehashed / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (rehashed / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", *TINY, "--data", str(rehashed), "--out", str(trained), "--overwrite"]) == 2
    one_error_line(capsys, str(rehashed / "shard-00000.tokens"), "SHA-256")
    assert snapshot(trained) == before


def test_parquet_without_the_text_column_and_empty_inputs(tmp_path, tokenizer, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    pq.write_table(pa.table({"body": ["some text"]}), tmp_path / "d.parquet")
    args = ["--tokenizer", str(tmp_path / "tokenizer.json"), "--no-progress"]
    assert main(["prepare-data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "x"), *args]) == 2
    one_error_line(capsys, "d.parquet", "text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    assert main(["prepare-data", str(tmp_path / "empty"), "--out", str(tmp_path / "y"), *args]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
