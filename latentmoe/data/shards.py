"""The on-disk format of a prepared dataset: token shards, document indexes and one JSON manifest.

A prepared dataset is a directory::

    manifest.json          what is here (below); the marker that makes the directory ours
    tokenizer.json         the tokenizer every shard was encoded with (HF ``tokenizers`` format)
    shard-00000.tokens     token ids, raw little-endian uint16 (vocabulary <= 65,536) or uint32
    shard-00000.docs       int64 little-endian: the offset of every document's BOS inside the shard
    ...
    .prepare.lock          held (flock) while prepare-data writes here

Shard ``i`` holds the documents of work unit ``i`` (:mod:`latentmoe.data.prepare`), each framed as
``BOS ids EOS``: first all its training documents, then all its validation documents. The training
stream of the dataset is the concatenation of every shard's training region in shard order, the
validation stream that of the validation regions; ``.docs`` lists the training documents' starts, then
the validation documents' (offsets from the start of the shard, so the latter are ``>= train_tokens``).

The manifest (``format_version`` 1) holds: ``complete`` (all units written), the ``tokenizer``
(file, SHA-256 of its canonical JSON, vocabulary size, BOS/EOS ids, how it was made), the token
``dtype``, the ``framing``, the ``split`` rule, the ``settings`` that shaped the shards, the
``sources`` (path, format, bytes, mtime, group), the ``units`` (which source ranges each shard holds),
the ``shards`` written so far (file, bytes, SHA-256, token and document counts for both splits, the
largest id, the ``.docs`` file with its bytes and SHA-256) and the ``totals``.

Crash safety: a shard is written to a temporary sibling (``NAME.tmp-PID``), fsynced and renamed; only
then is it recorded in the manifest, which is itself replaced atomically (temp, fsync, rename, fsync
of the directory). A shard that is not in the manifest does not exist for a reader; a killed run
leaves at most temporary files, which the next run removes (they match our names exactly).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
LOCK_NAME = ".prepare.lock"
DATASET_FORMAT = "latentmoe-token-dataset"
FORMAT_VERSION = 1
SHARD_TOKENS = "shard-{index:05d}.tokens"
SHARD_DOCS = "shard-{index:05d}.docs"
SHARD_NAME_RE = re.compile(r"^shard-\d{5,}\.(tokens|docs)$")
TEMP_SUFFIX_RE = re.compile(r"\.tmp-\d+$")
DOCS_DTYPE = np.dtype("<i8")
UINT16_VOCAB_LIMIT = 1 << 16
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
FRAMING = "BOS ids EOS per document, documents concatenated; train documents first, then val, in each shard"
HASH_CHUNK_BYTES = 8 << 20


class DatasetError(ValueError):
    """A prepared dataset that cannot be used (or made) as asked. The message is one line naming the file."""


def token_dtype(vocab_size: int) -> str:
    """``"uint16"`` when every id of a ``vocab_size`` vocabulary fits in 16 bits, else ``"uint32"``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


def shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    return Path(out_dir) / SHARD_TOKENS.format(index=index), Path(out_dir) / SHARD_DOCS.format(index=index)


def temp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def is_our_temp_file(name: str) -> bool:
    """A temporary file this package writes: one of our names followed by ``.tmp-PID``."""
    if not TEMP_SUFFIX_RE.search(name):
        return False
    base = TEMP_SUFFIX_RE.sub("", name)
    return base in (MANIFEST_NAME, TOKENIZER_NAME) or bool(SHARD_NAME_RE.match(base))


def is_reserved_name(name: str) -> bool:
    """A name prepare-data writes (it refuses to write into a directory where another file has one)."""
    return name in (MANIFEST_NAME, TOKENIZER_NAME) or bool(SHARD_NAME_RE.match(name)) or is_our_temp_file(name)


def fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: temp sibling, fsync, rename, fsync of the directory."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    """One written shard, as the manifest records it (field names are the manifest's keys)."""

    index: int
    file: str
    bytes: int
    sha256: str
    tokens: int
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    max_token_id: int
    text_bytes: int
    docs_file: str
    docs_bytes: int
    docs_sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: Path) -> ShardRecord:
        try:
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: a shard record lacks {exc} (the manifest is damaged)") from None


