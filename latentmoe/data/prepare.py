"""prepare-data: tokenise text once into memory-mapped token shards (the format is in :mod:`.shards`).

What one run does
-----------------
1. **Find the sources** (:func:`~latentmoe.data.sources.find_sources`) and cut them into *work units*
   of about ``shard_bytes`` of text each: consecutive small files share a unit, a large JSONL /
   Parquet / saved dataset is cut into ranges (a text file is one document and is never cut). The
   plan depends only on the sources and ``shard_bytes`` — never on ``workers`` — and unit ``i``
   becomes shard ``i``.
2. **The tokenizer**: a given ``tokenizer.json`` (or a directory holding one), or a byte-level BPE
   trained with :func:`~latentmoe.data.tokenizer.train_tokenizer` (``vocab_size``; ``<|bos|>`` = 0,
   ``<|eos|>`` = 1, ``<|pad|>`` = 2) on a sample of the *training* text: from every unit in order, its
   first ``tokenizer_sample_bytes * unit_bytes / total_bytes`` bytes, so the sample is spread over all
   the data. Either way it is saved as ``tokenizer.json`` beside the shards. BOS/EOS of a given
   tokenizer: ``bos_token``/``eos_token``, else those of a ``tokenizer_config.json`` beside it, else
   ``<|bos|>``/``<|eos|>``.
3. **Tokenise every unit** — in this process (``workers=1``) or in a pool of ``workers`` processes
   (``spawn``: each imports this module and the caller's main script, which should therefore be
   light and guarded by ``if __name__ == "__main__"``; each loads the tokenizer file) — each
   document framed ``BOS ids EOS`` exactly as :func:`~latentmoe.data.batching.encode_documents`
   does, into the shard files; after each shard the manifest is replaced atomically with the shard
   recorded.

Validation split (deterministic, stated)
----------------------------------------
``split="document"`` (the default): a whole document is validation iff
``int.from_bytes(blake2b(utf8(text), digest_size=8), "little") / 2**64 < val_fraction`` — a
function of its text alone, so the split is the same whatever the order, the format, the number of
workers or later appends, and an exact duplicate always lands on the same side.
``split="tail"``: every document is cut by :func:`~latentmoe.data.corpus.split_point` (its last
``val_fraction`` at a line start is validation), the rule of the shipped corpus.

Resuming, appending, overwriting
--------------------------------
A re-run with the same inputs and settings skips every shard the manifest records whose files have
the recorded sizes, removes temporary files a killed run left, and redoes the rest: an interrupted
shard is redone from the start, never half-used. A re-run whose inputs changed (paths, sizes or
modification times) or whose settings differ is refused with one line — unless no shard was written
yet, or ``overwrite=True``. ``append=True`` keeps what is there and adds the sources not yet in the
dataset as new shards after the existing ones (old sources are not re-read; they may be gone).

Where it writes: ``out_dir`` must be missing, empty, or a dataset prepared here. Anything else is
refused unless ``overwrite=True``, and even then only files this package writes are replaced or
removed (a file of someone else's bearing one of our names makes it refuse).

Progress goes to ``progress(PrepareProgress)`` (bytes/s, ETA), called in this process after every
encoded batch of about ``encode_batch_bytes`` of text; library code never prints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from latentmoe.data.corpus import DEFAULT_VAL_FRACTION, split_point
from latentmoe.data.shards import (
    DATASET_FORMAT,
    LOCK_NAME,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DatasetError,
    ShardRecord,
    ShardWriter,
    atomic_write_bytes,
    check_shard_files,
    fsync_directory,
    is_our_temp_file,
    is_reserved_name,
    make_manifest,
    manifest_totals,
    read_manifest,
    token_dtype,
    write_manifest,
)
from latentmoe.data.sources import (
    DEFAULT_GLOB,
    DEFAULT_TEXT_FIELD,
    ENCODING_ERRORS,
    DataSourceError,
    SourceFile,
    SourcePart,
    find_sources,
    read_documents,
    source_parts,
    stat_source,
)
from latentmoe.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    tokenizer_digest,
    train_tokenizer,
)

if TYPE_CHECKING:
    from latentmoe.data.dataset import TokenDataset

SPLIT_RULES = ("document", "tail")
TRAIN_TOKENIZER = "train"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_SHARD_BYTES = 32 << 20
DEFAULT_ENCODE_BATCH_BYTES = 1 << 20
DEFAULT_TOKENIZER_SAMPLE_BYTES = 64 << 20
HASH_SPLIT_BYTES = 8
PROGRESS_POLL_S = 0.2
SHIPPED_CORPUS_GLOB = "*.txt"


# ------------------------------------------------------------------------------------------------ split rules
def document_in_validation(text: str, val_fraction: float) -> bool:
    """The ``split="document"`` rule: is this whole document validation text? (module docstring)"""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=HASH_SPLIT_BYTES).digest()
    return int.from_bytes(digest, "little") / 2 ** (8 * HASH_SPLIT_BYTES) < val_fraction


def split_text(text: str, *, rule: str, val_fraction: float) -> tuple[str, str]:
    """``(train_text, val_text)`` of one document under ``rule`` ("document" or "tail")."""
    if rule == "document":
        return ("", text) if document_in_validation(text, val_fraction) else (text, "")
    if rule == "tail":
        cut = split_point(text, val_fraction)
        return text[:cut], text[cut:]
    raise ValueError(f"split must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")


# ------------------------------------------------------------------------------------------------ progress
@dataclass(frozen=True)
class PrepareProgress:
    """Where a run stands. Bytes are text bytes (UTF-8); ``bytes_total`` is the plan's estimate.
    ``run_bytes`` counts only what this run tokenised (skipped shards excluded), for the rate."""

    bytes_done: int
    bytes_total: int
    tokens_done: int
    shards_done: int
    shards_total: int
    elapsed_s: float
    run_bytes: int

    @property
    def bytes_per_s(self) -> float:
        return self.run_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.bytes_per_s
        return max(self.bytes_total - self.bytes_done, 0) / rate if rate > 0 else None


ProgressFn = Callable[[PrepareProgress], None]


@dataclass(frozen=True)
class PrepareResult:
    """What a run did. Token counts include the BOS/EOS framing."""

    out_dir: Path
    manifest_path: Path
    tokenizer_path: Path
    shards_total: int
    shards_written: int
    shards_skipped: int
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    text_bytes: int
    seconds: float


# ------------------------------------------------------------------------------------------------ tokenizer
@dataclass(frozen=True)
class ResolvedTokenizer:
    tokenizer: Tokenizer
    bos_token: str
    eos_token: str
    bos_id: int
    eos_id: int
    origin: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {
            "file": TOKENIZER_NAME,
            "sha256": tokenizer_digest(self.tokenizer),
            "vocab_size": self.tokenizer.get_vocab_size(with_added_tokens=True),
            "bos_token": self.bos_token,
            "bos_id": self.bos_id,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "origin": self.origin,
        }


def _config_special(path: Path, key: str) -> str | None:
    config = path.parent / TOKENIZER_CONFIG_NAME
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        raise DatasetError(f"{config}: not a readable JSON object") from None
    if isinstance(value, dict):  # transformers' AddedToken form
        value = value.get("content")
    return value if isinstance(value, str) else None


def _with_specials(tokenizer: Tokenizer, *, where: str, file: Path | None, bos_token: str | None,
                   eos_token: str | None, origin: dict[str, Any]) -> ResolvedTokenizer:
    ids = {}
    names = {}
    for role, given, default in (("bos", bos_token, BOS_TOKEN), ("eos", eos_token, EOS_TOKEN)):
        token = given or (file is not None and _config_special(file, f"{role}_token")) or default
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise DatasetError(
                f"{where}: the tokenizer has no {role.upper()} token {token!r}; name one with {role}_token"
            )
        ids[role], names[role] = token_id, token
    return ResolvedTokenizer(tokenizer, names["bos"], names["eos"], ids["bos"], ids["eos"], origin)


def load_tokenizer_file(spec: str | os.PathLike) -> tuple[Tokenizer, Path]:
    """A ``tokenizers`` tokenizer from a ``tokenizer.json`` or a directory holding one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise DatasetError(f"{path}: no such tokenizer file (give a tokenizer.json, a directory with one, or 'train')")
    try:
        return Tokenizer.from_file(str(path)), path.resolve()
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise DatasetError(f"{path}: not a tokenizers tokenizer.json ({str(exc).splitlines()[0]})") from None


