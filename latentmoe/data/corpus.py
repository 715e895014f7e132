"""The shipped corpus and its deterministic train / validation split.

latentmoe ships a small real corpus so that every demo and test trains on actual language
without a download: 42 works of Shakespeare from Project Gutenberg (about 5 MB of text, see
``latentmoe/data/corpus/README.md`` for the source, licence and cleaning). The files live
inside the package and are read through :mod:`importlib.resources`, so this works from a
source checkout, an editable install and a wheel alike.

How the validation split is made
--------------------------------
Each document is split on its own, so every work contributes to both splits and no text is
ever in both:

- ``n = len(doc)`` characters, ``target = n - round(val_fraction * n)``;
- the cut is the first *line start* at or after ``target`` (a line start is position 0 or the
  position just after a ``"\\n"``); if there is none, the whole document is training text;
- ``doc[:cut]`` is training text, ``doc[cut:]`` is validation text.

With the default ``val_fraction = 0.05`` the validation split is the last ~5 % of every play
(a few dozen lines of its final scene). The rule depends only on the text, so the split is the
same on every machine and every run.

The split keeps documents apart (``train_parts[i]`` / ``val_parts[i]`` belong to
``documents[i]``) so that the token stream can mark document boundaries with BOS/EOS tokens
(see :mod:`latentmoe.data.batching`); ``train`` and ``val`` give each split as one string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources

DEFAULT_VAL_FRACTION = 0.05
CORPUS_PACKAGE = "latentmoe.data"
CORPUS_DIR = "corpus"
CORPUS_SUFFIX = ".txt"
# Separates documents in the joined ``train`` / ``val`` strings: each part ends with "\n",
# so documents end up separated by one blank line.
DOCUMENT_SEPARATOR = "\n"


@dataclass(frozen=True)
class CorpusSplits:
    """A corpus split into training and validation text, document by document.

    documents:   document names (file stems, e.g. ``"hamlet"``), in a fixed order.
    train_parts: ``train_parts[i]`` is the training text of ``documents[i]``.
    val_parts:   ``val_parts[i]`` is the held-out end of ``documents[i]`` (may be empty).
    """

    documents: tuple[str, ...]
    train_parts: tuple[str, ...]
    val_parts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.documents) == len(self.train_parts) == len(self.val_parts):
            raise ValueError(
                f"documents, train_parts and val_parts must have equal lengths, got "
                f"{len(self.documents)}, {len(self.train_parts)}, {len(self.val_parts)}"
            )

    @cached_property
    def train(self) -> str:
        """All training text, documents in order, separated by a blank line."""
        return DOCUMENT_SEPARATOR.join(self.train_parts)

    @cached_property
    def val(self) -> str:
        """All validation text, documents in order, separated by a blank line."""
        return DOCUMENT_SEPARATOR.join(self.val_parts)

    @cached_property
    def digest(self) -> str:
        """SHA-256 hex digest of names and both splits: the key for tokenizer and token caches."""
        h = hashlib.sha256()
        for name, train, val in zip(self.documents, self.train_parts, self.val_parts, strict=True):
            for field in (name, train, val):
                data = field.encode("utf-8")
                # Length-prefixed, so that moving text across a boundary changes the digest.
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()


def split_point(text: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> int:
    """Index where ``text``'s validation part starts: the first line start at or after
    ``len(text) - round(val_fraction * len(text))`` (``len(text)`` if there is none)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    target = len(text) - round(val_fraction * len(text))
    if target <= 0:
        return 0
    # A line starts at p > 0 iff text[p - 1] == "\n"; look for that newline at or after target - 1.
    newline = text.find("\n", target - 1)
    return len(text) if newline == -1 else newline + 1


def split_documents(texts: Mapping[str, str], *, val_fraction: float = DEFAULT_VAL_FRACTION) -> CorpusSplits:
    """Split each named document into train / val by :func:`split_point` (order of ``texts`` kept)."""
    names, train_parts, val_parts = [], [], []
    for name, text in texts.items():
        cut = split_point(text, val_fraction)
        names.append(name)
        train_parts.append(text[:cut])
        val_parts.append(text[cut:])
    return CorpusSplits(documents=tuple(names), train_parts=tuple(train_parts), val_parts=tuple(val_parts))


def read_shipped_documents() -> dict[str, str]:
    """The shipped corpus as ``{name: text}``, sorted by name (``hamlet.txt`` -> ``"hamlet"``)."""
    corpus_dir = resources.files(CORPUS_PACKAGE).joinpath(CORPUS_DIR)
    files = sorted(
        (entry for entry in corpus_dir.iterdir() if entry.name.endswith(CORPUS_SUFFIX)),
        key=lambda entry: entry.name,
    )
    if not files:
        raise FileNotFoundError(f"no {CORPUS_SUFFIX} files in the shipped corpus at {corpus_dir}")
    return {entry.name.removesuffix(CORPUS_SUFFIX): entry.read_text(encoding="utf-8") for entry in files}


def load_corpus(*, val_fraction: float = DEFAULT_VAL_FRACTION) -> CorpusSplits:
    """The shipped Shakespeare corpus, split into train / val (see the module docstring)."""
    return split_documents(read_shipped_documents(), val_fraction=val_fraction)