class ShardWriter:
    """Writes shard ``index`` of ``out_dir``: training documents stream to a temporary sibling as they
    come; validation documents are held (they are the small split) and follow them at :meth:`commit`,
    which fsyncs and renames both files and returns the :class:`ShardRecord` to put in the manifest.
    Nothing is visible under the final names until then; :meth:`abort` (or leaving a ``with`` block
    by an exception) removes the temporary files.

    ``add(ids_lists, split=...)`` takes already-encoded documents (lists of ids without BOS/EOS) and
    frames each as ``BOS ids EOS``.
    """

    def __init__(self, out_dir: Path, index: int, *, dtype: str, bos_id: int, eos_id: int) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.index = index
        self.dtype = DTYPES[dtype]
        self.bos_id, self.eos_id = bos_id, eos_id
        self.tokens_path, self.docs_path = shard_paths(out_dir, index)
        self._tokens_tmp = temp_sibling(self.tokens_path)
        self._docs_tmp = temp_sibling(self.docs_path)
        self._file = open(self._tokens_tmp, "wb")
        self._hash = hashlib.sha256()
        self._train_tokens = 0
        self._train_starts: list[np.ndarray] = []
        self._val_chunks: list[np.ndarray] = []
        self._val_starts: list[np.ndarray] = []
        self._val_tokens = 0
        self._max_id = -1
        self.text_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, ids_lists: Sequence[Sequence[int]], *, split: str, text_bytes: int = 0) -> None:
        """Append documents (each a sequence of ids) to ``split`` ("train" or "val")."""
        if not ids_lists:
            self.text_bytes += text_bytes
            return
        tokens, starts = frame_documents(ids_lists, bos_id=self.bos_id, eos_id=self.eos_id, dtype=self.dtype)
        self.add_framed(tokens, starts, split=split, text_bytes=text_bytes)

    def add_framed(self, tokens_N: np.ndarray, starts_D: np.ndarray, *, split: str, text_bytes: int = 0) -> None:
        """Append documents already framed and concatenated: ``tokens_N`` (the shard's dtype) with each
        document's BOS at ``starts_D`` (offsets into ``tokens_N``, increasing, ``starts_D[0] == 0``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        tokens_N = np.ascontiguousarray(tokens_N, dtype=self.dtype)
        starts_D = np.asarray(starts_D, dtype=np.int64)
        if tokens_N.size and (starts_D.size == 0 or starts_D[0] != 0 or np.any(tokens_N[starts_D] != self.bos_id)):
            raise ValueError("starts_D must point at the BOS of every document, the first at 0")
        self.text_bytes += text_bytes
        if tokens_N.size:
            self._max_id = max(self._max_id, int(tokens_N.max()))
        if split == "train":
            self._train_starts.append(starts_D + self._train_tokens)
            data = tokens_N.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._train_tokens += tokens_N.size
        else:
            self._val_starts.append(starts_D + self._val_tokens)
            self._val_chunks.append(tokens_N)
            self._val_tokens += tokens_N.size

    def commit(self) -> ShardRecord:
        """Write the validation region, fsync, rename both files into place; return the record."""
        for chunk in self._val_chunks:
            data = chunk.tobytes()
            self._file.write(data)
            self._hash.update(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        val_starts = [s + self._train_tokens for s in self._val_starts]
        starts = np.concatenate([*self._train_starts, *val_starts]) if self._train_starts or val_starts else None
        starts = np.empty(0, dtype=DOCS_DTYPE) if starts is None else starts.astype(DOCS_DTYPE)
        docs_data = starts.tobytes()
        with open(self._docs_tmp, "wb") as f:
            f.write(docs_data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._docs_tmp, self.docs_path)
        os.replace(self._tokens_tmp, self.tokens_path)
        fsync_directory(self.tokens_path.parent)
        tokens = self._train_tokens + self._val_tokens
        return ShardRecord(
            index=self.index,
            file=self.tokens_path.name,
            bytes=tokens * self.dtype.itemsize,
            sha256=self._hash.hexdigest(),
            tokens=tokens,
            train_tokens=self._train_tokens,
            val_tokens=self._val_tokens,
            train_documents=sum(s.size for s in self._train_starts),
            val_documents=sum(s.size for s in self._val_starts),
            max_token_id=self._max_id,
            text_bytes=self.text_bytes,
            docs_file=self.docs_path.name,
            docs_bytes=len(docs_data),
            docs_sha256=hashlib.sha256(docs_data).hexdigest(),
        )

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tokens_tmp.unlink(missing_ok=True)
        self._docs_tmp.unlink(missing_ok=True)


def frame_documents(
    ids_lists: Sequence[Sequence[int]], *, bos_id: int, eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, starts)``: the documents framed as ``BOS ids EOS`` and concatenated, and the offset of
    each document's BOS. The numpy counterpart of :func:`latentmoe.data.batching.encode_documents`."""
    lengths = np.fromiter((len(ids) for ids in ids_lists), dtype=np.int64, count=len(ids_lists))
    ends = np.cumsum(lengths + 2)  # one past each document's EOS
    starts = ends - lengths - 2
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    body = np.ones(tokens.size, dtype=bool)
    body[starts] = False
    body[ends - 1] = False
    tokens[starts] = bos_id
    tokens[ends - 1] = eos_id
    tokens[body] = np.fromiter(itertools.chain.from_iterable(ids_lists), dtype=dtype, count=int(lengths.sum()))
    return tokens, starts