def _is_train(spec: Any) -> bool:
    """``tokenizer="train"`` asks for a new BPE (a directory called train is ``"./train"``)."""
    return isinstance(spec, str) and spec == TRAIN_TOKENIZER


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class WorkUnit:
    """Shard ``index``: the source ranges it holds, ``parts[k] = (source_index, SourcePart)``."""

    index: int
    parts: tuple[tuple[int, SourcePart], ...]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "bytes": self.bytes,
                "parts": [[s, p.start, p.stop, p.bytes] for s, p in self.parts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkUnit:
        parts = tuple((int(s), SourcePart(start=int(a), stop=int(b), bytes=int(n))) for s, a, b, n in data["parts"])
        return cls(index=int(data["index"]), parts=parts, bytes=int(data["bytes"]))


def plan_units(
    parts_by_source: Sequence[tuple[int, list[SourcePart]]], *, shard_bytes: int, first_index: int = 0
) -> list[WorkUnit]:
    """Group consecutive source ranges into units of at least ``shard_bytes`` (the last may be smaller)."""
    units: list[WorkUnit] = []
    current: list[tuple[int, SourcePart]] = []
    size = 0
    for source_index, parts in parts_by_source:
        for part in parts:
            current.append((source_index, part))
            size += part.bytes
            if size >= shard_bytes:
                units.append(WorkUnit(index=first_index + len(units), parts=tuple(current), bytes=size))
                current, size = [], 0
    if current:
        units.append(WorkUnit(index=first_index + len(units), parts=tuple(current), bytes=size))
    return units


# ------------------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class UnitTask:
    """Everything a worker needs to write one shard (picklable)."""

    unit: WorkUnit
    sources: tuple[SourceFile, ...]  # indexed by the unit's source indices
    out_dir: Path
    tokenizer_file: Path
    bos_id: int
    eos_id: int
    dtype: str
    text_field: str
    encoding_errors: str
    split: str
    val_fraction: float
    encode_batch_bytes: int


ReportFn = Callable[[int, int], None]  # (text bytes, tokens) just added


def tokenize_unit(task: UnitTask, *, report: ReportFn | None = None) -> ShardRecord:
    """Tokenise one unit into its shard (written to a temporary sibling, fsynced, renamed); return its record."""
    tokenizer = Tokenizer.from_file(str(task.tokenizer_file))
    with ShardWriter(task.out_dir, task.unit.index, dtype=task.dtype, bos_id=task.bos_id, eos_id=task.eos_id) as w:
        batch: dict[str, list[str]] = {"train": [], "val": []}
        pending = 0

        def flush() -> None:
            nonlocal pending
            tokens = 0
            for split, texts in batch.items():
                if texts:
                    ids_lists = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
                    w.add(ids_lists, split=split)
                    tokens += sum(map(len, ids_lists)) + 2 * len(ids_lists)
                    texts.clear()
            w.text_bytes += pending
            if report is not None:
                report(pending, tokens)
            pending = 0

        for source_index, part in task.unit.parts:
            source = task.sources[source_index]
            for doc in read_documents(source, text_field=task.text_field, encoding_errors=task.encoding_errors,
                                      part=part):
                train_text, val_text = split_text(doc.text, rule=task.split, val_fraction=task.val_fraction)
                for split, text in (("train", train_text), ("val", val_text)):
                    if text:
                        batch[split].append(text)
                pending += len(doc.text.encode("utf-8"))
                if pending >= task.encode_batch_bytes:
                    flush()
        flush()
        return w.commit()


def _tokenize_unit_reporting(task: UnitTask, reports) -> ShardRecord:
    """Worker entry point: :func:`tokenize_unit` with progress sent through a manager queue."""
    return tokenize_unit(task, report=lambda b, t: reports.put((task.unit.index, b, t)))


def _run_tasks(
    tasks: list[UnitTask], *, workers: int, on_done: Callable[[ShardRecord], None], on_report: ReportFn
) -> None:
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            on_done(tokenize_unit(task, report=on_report))
        return
    # spawn, not fork: the parent may hold threads (torch, tokenizers' pool) that a fork would copy mid-state.
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        reports = manager.Queue()
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
            futures = {pool.submit(_tokenize_unit_reporting, task, reports) for task in tasks}
            try:
                while futures:
                    done, futures = concurrent.futures.wait(
                        futures, timeout=PROGRESS_POLL_S, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    _drain(reports, on_report)
                    for future in done:
                        on_done(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            _drain(reports, on_report)


def _drain(reports, on_report: ReportFn) -> None:
    while True:
        try:
            _, text_bytes, tokens = reports.get_nowait()
        except queue.Empty:
            return
        on_report(text_bytes, tokens)


# ------------------------------------------------------------------------------------------------ destination
def inspect_destination(out_dir: Path) -> str:
    """``"missing"``, ``"empty"`` (nothing, or only our lock file), ``"ours"`` (our manifest) or ``"foreign"``."""
    if not out_dir.exists():
        return "missing"
    if not out_dir.is_dir():
        return "foreign"
    names = {p.name for p in out_dir.iterdir()}
    if MANIFEST_NAME in names:
        try:
            data = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "foreign"
        return "ours" if isinstance(data, dict) and data.get("format") == DATASET_FORMAT else "foreign"
    return "empty" if names <= {LOCK_NAME} else "foreign"


@contextlib.contextmanager
def _directory_lock(out_dir: Path, *, wait: bool) -> Iterator[None]:
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DatasetError(f"{out_dir}: another prepare-data is writing here ({LOCK_NAME} is locked)") from None
        yield
    finally:
        os.close(fd)


def _remove_temp_files(out_dir: Path) -> None:
    for path in out_dir.iterdir():
        if path.is_file() and is_our_temp_file(path.name):
            path.unlink(missing_ok=True)


def _remove_dataset_files(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Delete what ``manifest`` says we wrote (shards, indexes, tokenizer, the manifest last)."""
    for record in manifest.get("shards", []):
        for name in (record.get("file"), record.get("docs_file")):
            if isinstance(name, str) and is_reserved_name(name) and "/" not in name:
                (out_dir / name).unlink(missing_ok=True)
    if manifest.get("tokenizer"):
        (out_dir / TOKENIZER_NAME).unlink(missing_ok=True)
    _remove_temp_files(out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_directory(out_dir)


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class _Run:
    """Mutable bookkeeping of one prepare_data call (lives only for the call)."""

    out_dir: Path
    manifest: dict[str, Any]
    progress: ProgressFn | None
    started: float = field(default_factory=time.perf_counter)
    bytes_done: int = 0
    run_bytes: int = 0
    tokens_done: int = 0
    partial_bytes: int = 0  # reported by units still running

    def records(self) -> dict[int, dict[str, Any]]:
        return {int(r["index"]): r for r in self.manifest["shards"]}

    def report(self, text_bytes: int, tokens: int) -> None:
        self.partial_bytes += text_bytes
        self.run_bytes += text_bytes
        self.tokens_done += tokens
        self._emit()

    def done(self, record: ShardRecord) -> None:
        shards = self.records()
        shards[record.index] = record.to_json()
        self.manifest["shards"] = [shards[i] for i in sorted(shards)]
        write_manifest(self.out_dir, self.manifest)
        unit_bytes = self.manifest["units"][record.index]["bytes"]
        self.bytes_done += unit_bytes
        self.partial_bytes = max(self.partial_bytes - record.text_bytes, 0)
        self._emit()

    def _emit(self) -> None:
        if self.progress is None:
            return
        total = sum(u["bytes"] for u in self.manifest["units"])
        self.progress(
            PrepareProgress(
                bytes_done=min(self.bytes_done + self.partial_bytes, total),
                bytes_total=total,
                tokens_done=self.tokens_done,
                shards_done=len(self.manifest["shards"]),
                shards_total=len(self.manifest["units"]),
                elapsed_s=time.perf_counter() - self.started,
                run_bytes=self.run_bytes,
            )
        )


def _settings(*, text_field: str, encoding_errors: str, split: str, val_fraction: float,
              shard_bytes: int) -> dict[str, Any]:
    """What shapes the shards: a re-run or an append must ask for the same."""
    return {"text_field": text_field, "encoding_errors": encoding_errors, "split": split,
            "val_fraction": val_fraction, "shard_bytes": shard_bytes}


def _check_args(*, vocab_size: int | None, tokenizer: Any, workers: int, shard_bytes: int, encode_batch_bytes: int,
                val_fraction: float, split: str, encoding_errors: str, tokenizer_sample_bytes: int,
                append: bool, overwrite: bool) -> None:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for name, value in (("shard_bytes", shard_bytes), ("encode_batch_bytes", encode_batch_bytes),
                        ("tokenizer_sample_bytes", tokenizer_sample_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split not in SPLIT_RULES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_RULES)}, got {split!r}")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, got {encoding_errors!r}")
    if append and overwrite:
        raise ValueError("append and overwrite exclude each other")
    if _is_train(tokenizer) and (vocab_size is None or vocab_size < MIN_VOCAB_SIZE):
        raise ValueError(f"training a tokenizer needs vocab_size >= {MIN_VOCAB_SIZE}, got {vocab_size}")


def prepare_data(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    vocab_size: int | None = None,
    tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES,
    bos_token: str | None = None,
    eos_token: str | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    glob: str = DEFAULT_GLOB,
    encoding_errors: str = "strict",
    split: str = "document",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    encode_batch_bytes: int = DEFAULT_ENCODE_BATCH_BYTES,
    workers: int = 1,
    append: bool = False,
    overwrite: bool = False,
    wait_for_lock: bool = False,
    progress: ProgressFn | None = None,
) -> PrepareResult:
    """Tokenise ``inputs`` into a prepared dataset at ``out_dir`` (see the module docstring).

    tokenizer: ``"train"`` (with ``vocab_size``), a ``tokenizer.json`` path, a directory with one, or a
        ``tokenizers.Tokenizer``; None means the dataset's own when resuming or appending.
    Raises :class:`~latentmoe.data.sources.DataSourceError` for bad inputs and
    :class:`~latentmoe.data.shards.DatasetError` for a destination or dataset that does not fit the
    request (both ``ValueError``, one line each); nothing outside our own files is touched.
    """
    started = time.perf_counter()
    _check_args(vocab_size=vocab_size, tokenizer=tokenizer, workers=workers, shard_bytes=shard_bytes,
                encode_batch_bytes=encode_batch_bytes, val_fraction=val_fraction, split=split,
                encoding_errors=encoding_errors, tokenizer_sample_bytes=tokenizer_sample_bytes, append=append,
                overwrite=overwrite)
    out = Path(out_dir).expanduser().resolve()
    settings = _settings(text_field=text_field, encoding_errors=encoding_errors, split=split,
                         val_fraction=val_fraction, shard_bytes=shard_bytes)
    # Everything that can fail on bad input happens before the destination is touched.
    state = inspect_destination(out)
    _check_destination(out, state, append=append, overwrite=overwrite)
    if tokenizer is None and (state != "ours" or overwrite):
        raise ValueError(
            "no tokenizer: pass tokenizer='train' with vocab_size (--tokenizer train --vocab-size N) or a "
            "tokenizer.json"
        )
    discovered = find_sources(inputs, glob=glob, exclude=[out])
    parts_by_path = {
        source.path: source_parts(source, target_bytes=shard_bytes, text_field=text_field) for source in discovered
    }
    if not any(parts_by_path.values()):
        raise DataSourceError(f"{_describe(discovered)}: no text to prepare (every input is empty)")
    created = state == "missing"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _directory_lock(out, wait=wait_for_lock):
            return _prepare_locked(
                out, discovered, parts_by_path, settings=settings, tokenizer=tokenizer, vocab_size=vocab_size,
                tokenizer_sample_bytes=tokenizer_sample_bytes, bos_token=bos_token, eos_token=eos_token,
                encode_batch_bytes=encode_batch_bytes, workers=workers, append=append, overwrite=overwrite,
                progress=progress, started=started,
            )
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise


def _check_destination(out: Path, state: str, *, append: bool, overwrite: bool) -> None:
    if state == "foreign":
        if not out.is_dir():
            raise DatasetError(f"{out}: exists and is not a directory")
        if not overwrite:
            foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
            raise DatasetError(
                f"{out}: holds files latentmoe did not write ({foreign[0] if foreign else '?'}) and no prepared "
                "dataset; choose an empty directory, or pass --overwrite to write beside them (they are never removed)"
            )
        clash = sorted(p.name for p in out.iterdir() if is_reserved_name(p.name))
        if clash:
            raise DatasetError(
                f"{out / clash[0]}: exists and was not written by latentmoe; it is not replaced (prepare-data writes "
                "a file of that name)"
            )
    if append and state != "ours":
        raise DatasetError(f"{out}: no prepared dataset to append to")


def _prepare_locked(
    out: Path, discovered: list[SourceFile], parts_by_path: dict[Path, list[SourcePart]], *,
    settings: dict[str, Any], tokenizer: Any, vocab_size: int | None,
    tokenizer_sample_bytes: int, bos_token: str | None, eos_token: str | None, encode_batch_bytes: int,
    workers: int, append: bool, overwrite: bool, progress: ProgressFn | None, started: float,
) -> PrepareResult:
    state = inspect_destination(out)  # again, now that we hold the lock
    manifest = read_manifest(out) if state == "ours" else None
    # Replace our own dataset when asked to, or when it is another run's with no shard written yet.
    if manifest is not None and (overwrite or not (manifest["shards"] or _same_run(manifest, discovered, settings,
                                                                                     append=append))):
        _remove_dataset_files(out, manifest)
        manifest = None
    _remove_temp_files(out)

    if manifest is None:
        manifest = _new_manifest(discovered, parts_by_path, settings)
        write_manifest(out, manifest)
    else:
        _check_settings(out, manifest, settings)
        if append:
            _append_sources(out, manifest, discovered, parts_by_path, settings)
        else:
            _check_same_sources(out, manifest, discovered)

    resolved = _resolve_tokenizer(
        out, manifest, tokenizer, vocab_size=vocab_size, sample_bytes=tokenizer_sample_bytes, bos_token=bos_token,
        eos_token=eos_token,
    )
    run = _Run(out_dir=out, manifest=manifest, progress=progress, started=started)
    tasks = _pending_tasks(out, manifest, resolved, encode_batch_bytes)
    skipped = len(manifest["units"]) - len(tasks)
    if tasks and manifest["complete"]:  # a shard of a finished dataset went missing or was truncated
        manifest["complete"], manifest["totals"] = False, None
        write_manifest(out, manifest)
    run.bytes_done = sum(manifest["units"][i]["bytes"] for i in run.records())
    _run_tasks(tasks, workers=workers, on_done=run.done, on_report=run.report)

    manifest["complete"] = True
    manifest["totals"] = manifest_totals(manifest)
    write_manifest(out, manifest)
    totals = manifest["totals"]
    return PrepareResult(
        out_dir=out,
        manifest_path=out / MANIFEST_NAME,
        tokenizer_path=out / TOKENIZER_NAME,
        shards_total=len(manifest["units"]),
        shards_written=len(tasks),
        shards_skipped=skipped,
        train_tokens=totals["train_tokens"],
        val_tokens=totals["val_tokens"],
        train_documents=totals["train_documents"],
        val_documents=totals["val_documents"],
        text_bytes=totals["text_bytes"],
        seconds=time.perf_counter() - started,
    )


def _describe(sources: Sequence[SourceFile]) -> str:
    return str(sources[0].path) if len(sources) == 1 else f"{sources[0].path} and {len(sources) - 1} more inputs"


def _same_run(manifest: dict[str, Any], discovered: list[SourceFile], settings: dict[str, Any], *,
              append: bool) -> bool:
    """Whether ``manifest`` was begun by a run with these settings (and, unless appending, these sources)."""
    recorded = [SourceFile.from_json(s) for s in manifest["sources"]]
    return manifest.get("settings") == settings and (append or recorded == discovered)


def _new_manifest(sources: list[SourceFile], parts_by_path: dict[Path, list[SourcePart]],
                  settings: dict[str, Any]) -> dict[str, Any]:
    parts = [(i, parts_by_path[s.path]) for i, s in enumerate(sources)]
    units = plan_units(parts, shard_bytes=settings["shard_bytes"])
    return make_manifest(settings=settings, sources=[{**s.to_json(), "group": 0} for s in sources],
                         units=[u.to_json() for u in units])


def _check_settings(out: Path, manifest: dict[str, Any], settings: dict[str, Any]) -> None:
    recorded = manifest.get("settings", {})
    for key, value in settings.items():
        if recorded.get(key) != value:
            raise DatasetError(
                f"{out}: prepared with {key}={recorded.get(key)!r}, asked for {value!r}; "
                "use the same settings, or pass overwrite=True to prepare it again"
            )


def _check_same_sources(out: Path, manifest: dict[str, Any], discovered: list[SourceFile]) -> None:
    recorded = [SourceFile.from_json(s) for s in manifest["sources"]]
    recorded_paths = [s.path for s in recorded]
    if [s.path for s in discovered] != recorded_paths:
        new = [s.path for s in discovered if s.path not in set(recorded_paths)]
        what = f"{new[0]} is not in it" if new else "the inputs name other files"
        raise DatasetError(
            f"{out}: prepared from {len(recorded)} other source files ({what}); pass append=True to add files, "
            "or overwrite=True to prepare it again"
        )
    for old, now in zip(recorded, discovered):
        if old != now:
            raise DatasetError(
                f"{now.path}: changed since it was prepared ({old.bytes} -> {now.bytes} bytes, or a new "
                "modification time); pass overwrite=True to prepare the dataset again"
            )


def _append_sources(out: Path, manifest: dict[str, Any], discovered: list[SourceFile],
                    parts_by_path: dict[Path, list[SourcePart]], settings: dict[str, Any]) -> None:
    recorded = {Path(s["path"]): SourceFile.from_json(s) for s in manifest["sources"]}
    new = []
    for source in discovered:
        old = recorded.get(source.path)
        if old is None:
            new.append(source)
        elif old != source:
            raise DatasetError(
                f"{source.path}: already in the dataset and changed since it was prepared; "
                "pass overwrite=True to prepare the dataset again"
            )
    if not new:
        return
    first_source = len(manifest["sources"])
    group = 1 + max((int(s.get("group", 0)) for s in manifest["sources"]), default=-1)
    parts = [(first_source + i, parts_by_path[s.path]) for i, s in enumerate(new)]
    units = plan_units(parts, shard_bytes=settings["shard_bytes"], first_index=len(manifest["units"]))
    if not units:
        raise DataSourceError(f"{_describe(new)}: no text to append (every new input is empty)")
    manifest["sources"] += [{**s.to_json(), "group": group} for s in new]
    manifest["units"] += [u.to_json() for u in units]
    manifest["complete"] = False
    manifest["totals"] = None
    write_manifest(out, manifest)


def _resolve_tokenizer(out: Path, manifest: dict[str, Any], spec: Any, *, vocab_size: int | None, sample_bytes: int,
                       bos_token: str | None, eos_token: str | None) -> ResolvedTokenizer:
    recorded = manifest.get("tokenizer")
    if recorded is not None:
        tokenizer, _ = load_tokenizer_file(out / TOKENIZER_NAME)
        if tokenizer_digest(tokenizer) != recorded["sha256"]:
            raise DatasetError(f"{out / TOKENIZER_NAME}: differs from the manifest's tokenizer (sha256); "
                               "pass overwrite=True to prepare the dataset again")
        existing = ResolvedTokenizer(tokenizer, recorded["bos_token"], recorded["eos_token"], recorded["bos_id"],
                                     recorded["eos_id"], recorded["origin"])
        _check_same_tokenizer(out, existing, spec, vocab_size=vocab_size, sample_bytes=sample_bytes,
                              bos_token=bos_token, eos_token=eos_token)
        return existing
    if spec is None:
        raise ValueError(
            "no tokenizer: pass tokenizer='train' with vocab_size (--tokenizer train --vocab-size N) or a "
            "tokenizer.json"
        )
    if _is_train(spec):
        texts = _tokenizer_sample(manifest, sample_bytes)
        if not texts:
            raise DataSourceError(f"{manifest['sources'][0]['path']}: no training text to train a tokenizer on")
        resolved = _with_specials(
            train_tokenizer(texts, vocab_size), where="trained tokenizer", file=None, bos_token=bos_token,
            eos_token=eos_token, origin={"kind": "trained", "vocab_size": vocab_size, "sample_bytes": sample_bytes},
        )
    elif isinstance(spec, Tokenizer):
        resolved = _with_specials(spec, where="the given tokenizer", file=None, bos_token=bos_token,
                                  eos_token=eos_token, origin={"kind": "given"})
    else:
        tokenizer, path = load_tokenizer_file(spec)
        resolved = _with_specials(tokenizer, where=str(path), file=path, bos_token=bos_token, eos_token=eos_token,
                                  origin={"kind": "file", "path": str(path)})
    atomic_write_bytes(out / TOKENIZER_NAME, resolved.tokenizer.to_str(pretty=True).encode("utf-8"))
    manifest["tokenizer"] = resolved.record()
    manifest["dtype"] = token_dtype(manifest["tokenizer"]["vocab_size"])
    write_manifest(out, manifest)
    return resolved


def _check_same_tokenizer(out: Path, existing: ResolvedTokenizer, spec: Any, *, vocab_size: int | None,
                          sample_bytes: int, bos_token: str | None, eos_token: str | None) -> None:
    if spec is None:
        return
    origin = existing.origin
    if _is_train(spec):
        same = origin.get("kind") == "trained" and origin.get("vocab_size") == vocab_size and (
            origin.get("sample_bytes") == sample_bytes)
        asked = f"a tokenizer trained with vocab_size={vocab_size}"
    else:
        tokenizer = spec if isinstance(spec, Tokenizer) else load_tokenizer_file(spec)[0]
        same = tokenizer_digest(tokenizer) == tokenizer_digest(existing.tokenizer)
        asked = "another tokenizer"
    for role, given, have in (("bos", bos_token, existing.bos_token), ("eos", eos_token, existing.eos_token)):
        if given is not None and given != have:
            same, asked = False, f"{role}_token={given!r}"
    if not same:
        raise DatasetError(f"{out}: prepared with its own tokenizer.json, asked for {asked}; "
                           "pass overwrite=True to prepare it again")


def _tokenizer_sample(manifest: dict[str, Any], sample_bytes: int) -> list[str]:
    """Training text for the tokenizer: from each unit its first ``sample_bytes * unit/total`` bytes."""
    settings = manifest["settings"]
    sources = [SourceFile.from_json(s) for s in manifest["sources"]]
    units = [WorkUnit.from_json(u) for u in manifest["units"]]
    total = sum(u.bytes for u in units) or 1
    texts: list[str] = []
    for unit in units:
        quota = sample_bytes * unit.bytes / total
        taken = 0
        for source_index, part in unit.parts:
            for doc in read_documents(sources[source_index], text_field=settings["text_field"],
                                      encoding_errors=settings["encoding_errors"], part=part):
                train_text, _ = split_text(doc.text, rule=settings["split"], val_fraction=settings["val_fraction"])
                if not train_text:
                    continue
                size = len(train_text.encode("utf-8"))
                if taken + size > quota:
                    # Cut the last document to the quota (by characters; BPE counts, it needs no exact bytes).
                    train_text = train_text[: max(int(quota - taken), 0)]
                if train_text:
                    texts.append(train_text)
                taken += size
                if taken >= quota:
                    break
            if taken >= quota:
                break
    return texts


def _pending_tasks(out: Path, manifest: dict[str, Any], resolved: ResolvedTokenizer,
                   encode_batch_bytes: int) -> list[UnitTask]:
    settings = manifest["settings"]
    sources = tuple(SourceFile.from_json(s) for s in manifest["sources"])
    kept = []
    for record_json in manifest["shards"]:
        record = ShardRecord.from_json(record_json, where=out / MANIFEST_NAME)
        try:
            check_shard_files(out, record, dtype=manifest["dtype"], hashes=False)
        except DatasetError:
            continue  # missing or truncated: redo it
        kept.append(record_json)
    manifest["shards"] = kept
    done = {int(r["index"]) for r in kept}
    tasks = []
    for unit_json in manifest["units"]:
        unit = WorkUnit.from_json(unit_json)
        if unit.index in done:
            continue
        for source_index in sorted({s for s, _ in unit.parts}):
            now = stat_source(sources[source_index]) if sources[source_index].path.exists() else None
            if now != sources[source_index]:
                raise DataSourceError(
                    f"{sources[source_index].path}: missing or changed since the dataset was planned; "
                    "restore it, or pass overwrite=True to prepare the dataset again"
                )
        tasks.append(UnitTask(
            unit=unit, sources=sources, out_dir=out, tokenizer_file=out / TOKENIZER_NAME, bos_id=resolved.bos_id,
            eos_id=resolved.eos_id, dtype=manifest["dtype"], text_field=settings["text_field"],
            encoding_errors=settings["encoding_errors"], split=settings["split"],
            val_fraction=settings["val_fraction"], encode_batch_bytes=encode_batch_bytes,
        ))
    return tasks


# ------------------------------------------------------------------------------------------------ shipped corpus
CACHE_ENV = "LATENTMOE_CACHE"


def default_cache_dir() -> Path:
    """Where the shipped corpus's tokenizers and prepared datasets are cached: ``$LATENTMOE_CACHE`` or
    ``~/.cache/latentmoe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentmoe")


def shipped_corpus_dir(cache_dir: Path, vocab_size: int, tokenizer: Tokenizer, corpus_digest: str) -> Path:
    """Where :func:`prepare_shipped_corpus` keeps the prepared corpus (keyed by tokenizer and corpus)."""
    return Path(cache_dir) / f"corpus-v{vocab_size}-t{tokenizer_digest(tokenizer)[:12]}-c{corpus_digest[:12]}"


def prepare_shipped_corpus(
    cache_dir: str | os.PathLike | None, vocab_size: int, *, progress: ProgressFn | None = None
) -> TokenDataset:
    """The shipped Shakespeare corpus as a prepared dataset, made once and cached under ``cache_dir``
    (None: :func:`default_cache_dir`).

    The tokenizer is :func:`~latentmoe.data.tokenizer.load_or_train_tokenizer`'s (trained on the
    corpus's training split, cached), the split the corpus's own (``split="tail"``, the last 5 % of
    every work), so the train and validation token streams are exactly those of
    :func:`~latentmoe.data.batching.encode_splits`. Several processes may call this at once (the
    others wait for the lock, then open what the first one wrote).
    """
    from importlib import resources

    from latentmoe.data.corpus import CORPUS_DIR, CORPUS_PACKAGE, load_corpus
    from latentmoe.data.dataset import TokenDataset
    from latentmoe.data.tokenizer import load_or_train_tokenizer

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    splits = load_corpus()
    tokenizer = load_or_train_tokenizer(vocab_size, cache_dir, splits=splits)
    out = shipped_corpus_dir(cache_dir, vocab_size, tokenizer, splits.digest)
    try:
        return TokenDataset.open(out)
    except DatasetError:
        pass  # not there, unfinished or damaged: prepare (a re-run redoes only what is missing)
    with resources.as_file(resources.files(CORPUS_PACKAGE).joinpath(CORPUS_DIR)) as corpus_dir:
        prepare_data(
            [corpus_dir], out, tokenizer=tokenizer, glob=SHIPPED_CORPUS_GLOB, split="tail",
            val_fraction=DEFAULT_VAL_FRACTION, wait_for_lock=True, progress=progress,
        )
    return TokenDataset.open(out)
