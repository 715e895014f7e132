"""Where documents come from: text files, JSON Lines, Parquet, and ``datasets.save_to_disk`` directories.

A *source* is one input file (or one saved Hugging Face dataset directory); a *document* is one
unit of text that :mod:`latentmoe.data.prepare` frames as ``BOS ids EOS``:

============  ==================================  ====================================================
format        recognised by                       one document is
============  ==================================  ====================================================
text          any other file                      the whole file
jsonl         ``.jsonl`` / ``.ndjson`` suffix     the ``text_field`` string of one line's JSON object
parquet       ``.parquet`` suffix                 the ``text_field`` value of one row (read row group
                                                  by row group through ``pyarrow``, never whole)
hf-dataset    a directory with ``state.json`` or  the ``text_field`` value of one row; a
              ``dataset_dict.json`` in it          ``DatasetDict`` gives its splits in saved order
============  ==================================  ====================================================

:func:`find_sources` turns input paths into :class:`SourceFile` records: a file is one source; a
directory is searched recursively with ``glob`` (default ``**/*``), in sorted order, skipping hidden
entries (names starting with ``.``), directories listed in ``exclude`` (the output of a run) and
datasets prepared by latentmoe; a saved Hugging Face dataset found inside it is one source.
:func:`read_documents` yields the documents of one source, or of a range of it
(:func:`source_parts` cuts a large file into ranges so that several processes can tokenise it:
byte ranges at line starts for JSON Lines, row groups for Parquet, rows for a saved dataset; a text
file is never cut, it is one document).

Empty texts and null values are skipped (they add no tokens). Text is decoded as UTF-8; bytes that
are not UTF-8 raise :class:`DataSourceError` naming the file and the byte offset, unless
``encoding_errors="replace"`` (each bad byte becomes U+FFFD). Every bad input — a missing file, a
JSONL line that is not a JSON object with a string ``text_field`` (its line number is named), a
Parquet file or dataset without the text column, a dataset without rows — raises
:class:`DataSourceError` with a one-line message that starts with the file's path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMATS = ("text", "jsonl", "parquet", "hf-dataset")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_DATASET_MARKERS = ("dataset_dict.json", "state.json")
DEFAULT_GLOB = "**/*"
DEFAULT_TEXT_FIELD = "text"
ENCODING_ERRORS = ("strict", "replace")
UTF8_BOM = b"\xef\xbb\xbf"
# Rows per read from a saved dataset: big enough to amortise the per-batch overhead, small enough to stay light.
HF_READ_BATCH_ROWS = 1024
READ_CHUNK_BYTES = 1 << 20


class DataSourceError(ValueError):
    """A bad input. The message is one line that starts with the path of the file at fault."""


@dataclass(frozen=True)
class SourceFile:
    """One input. ``path`` is absolute; ``bytes``/``mtime_ns`` identify the version that was read (for a
    saved dataset: the sum of its files' sizes and the newest modification time)."""

    path: Path
    format: str
    bytes: int
    mtime_ns: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceFile:
        return cls(
            path=Path(data["path"]), format=data["format"], bytes=int(data["bytes"]), mtime_ns=int(data["mtime_ns"])
        )


@dataclass(frozen=True)
class Document:
    """One document. ``position`` locates it in its source: the byte offset of its line (jsonl), the
    0-based row (parquet, hf-dataset) or 0 (text)."""

    source: Path
    position: int
    text: str


@dataclass(frozen=True)
class SourcePart:
    """A range of one source read by one worker: ``[start, stop)`` in the format's unit (bytes at line
    starts for jsonl, row groups for parquet, rows for hf-dataset; ``(0, 0)``: the whole text file).
    ``bytes`` estimates the text it holds (for grouping and progress)."""

    start: int
    stop: int
    bytes: int


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in HF_DATASET_MARKERS)


def detect_format(path: Path) -> str:
    """The format of ``path`` by the table in the module docstring."""
    if path.is_dir():
        if is_hf_dataset_dir(path):
            return "hf-dataset"
        raise DataSourceError(f"{path}: a directory, but not one saved by datasets.save_to_disk")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _stat_source(path: Path, fmt: str) -> SourceFile:
    if fmt == "hf-dataset":
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        stats = [p.stat() for p in files]
        size = sum(s.st_size for s in stats)
        mtime = max((s.st_mtime_ns for s in stats), default=path.stat().st_mtime_ns)
    else:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return SourceFile(path=path, format=fmt, bytes=size, mtime_ns=mtime)