# ------------------------------------------------------------------------------------------------ manifest
def manifest_path(out_dir: Path) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` holds a manifest of ours (complete or not)."""
    try:
        data = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == DATASET_FORMAT


def make_manifest(
    *,
    settings: dict[str, Any],
    sources: Sequence[dict[str, Any]] = (),
    units: Sequence[dict[str, Any]] = (),
    shards: Sequence[ShardRecord] = (),
    tokenizer: dict[str, Any] | None = None,
    complete: bool = False,
) -> dict[str, Any]:
    """A manifest in the layout of the module docstring; ``totals`` are filled in when ``complete``."""
    manifest = {
        "format": DATASET_FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "tokenizer": tokenizer,
        "dtype": None if tokenizer is None else token_dtype(tokenizer["vocab_size"]),
        "framing": FRAMING,
        "split": {"rule": settings.get("split"), "val_fraction": settings.get("val_fraction")},
        "settings": dict(settings),
        "sources": list(sources),
        "units": list(units),
        "shards": [r.to_json() for r in shards],
        "totals": None,
    }
    if complete:
        manifest["totals"] = manifest_totals(manifest)
    return manifest


def manifest_totals(manifest: dict[str, Any]) -> dict[str, int]:
    """Sums over the recorded shards (tokens include BOS/EOS) and the sources' bytes."""
    keys = ("tokens", "train_tokens", "val_tokens", "train_documents", "val_documents", "text_bytes", "bytes")
    totals = {k: sum(int(r[k]) for r in manifest["shards"]) for k in keys}
    totals["shards"] = len(manifest["shards"])
    totals["source_bytes"] = sum(int(s["bytes"]) for s in manifest["sources"])
    return totals


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of the dataset in ``out_dir``; :class:`DatasetError` (one line) when it is missing,
    not JSON, not ours, or of a newer format."""
    path = manifest_path(out_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: no such file; {Path(out_dir)} is not a prepared dataset (run prepare-data)"
        ) from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); the manifest is damaged") from None
    if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path}: not a latentmoe dataset manifest (no \"format\": \"{DATASET_FORMAT}\")")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {version!r}; this latentmoe reads version {FORMAT_VERSION}")
    return data


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(manifest_path(out_dir), format_manifest(manifest).encode("utf-8"))


def format_manifest(manifest: dict[str, Any]) -> str:
    """JSON with one line per top-level key, and one line per item of the long lists (sources, units,
    shards): readable with ``less`` and ``grep``, and small."""
    lines = []
    for key, value in manifest.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"  {json.dumps(item)}" for item in value)
            lines.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def check_shard_files(out_dir: Path, record: ShardRecord, *, dtype: str, hashes: bool) -> None:
    """Raise :class:`DatasetError` naming the file unless both files of ``record`` are there with the
    recorded sizes (and, when ``hashes``, the recorded SHA-256) and the sizes agree with the counts."""
    itemsize = DTYPES[dtype].itemsize
    tokens_path, docs_path = Path(out_dir) / record.file, Path(out_dir) / record.docs_file
    if record.bytes != record.tokens * itemsize or record.tokens != record.train_tokens + record.val_tokens:
        raise DatasetError(f"{tokens_path}: the manifest's sizes for this shard disagree (the manifest is damaged)")
    if record.docs_bytes != (record.train_documents + record.val_documents) * DOCS_DTYPE.itemsize:
        raise DatasetError(f"{docs_path}: the manifest's sizes for this index disagree (the manifest is damaged)")
    for path, size, digest in ((tokens_path, record.bytes, record.sha256), (docs_path, record.docs_bytes,
                                                                            record.docs_sha256)):
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise DatasetError(f"{path}: missing (the manifest lists it); re-run prepare-data") from None
        if actual != size:
            raise DatasetError(
                f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced); re-run prepare-data"
            )
        if hashes and file_sha256(path) != digest:
            raise DatasetError(
                f"{path}: SHA-256 differs from the manifest's (corrupt or replaced); re-run prepare-data"
            )
