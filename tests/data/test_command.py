"""``latentmoe prepare-data``: the thin CLI over prepare_data (success, resume, one-line errors)."""

import json

from latentmoe.cli import main
from latentmoe.data import TokenDataset

from .formats import write_jsonl


def test_prepare_data_command_trains_a_tokenizer_resumes_and_reports_json(documents, tmp_path, capsys):
    source = write_jsonl(documents, tmp_path / "d.jsonl")
    out = tmp_path / "ds"
    args = ["prepare-data", str(source), "--out", str(out), "--tokenizer", "train", "--vocab-size", "300",
            "--no-progress"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"prepared {out}: 1 shards (1 written, 0 already done)")
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["shards_written"], result["shards_skipped"]) == (0, 1)
    data = TokenDataset.open(out)
    assert data.vocab_size == 300 and result["train_tokens"] == data.train_tokens


def test_bad_input_is_one_error_line_and_exit_status_2(documents, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = write_jsonl(documents[:3], tmp_path / "d.jsonl")
    assert main(["prepare-data", str(source), "--out", str(out), "--tokenizer", "train", "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentmoe: error: ") and "did not write (keep.txt)" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["prepare-data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"), "--tokenizer",
                 "train", "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"latentmoe: error: {tmp_path / 'missing.jsonl'}: no such file or directory"
    assert not (tmp_path / "x").exists()
