"""Input formats: the same documents come out of text, JSONL, Parquet and saved datasets; bad inputs are one line."""

import json

import pytest

from latentmoe.data.sources import (
    DataSourceError,
    find_sources,
    iter_documents,
    read_documents,
    source_parts,
)

from .formats import write_hf_dataset, write_jsonl, write_parquet, write_text_dir


def texts(inputs, **kwargs):
    return [doc.text for doc in iter_documents(inputs, **kwargs)]


def one_line_error(excinfo, *, starts_with) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(str(starts_with)), message
    return message


def test_every_format_yields_the_same_documents_in_order(documents, tmp_path):
    expected = list(documents)
    assert texts([write_text_dir(documents, tmp_path / "txt")]) == expected
    assert texts([write_jsonl(documents, tmp_path / "docs.jsonl")]) == expected
    assert texts([write_parquet(documents, tmp_path / "docs.parquet")]) == expected
    assert texts([write_hf_dataset(documents, tmp_path / "hf")]) == expected


def test_a_directory_is_searched_recursively_sorted_with_formats_by_suffix(documents, tmp_path):
    root = tmp_path / "mixed"
    write_text_dir(documents[:3], root / "a")
    write_jsonl(documents[3:5], root / "b.jsonl")
    write_parquet(documents[5:8], root / "c" / "d.parquet")
    write_hf_dataset(documents[8:10], root / "e")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("never read")
    (root / ".skip.txt").write_text("never read")
    sources = find_sources([root])
    assert [s.format for s in sources] == ["text"] * 3 + ["jsonl", "parquet", "hf-dataset"]
    assert texts([root]) == documents[:10]
    # A dataset prepared by latentmoe inside the folder is an output, never read as input.
    (root / "prepared").mkdir()
    (root / "prepared" / "manifest.json").write_text('{"format": "latentmoe-token-dataset"}')
    (root / "prepared" / "shard-00000.tokens").write_bytes(b"\xff\xfe")
    assert texts([root]) == documents[:10]
    only_txt = find_sources([root], glob="**/*.txt")
    assert [s.format for s in only_txt] == ["text"] * 3 + ["hf-dataset"]  # a saved dataset is always found


def test_a_saved_dataset_dict_reads_every_split_in_saved_order(documents, tmp_path):
    import datasets

    datasets.disable_progress_bars()
    parts = {"train": documents[:4], "validation": documents[4:6]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert texts([tmp_path / "dd"]) == documents[:6]


def test_non_utf8_binary_column_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", b"caf\xe9"], type=pa.binary())}), path)
    with pytest.raises(DataSourceError) as excinfo:
        texts([path])
    assert "row 1, byte 3 of the value" in one_line_error(excinfo, starts_with=path)
    assert texts([path], encoding_errors="replace") == ["fine", "caf\ufffd"]


def test_empty_texts_and_nulls_are_skipped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": ""}\n{"text": null}\n  \n{"text": "b"}\n')
    assert texts([path]) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf-dataset"])
def test_parts_cover_a_large_source_exactly(documents, tmp_path, fmt):
    writer = {"jsonl": write_jsonl, "parquet": write_parquet, "hf-dataset": write_hf_dataset}[fmt]
    name = {"jsonl": "d.jsonl", "parquet": "d.parquet", "hf-dataset": "hf"}[fmt]
    (source,) = find_sources([writer(documents, tmp_path / name)])
    parts = source_parts(source, target_bytes=8_000)
    assert len(parts) > 3
    pieces = [doc.text for part in parts for doc in read_documents(source, part=part)]
    assert pieces == list(documents)


def test_jsonl_parts_start_at_line_starts(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "x" * n}) + "\n" for n in range(1, 200)]
    path.write_text("".join(lines))
    (source,) = find_sources([path])
    data = path.read_bytes()
    for part in source_parts(source, target_bytes=500):
        assert part.start == 0 or data[part.start - 1 : part.start] == b"\n"


def test_text_field_selects_the_column(documents, tmp_path):
    path = write_jsonl(documents[:3], tmp_path / "d.jsonl", field="content")
    assert texts([path], text_field="content") == documents[:3]
    parquet = write_parquet(documents[:3], tmp_path / "d.parquet", field="content")
    assert texts([parquet], text_field="content") == documents[:3]


# ------------------------------------------------------------------------------------------------ bad inputs
def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(DataSourceError) as excinfo:
        find_sources([tmp_path / "nope.txt"])
    assert "no such file" in one_line_error(excinfo, starts_with=tmp_path / "nope.txt")


def test_directory_with_nothing_to_read(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError) as excinfo:
        find_sources([tmp_path / "empty"])
    assert "no files match" in one_line_error(excinfo, starts_with=tmp_path / "empty")


def test_non_utf8_text_names_the_byte_offset_or_is_replaced(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(DataSourceError) as excinfo:
        texts([path])
    message = one_line_error(excinfo, starts_with=path)
    assert "byte offset 3" in message and "0xe9" in message and "replace" in message
    assert texts([path], encoding_errors="replace") == ["caf\ufffd au lait\n"]


def test_non_utf8_jsonl_names_the_line_and_file_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    first = b'{"text": "ok"}\n'
    data = first + b'{"text": "bad \xff"}\n'
    path.write_bytes(data)
    with pytest.raises(DataSourceError) as excinfo:
        texts([path])
    message = one_line_error(excinfo, starts_with=path)
    assert "line 2" in message and f"byte offset {data.index(0xFF)}" in message
    assert texts([path], encoding_errors="replace") == ["ok", "bad \ufffd"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "unterminated}', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"body": "x"}', "no 'text' field"),
        ('{"text": 3}', "is a int, not a string"),
    ],
)
def test_bad_jsonl_line_names_file_and_line_number(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataSourceError) as excinfo:
        texts([path])
    message = one_line_error(excinfo, starts_with=path)
    assert "line 3" in message and expected in message


def test_line_number_is_right_in_a_later_part(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1, 100)) + "{bad\n")
    (source,) = find_sources([path])
    *_, last = source_parts(source, target_bytes=300)
    assert last.start > 0
    with pytest.raises(DataSourceError, match="line 100: not valid JSON"):
        list(read_documents(source, part=last))


def test_parquet_without_the_text_column(documents, tmp_path):
    path = write_parquet(documents[:3], tmp_path / "d.parquet", field="content")
    (source,) = find_sources([path])
    with pytest.raises(DataSourceError) as excinfo:
        source_parts(source, target_bytes=1000)
    message = one_line_error(excinfo, starts_with=path)
    assert "no column 'text'" in message and "content" in message


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("not parquet at all")
    (source,) = find_sources([path])
    with pytest.raises(DataSourceError) as excinfo:
        source_parts(source, target_bytes=1000)
    assert "not a readable Parquet file" in one_line_error(excinfo, starts_with=path)


def test_saved_dataset_without_the_text_column(documents, tmp_path):
    path = write_hf_dataset(documents[:3], tmp_path / "hf", field="content")
    (source,) = find_sources([path])
    with pytest.raises(DataSourceError) as excinfo:
        source_parts(source, target_bytes=1000)
    assert "no column 'text'" in one_line_error(excinfo, starts_with=path)


def test_missing_datasets_package_is_one_clear_line(documents, tmp_path, monkeypatch):
    import builtins

    path = write_hf_dataset(documents[:2], tmp_path / "hf")
    real_import = builtins.__import__

    def without_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_datasets)
    (source,) = find_sources([path])
    with pytest.raises(DataSourceError) as excinfo:
        source_parts(source, target_bytes=1000)
    assert "latentmoe[datasets]" in one_line_error(excinfo, starts_with=path)