def stat_source(source: SourceFile) -> SourceFile:
    """``source`` as it is on disk now (same path and format, current size and modification time)."""
    return _stat_source(source.path, source.format)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _search_directory(root: Path, glob: str, exclude: Sequence[Path]) -> list[tuple[Path, str]]:
    from latentmoe.data.shards import MANIFEST_NAME, is_dataset_dir

    # Datasets prepared here are outputs, never inputs (a run writing into a folder it reads, say).
    exclude = [*exclude, *(m.parent for m in root.rglob(MANIFEST_NAME) if is_dataset_dir(m.parent))]

    def excluded(path: Path) -> bool:
        return any(path == e or e in path.parents for e in exclude)

    dataset_dirs = sorted(
        {marker.parent for name in HF_DATASET_MARKERS for marker in root.rglob(name)},
        key=lambda p: p.as_posix(),
    )
    # The outermost saved dataset wins (a DatasetDict's splits are directories with their own state.json).
    outer = [d for d in dataset_dirs if not any(o in d.parents for o in dataset_dirs)]
    outer = [d for d in outer if not _hidden(d.relative_to(root)) and not excluded(d)]
    found: list[tuple[Path, str]] = [(d, "hf-dataset") for d in outer]
    for path in root.glob(glob):
        if not path.is_file() or _hidden(path.relative_to(root)) or excluded(path):
            continue
        if any(d == path.parent or d in path.parents for d in dataset_dirs):
            continue  # a file of a saved dataset (or of one we skipped): never text on its own
        found.append((path, detect_format(path)))
    return sorted(found, key=lambda item: item[0].relative_to(root).as_posix())


def find_sources(
    inputs: Sequence[str | os.PathLike], *, glob: str = DEFAULT_GLOB, exclude: Sequence[str | os.PathLike] = ()
) -> list[SourceFile]:
    """The sources named by ``inputs`` (files or directories), in order, each file once.

    A directory contributes every file matching ``glob`` below it (sorted by relative path; hidden
    entries and ``exclude`` skipped) and every saved dataset inside it. Raises :class:`DataSourceError`
    for a missing input or a directory with nothing to read.
    """
    if not inputs:
        raise DataSourceError("no inputs: name at least one file or directory")
    excluded = [Path(e).resolve() for e in exclude]
    sources: list[SourceFile] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataSourceError(f"{path}: no such file or directory")
        path = path.resolve()
        if path.is_dir() and not is_hf_dataset_dir(path):
            found = _search_directory(path, glob, excluded)
            if not found:
                raise DataSourceError(f"{path}: no files match {glob!r}")
        else:
            found = [(path, detect_format(path))]
        for file, fmt in found:
            if file not in seen:
                seen.add(file)
                sources.append(_stat_source(file, fmt))
    return sources


# ------------------------------------------------------------------------------------------------ decoding
def decode_utf8(data: bytes, *, path: Path, base_offset: int, encoding_errors: str, row: int | None = None) -> str:
    """``data`` as text; a strict decoding error names ``path`` and the offset of the bad byte (in the
    file, or in the value of ``row`` for a binary column)."""
    try:
        return data.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        where = f"byte offset {base_offset + exc.start}" if row is None else f"row {row}, byte {exc.start} of the value"
        raise DataSourceError(
            f"{path}: not UTF-8 at {where} (byte 0x{data[exc.start]:02x}); "
            "pass encoding_errors='replace' (--encoding-errors replace) to substitute U+FFFD"
        ) from None


def _check_encoding_errors(encoding_errors: str) -> None:
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, got {encoding_errors!r}")


# ------------------------------------------------------------------------------------------------ text
def _read_text(source: SourceFile, encoding_errors: str) -> Iterator[Document]:
    try:
        data = source.path.read_bytes()
    except OSError as exc:
        raise DataSourceError(f"{source.path}: cannot read ({exc.strerror})") from None
    text = decode_utf8(data, path=source.path, base_offset=0, encoding_errors=encoding_errors)
    if text:
        yield Document(source=source.path, position=0, text=text)


