"""Reading a prepared dataset: training windows and validation batches straight from memory-mapped shards.

:class:`TokenDataset` opens a directory written by :func:`~latentmoe.data.prepare.prepare_data`,
checks it (complete; every shard and index file present with its recorded size — and its SHA-256
with ``verify_hashes=True``; a mismatch is a one-line :class:`~latentmoe.data.shards.DatasetError`
naming the file) and exposes two token streams, ``"train"`` and ``"val"``: the concatenation of
every shard's training (validation) region in shard order. Nothing is loaded: each shard is a
``numpy.memmap`` opened on first use (at most ``MAX_OPEN_SHARDS`` at a time), and a window copies
only its own ``seq_len`` tokens, so only the pages of the windows read are paged in, however large
the dataset.

Batches (the contract of :mod:`latentmoe.data.batching`, over the dataset's stream)
-----------------------------------------------------------------------------------
``batch(step, batch_size=B, seq_len=T, seed=s)`` is ``[B, T]`` int64, a pure function of
``(seed, step)``: nothing depends on earlier calls, so a run resumed at step ``k`` reads exactly the
batch an uninterrupted run reads at step ``k``.

- ``sampling="random"``: window starts uniform in ``[0, N - T]``, drawn from
  :func:`~latentmoe.data.batching.window_generator` ``(seed, step)`` exactly as
  :func:`~latentmoe.data.batching.random_windows` draws them — the same batch as ``random_windows``
  over the whole stream in memory.
- ``sampling="sequential"``: a pass in order over the ``S = N // T`` non-overlapping slots; row
  ``b`` of step ``k`` is slot ``(k * B + b) mod S`` (epoch ``(k * B + b) // S``; the seed is unused).

With data parallelism (``world_size = W > 1``) rank ``r`` gets rows ``[r * B / W, (r + 1) * B / W)``
of that global batch (``B`` must be a multiple of ``W``) and reads only those windows; the ranks
together read the global batch exactly, as ``latentmoe.parallel.training`` expects.
``val_batches`` is :func:`~latentmoe.data.batching.val_batches` over the validation stream.

Document boundaries
-------------------
Every document is framed ``BOS ids EOS`` and documents follow each other in the stream, so a
window may hold the end of one document and the start of the next: the model sees EOS, then BOS,
and learns that a document ended. There is no cross-document attention mask — attention runs over
the whole window, as in nanoGPT-style packing. :meth:`TokenDataset.document_starts` gives the
offsets of every document's BOS, for a caller that wants a mask.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from latentmoe.data.batching import window_generator
from latentmoe.data.shards import (
    DOCS_DTYPE,
    DTYPES,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    DatasetError,
    ShardRecord,
    check_shard_files,
    read_manifest,
)
from latentmoe.data.tokenizer import tokenizer_digest

SPLITS = ("train", "val")
SAMPLING_MODES = ("random", "sequential")
MAX_OPEN_SHARDS = 64


class TokenDataset:
    """A prepared dataset, opened for reading (see the module docstring). Use :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, manifest_sha256: str) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.dtype = DTYPES[manifest["dtype"]]
        self.records = [ShardRecord.from_json(r, where=self.path / MANIFEST_NAME) for r in manifest["shards"]]
        tokenizer = manifest["tokenizer"]
        self.vocab_size: int = int(tokenizer["vocab_size"])
        self.bos_id: int = int(tokenizer["bos_id"])
        self.eos_id: int = int(tokenizer["eos_id"])
        lengths = {
            "train": np.array([r.train_tokens for r in self.records], dtype=np.int64),
            "val": np.array([r.val_tokens for r in self.records], dtype=np.int64),
        }
        # ends[split][i]: one past the last token of shard i's region in the split's stream
        self._ends = {split: np.cumsum(n) for split, n in lengths.items()}
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    # ------------------------------------------------------------------ opening and checking
    @classmethod
    def open(cls, path: str | os.PathLike, *, verify_hashes: bool = False) -> TokenDataset:
        """Open the dataset in ``path``; :class:`DatasetError` (one line, naming the file) if it is
        incomplete, damaged or does not match its manifest."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        manifest_sha256 = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
        if not manifest.get("complete"):
            done, total = len(manifest.get("shards", [])), len(manifest.get("units", []))
            raise DatasetError(f"{path}: prepare-data has not finished ({done} of {total} shards); run it again")
        if manifest.get("dtype") not in DTYPES or not isinstance(manifest.get("tokenizer"), dict):
            raise DatasetError(f"{path / MANIFEST_NAME}: no valid dtype or tokenizer record (the manifest is damaged)")
        dataset = cls(path, manifest, manifest_sha256=manifest_sha256)
        if [r.index for r in dataset.records] != list(range(len(manifest["units"]))):
            raise DatasetError(f"{path / MANIFEST_NAME}: the shard list does not match the units (damaged)")
        dataset.verify(hashes=verify_hashes)
        return dataset

    def verify(self, *, hashes: bool = True) -> None:
        """Check every shard and index file against the manifest: sizes always, SHA-256 when ``hashes``;
        also that the tokenizer file is the recorded one and no id reaches past its vocabulary."""
        for record in self.records:
            check_shard_files(self.path, record, dtype=self.manifest["dtype"], hashes=hashes)
            if record.max_token_id >= self.vocab_size:
                raise DatasetError(
                    f"{self.path / record.file}: holds id {record.max_token_id}, outside the tokenizer's "
                    f"{self.vocab_size} tokens (the manifest is damaged)"
                )
        if hashes and tokenizer_digest(self.tokenizer) != self.manifest["tokenizer"]["sha256"]:
            raise DatasetError(f"{self.path / TOKENIZER_NAME}: differs from the manifest's tokenizer (sha256)")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with."""
        path = self.path / TOKENIZER_NAME
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise DatasetError(f"{path}: cannot load the dataset's tokenizer ({str(exc).splitlines()[0]})") from None

    def check_model(self, vocab_size: int, *, bos_token_id: int | None = None, eos_token_id: int | None = None) -> None:
        """Raise :class:`DatasetError` unless a model with this vocabulary (and these BOS/EOS ids, when
        given) can train on the dataset: every token id must be below ``vocab_size``."""
        largest = max((r.max_token_id for r in self.records), default=-1)
        if self.vocab_size > vocab_size:
            raise DatasetError(
                f"{self.path}: the dataset's tokenizer has {self.vocab_size} tokens (largest id used {largest}) but "
                f"the model's vocab_size is {vocab_size}; prepare the data with a tokenizer of at most {vocab_size} "
                f"tokens or use a model with vocab_size >= {self.vocab_size}"
            )
        for role, model_id, ours in (("bos", bos_token_id, self.bos_id), ("eos", eos_token_id, self.eos_id)):
            if model_id is not None and model_id != ours:
                raise DatasetError(
                    f"{self.path}: the dataset frames documents with {role.upper()} id {ours} but the model's "
                    f"{role}_token_id is {model_id}; prepare the data with the model's tokenizer"
                )

    # ------------------------------------------------------------------ sizes
    def num_tokens(self, split: str = "train") -> int:
        """Tokens in the split's stream (BOS/EOS included)."""
        ends = self._ends[_check_split(split)]
        return int(ends[-1]) if ends.size else 0

    @property
    def train_tokens(self) -> int:
        return self.num_tokens("train")

    @property
    def val_tokens(self) -> int:
        return self.num_tokens("val")

    def epochs(self, tokens_seen: int) -> float:
        """How many passes over the training stream ``tokens_seen`` tokens are."""
        return tokens_seen / self.train_tokens if self.train_tokens else 0.0

    # ------------------------------------------------------------------ raw reads
    def _memmap(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only numpy view of a memory map (what ``numpy.memmap`` builds, plus
        ``MADV_RANDOM``: a window faults in its own pages only, with no readahead around them)."""
        view = self._open.get(index)
        if view is None:
            record = self.records[index]
            with open(self.path / record.file, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mapped.madvise(mmap.MADV_RANDOM)
            view = np.frombuffer(mapped, dtype=self.dtype, count=record.tokens)
            self._open[index] = view
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)  # the map is released with its last view
        else:
            self._open.move_to_end(index)
        return view

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split's stream, a copy in the shards' dtype."""
        ends = self._ends[_check_split(split)]
        n = int(ends[-1]) if ends.size else 0
        if not 0 <= start <= stop <= n:
            raise IndexError(f"[{start}, {stop}) is outside the {split} stream of {n} tokens")
        out = np.empty(stop - start, dtype=self.dtype)
        filled = 0
        shard = int(np.searchsorted(ends, start, side="right"))
        while filled < out.size:
            region_start = int(ends[shard - 1]) if shard else 0
            offset = start + filled - region_start  # inside this shard's region of the split
            take = min(int(ends[shard]) - region_start - offset, out.size - filled)
            if take > 0:
                base = 0 if split == "train" else self.records[shard].train_tokens
                out[filled : filled + take] = self._memmap(shard)[base + offset : base + offset + take]
                filled += take
            shard += 1
        return out

    def ids(self, split: str = "train") -> torch.Tensor:
        """The whole split as one ``[N]`` int64 tensor, loaded into memory (small datasets only)."""
        return torch.from_numpy(self.read(split, 0, self.num_tokens(split)).astype(np.int64))

    def document_starts(self, split: str = "train") -> np.ndarray:
        """``[D]`` int64: the offset of every document's BOS in the split's stream, in order."""
        _check_split(split)
        pieces = []
        for i, record in enumerate(self.records):
            starts = np.fromfile(self.path / record.docs_file, dtype=DOCS_DTYPE)
            n_train = record.train_documents
            if split == "train":
                pieces.append(starts[:n_train] + (int(self._ends["train"][i - 1]) if i else 0))
            else:
                region = starts[n_train:] - record.train_tokens
                pieces.append(region + (int(self._ends["val"][i - 1]) if i else 0))
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)

    def windows(self, starts: torch.Tensor | np.ndarray, *, seq_len: int, split: str = "train") -> torch.Tensor:
        """``[len(starts), seq_len]`` int64: the windows of the split's stream beginning at ``starts``."""
        rows = [self.read(split, int(s), int(s) + seq_len) for s in np.asarray(starts).tolist()]
        stacked = np.stack(rows) if rows else np.empty((0, seq_len), dtype=self.dtype)
        return torch.from_numpy(stacked.astype(np.int64))

    # ------------------------------------------------------------------ batches
    def window_starts(
        self, step: int, *, batch_size: int, seq_len: int, seed: int, sampling: str = "random", split: str = "train"
    ) -> torch.Tensor:
        """``[batch_size]`` int64: where the windows of the global batch of ``step`` begin."""
        n = self.num_tokens(split)
        _check_batch(n, batch_size=batch_size, seq_len=seq_len, step=step, where=f"{self.path} ({split})")
        if sampling == "random":
            return torch.randint(0, n - seq_len + 1, (batch_size,), generator=window_generator(seed, step))
        if sampling == "sequential":
            slots = n // seq_len
            return (torch.arange(batch_size, dtype=torch.int64) + step * batch_size) % slots * seq_len
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")

    def batch(
        self,
        step: int,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        sampling: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ) -> torch.Tensor:
        """This rank's rows of the global ``[batch_size, seq_len]`` int64 training batch of ``step``:
        ``[batch_size // world_size, seq_len]``, rows ``[rank * b, (rank + 1) * b)``."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the world size ({world_size}): it is the global "
                "batch, split evenly over the ranks"
            )
        starts_B = self.window_starts(step, batch_size=batch_size, seq_len=seq_len, seed=seed, sampling=sampling)
        rows = batch_size // world_size
        return self.windows(starts_B[rank * rows : (rank + 1) * rows], seq_len=seq_len)

    def batch_fn(self, *, batch_size: int, seq_len: int, seed: int, sampling: str = "random", rank: int = 0,
                 world_size: int = 1):
        """``step -> batch`` for :class:`latentmoe.train.trainer.Trainer` (``batch_fn``)."""
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")

        def batch_fn(step: int) -> torch.Tensor:
            return self.batch(step, batch_size=batch_size, seq_len=seq_len, seed=seed, sampling=sampling,
                              rank=rank, world_size=world_size)

        return batch_fn

    def val_batches(self, *, batch_size: int, seq_len: int, max_batches: int, split: str = "val") -> list[torch.Tensor]:
        """Deterministic validation batches: :func:`latentmoe.data.batching.val_batches` over the
        validation stream (``W = min(S, batch_size * max_batches)`` evenly spread non-overlapping slots);
        ``split="train"`` takes them from the training stream instead (``latentmoe eval --split train``)."""
        n = self.num_tokens(split)
        if n < seq_len:
            raise DatasetError(
                f"{self.path}: the {'validation' if split == 'val' else split} split has {n} tokens, fewer than "
                f"seq_len={seq_len} (val_fraction={self.manifest['split']['val_fraction']}); prepare with a "
                "larger val_fraction or more documents"
            )
        if batch_size < 1 or max_batches < 1:
            raise ValueError(f"batch_size and max_batches must be >= 1, got {batch_size}, {max_batches}")
        n_slots = n // seq_len
        n_windows = min(n_slots, batch_size * max_batches)
        slots_W = torch.arange(n_windows) * n_slots // n_windows
        return list(self.windows(slots_W * seq_len, seq_len=seq_len, split=split).split(batch_size))

    def describe(self) -> dict[str, Any]:
        """A small summary for logs and metrics (path, manifest hash, token counts, tokenizer)."""
        return {
            "path": str(self.path),
            "manifest_sha256": self.manifest_sha256,
            "train_tokens": self.train_tokens,
            "val_tokens": self.val_tokens,
            "shards": len(self.records),
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
        }


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def _check_batch(n: int, *, batch_size: int, seq_len: int, step: int, where: str) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if n < seq_len:
        raise DatasetError(f"{where}: {n} tokens, fewer than seq_len={seq_len}")