# ------------------------------------------------------------------------------------------------ jsonl
def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (counted only when an error needs it)."""
    count = 1
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(READ_CHUNK_BYTES, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def _jsonl_parts(source: SourceFile, target_bytes: int) -> list[SourcePart]:
    """Byte ranges of about ``target_bytes``, each starting at a line start."""
    starts = [0]
    with open(source.path, "rb") as f:
        position = target_bytes
        while position < source.bytes:
            f.seek(position)
            f.readline()  # to the end of the line that ``position`` falls in
            start = f.tell()
            if start >= source.bytes:
                break
            starts.append(start)
            position = start + target_bytes
    bounds = [*starts, source.bytes]
    return [SourcePart(start=a, stop=b, bytes=b - a) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _read_jsonl(
    source: SourceFile, text_field: str, encoding_errors: str, start: int, stop: int
) -> Iterator[Document]:
    path = source.path
    first_line: int | None = 1 if start == 0 else None  # counted lazily when an error needs a line number
    lines_read = 0

    def where() -> str:
        nonlocal first_line
        if first_line is None:
            first_line = _line_number(path, start)
        return f"{path}: line {first_line + lines_read}"

    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while offset < stop:
            raw = f.readline()
            if not raw:
                break
            line_offset, offset = offset, offset + len(raw)
            if line_offset == 0 and raw.startswith(UTF8_BOM):
                raw, line_offset = raw[len(UTF8_BOM) :], len(UTF8_BOM)
            if raw.strip():
                text = _jsonl_text(raw, path, line_offset, text_field, encoding_errors, where)
                if text:
                    yield Document(source=path, position=line_offset, text=text)
            lines_read += 1


def _jsonl_text(raw: bytes, path: Path, line_offset: int, text_field: str, encoding_errors: str, where) -> str | None:
    try:
        line = raw.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as exc:
        raise DataSourceError(
            f"{where()}: not UTF-8 at byte offset {line_offset + exc.start} (byte 0x{raw[exc.start]:02x}); "
            "pass encoding_errors='replace' (--encoding-errors replace) to substitute U+FFFD"
        ) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataSourceError(f"{where()}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataSourceError(
            f"{where()}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}"
        )
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise DataSourceError(f"{where()}: no {text_field!r} field (fields: {keys}); choose one with text_field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataSourceError(f"{where()}: field {text_field!r} is a {type(text).__name__}, not a string")
    return text


# ------------------------------------------------------------------------------------------------ parquet
def _open_parquet(source: SourceFile, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as exc:
        raise DataSourceError(f"{source.path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataSourceError(
            f"{source.path}: no column {text_field!r} (columns: {', '.join(schema.names) or 'none'}); "
            "choose one with text_field"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise DataSourceError(f"{source.path}: column {text_field!r} holds {kind}, not text")
    return parquet


def _parquet_parts(source: SourceFile, text_field: str, target_bytes: int) -> list[SourcePart]:
    """Runs of consecutive row groups holding about ``target_bytes`` (uncompressed) each."""
    metadata = _open_parquet(source, text_field).metadata
    if metadata.num_rows == 0:
        return []
    parts, first, size = [], 0, 0
    for i in range(metadata.num_row_groups):
        size += metadata.row_group(i).total_byte_size
        if size >= target_bytes or i == metadata.num_row_groups - 1:
            parts.append(SourcePart(start=first, stop=i + 1, bytes=size))
            first, size = i + 1, 0
    return parts


def _read_parquet(
    source: SourceFile, text_field: str, encoding_errors: str, start: int, stop: int
) -> Iterator[Document]:
    parquet = _open_parquet(source, text_field)
    metadata = parquet.metadata
    row = sum(metadata.row_group(i).num_rows for i in range(start))
    for group in range(start, stop):
        column = parquet.read_row_group(group, columns=[text_field]).column(text_field)
        try:
            values = column.to_pylist()
        except UnicodeDecodeError as exc:
            raise DataSourceError(
                f"{source.path}: row group {group}: not UTF-8 ({exc.reason}); "
                "store the column as binary to use encoding_errors='replace'"
            ) from None
        for value in values:
            if isinstance(value, bytes):
                value = decode_utf8(value, path=source.path, base_offset=0, encoding_errors=encoding_errors, row=row)
            if value:
                yield Document(source=source.path, position=row, text=value)
            row += 1


# ------------------------------------------------------------------------------------------------ datasets
def _load_hf_dataset(source: SourceFile, text_field: str):
    """The saved dataset as a list of ``datasets.Dataset`` (one per split), the text column checked."""
    try:
        import datasets
    except ImportError:
        raise DataSourceError(
            f"{source.path}: reading a datasets.save_to_disk directory needs the 'datasets' package "
            "(pip install 'latentmoe[datasets]')"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, ValueError, ArrowInvalid...)
        raise DataSourceError(f"{source.path}: not a readable saved dataset ({str(exc).splitlines()[0]})") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise DataSourceError(
                f"{source.path}: no column {text_field!r} (columns: {', '.join(part.column_names) or 'none'}); "
                "choose one with text_field"
            )
    return parts


def _hf_parts(source: SourceFile, text_field: str, target_bytes: int) -> list[SourcePart]:
    rows = sum(part.num_rows for part in _load_hf_dataset(source, text_field))
    if rows == 0:
        return []
    rows_per_part = max(1, math.ceil(rows * target_bytes / max(source.bytes, 1)))
    bounds = [*range(0, rows, rows_per_part), rows]
    return [
        SourcePart(start=a, stop=b, bytes=round(source.bytes * (b - a) / rows)) for a, b in zip(bounds[:-1], bounds[1:])
    ]


def _read_hf(source: SourceFile, text_field: str, encoding_errors: str, start: int, stop: int) -> Iterator[Document]:
    offset = 0  # first global row of the current split
    for part in _load_hf_dataset(source, text_field):
        lo, hi = max(start - offset, 0), min(stop - offset, part.num_rows)
        if lo < hi:
            rows = part.select_columns([text_field]).select(range(lo, hi))
            row = offset + lo
            for batch in rows.iter(batch_size=HF_READ_BATCH_ROWS):
                for value in batch[text_field]:
                    if isinstance(value, bytes):
                        value = decode_utf8(
                            value, path=source.path, base_offset=0, encoding_errors=encoding_errors, row=row
                        )
                    elif value is not None and not isinstance(value, str):
                        raise DataSourceError(
                            f"{source.path}: row {row}: column {text_field!r} holds {type(value).__name__}, not text"
                        )
                    if value:
                        yield Document(source=source.path, position=row, text=value)
                    row += 1
        offset += part.num_rows


# ------------------------------------------------------------------------------------------------ public
def source_parts(source: SourceFile, *, target_bytes: int, text_field: str = DEFAULT_TEXT_FIELD) -> list[SourcePart]:
    """``source`` cut into ranges of about ``target_bytes`` of text (see :class:`SourcePart`); no ranges
    for an empty source. Raises :class:`DataSourceError` when the source cannot be read as its format
    (Parquet without the text column, a broken saved dataset)."""
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be >= 1, got {target_bytes}")
    if source.format == "text":
        return [SourcePart(start=0, stop=0, bytes=source.bytes)] if source.bytes else []
    if source.format == "jsonl":
        return _jsonl_parts(source, target_bytes)
    if source.format == "parquet":
        return _parquet_parts(source, text_field, target_bytes)
    if source.format == "hf-dataset":
        return _hf_parts(source, text_field, target_bytes)
    raise ValueError(f"unknown source format {source.format!r}; expected one of {', '.join(FORMATS)}")


def read_documents(
    source: SourceFile,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    encoding_errors: str = "strict",
    part: SourcePart | None = None,
) -> Iterator[Document]:
    """The non-empty documents of ``source`` (or of one of its :func:`source_parts`), in order."""
    _check_encoding_errors(encoding_errors)
    if source.format == "text":
        return _read_text(source, encoding_errors)
    if not source.path.exists():
        raise DataSourceError(f"{source.path}: no such file or directory")
    if source.format == "jsonl":
        start, stop = (0, source.path.stat().st_size) if part is None else (part.start, part.stop)
        return _read_jsonl(source, text_field, encoding_errors, start, stop)
    if source.format == "parquet":
        start, stop = (0, _open_parquet(source, text_field).num_row_groups) if part is None else (part.start, part.stop)
        return _read_parquet(source, text_field, encoding_errors, start, stop)
    if source.format == "hf-dataset":
        if part is None:
            start, stop = 0, sum(p.num_rows for p in _load_hf_dataset(source, text_field))
        else:
            start, stop = part.start, part.stop
        return _read_hf(source, text_field, encoding_errors, start, stop)
    raise ValueError(f"unknown source format {source.format!r}; expected one of {', '.join(FORMATS)}")


def iter_documents(
    inputs: Sequence[str | os.PathLike],
    *,
    glob: str = DEFAULT_GLOB,
    text_field: str = DEFAULT_TEXT_FIELD,
    encoding_errors: str = "strict",
) -> Iterator[Document]:
    """Every document of every source named by ``inputs`` (:func:`find_sources`), in order."""
    for source in find_sources(inputs, glob=glob):
        yield from read_documents(source, text_field=text_field, encoding_errors=encoding_errors)
