"""Chat data for fine-tuning: conversations rendered by a chat template, tokenised, with a mask of the tokens the
loss counts — the assistant's.

Input
-----
JSON Lines, one conversation per line: ``{"messages": [{"role": "system" | "user" | "assistant" | ...,
"content": "..."}, ...]}``. Every message needs a string ``role`` and ``content``; a conversation needs at
least one assistant message (there is nothing to learn from one without). A bad line is one
:class:`~latentmoe.data.sources.DataSourceError` naming the file and the line.

Rendering and the mask
----------------------
The template (the checkpoint's, else :data:`latentmoe.hf.tokenizer.DEFAULT_CHAT_TEMPLATE`) is rendered turn by
turn. For the i-th message, when it is the assistant's::

    prompt_i = render(messages[:i], add_generation_prompt=True)      what generation would be given
    full_i   = render(messages[:i + 1])                              ... and the turn it should produce

the text between ``prompt_i`` and ``full_i`` is an *assistant segment* (the content and whatever the template
closes the turn with — e.g. EOS, so the model learns to stop); everything else (system and user turns, the
assistant header the generation prompt adds) is a *prompt segment*. Each segment is tokenised on its own and
the ids are concatenated: the prompt tokens are exactly those a generation request would be given, and no token
straddles the boundary between what the user wrote and what the model must answer. The mask is True on the
assistant segments' tokens and nowhere else. A template that rewrites earlier text when a turn is added (e.g.
one that drops the reasoning of earlier turns) cannot be cut this way; it is refused with one line.

Rows: padding, not packing
--------------------------
Each conversation is one row of ``seq_len`` tokens: its ids, then the pad id (mask False) — truncated when
longer (:attr:`ChatDataset.truncated` counts them; the run logs it). Position 0 of every row is the start of
its conversation, as at inference; causal attention means the padding after a conversation never reaches its
tokens, and no conversation attends to another (which packing several per row would allow).

Batches and split
-----------------
Rows of step ``k`` are conversation indices — ``sampling="random"``: ``B`` drawn uniformly from the training
conversations by :func:`~latentmoe.data.batching.window_generator` ``(seed, k)``; ``"sequential"``: row ``b``
is conversation ``(k·B + b) mod N`` — a pure function of ``(seed, k)``, so resume is exact as for token
windows. Rank ``r`` of ``W`` takes rows ``[r·B/W, (r+1)·B/W)``. A conversation is validation iff
:func:`latentmoe.data.prepare.document_in_validation` holds for its messages' canonical JSON — a function of
its content alone, like prepare-data's document split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentmoe.data.batching import TokenBatch, window_generator
from latentmoe.data.sources import DataSourceError

SAMPLING_MODES = ("random", "sequential")
DEFAULT_VAL_FRACTION = 0.05
ASSISTANT_ROLE = "assistant"

Encode = Callable[[str], list[int]]
Render = Callable[..., str]


@dataclass(frozen=True)
class ChatSegment:
    """A piece of a rendered conversation: its text and whether its tokens count in the loss."""

    text: str
    assistant: bool


def read_conversations(path: str | os.PathLike) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """``(line number, messages)`` of every non-blank line of a chat JSONL file, checked (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataSourceError(f"{path}:{number}: not a JSON object ({exc.__class__.__name__})") from None
            yield number, _messages(record, f"{path}:{number}")


def _messages(record: Any, where: str) -> list[dict[str, str]]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataSourceError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataSourceError(f"{where}: message {i} needs a string 'role' and 'content'")
    if not any(m["role"] == ASSISTANT_ROLE for m in messages):
        raise DataSourceError(f"{where}: no assistant message (nothing to learn from)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_segments(messages: list[dict[str, str]], render: Render) -> list[ChatSegment]:
    """The rendered conversation cut into prompt and assistant segments (module docstring).

    ``render(messages, add_generation_prompt=...)`` renders the chat template. Raises ValueError when the
    template does not render the conversation incrementally."""
    segments: list[ChatSegment] = []
    done = ""  # the text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT_ROLE:
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                f"the chat template does not render turn by turn (adding message {i} changes the text before it); "
                "it cannot mark the assistant's tokens"
            )
        segments += [ChatSegment(prompt[len(done):], False), ChatSegment(full[len(prompt):], True)]
        done = full
    whole = render(messages, add_generation_prompt=False)
    if not whole.startswith(done):
        raise ValueError("the chat template does not render turn by turn; it cannot mark the assistant's tokens")
    segments.append(ChatSegment(whole[len(done):], False))
    return [s for s in segments if s.text]


def tokenize_chat(segments: list[ChatSegment], encode: Encode) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [N] int64, mask [N] bool)``: every segment encoded on its own, concatenated; True on assistant
    segments' tokens."""
    ids, mask = [], []
    for segment in segments:
        piece = encode(segment.text)
        ids += piece
        mask += [segment.assistant] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


class ChatDataset:
    """Tokenised conversations with their masks, in memory (ragged: one pair of arrays for all), split into
    training and validation conversations, served as padded rows (module docstring). Use :meth:`from_jsonl`."""

    def __init__(
        self, ids: list[np.ndarray], masks: list[np.ndarray], is_val: list[bool], *, pad_id: int, path: Path,
        sha256: str,
    ) -> None:
        self.path = path
        self.sha256 = sha256
        self.pad_id = int(pad_id)
        lengths = np.array([len(a) for a in ids], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        self._mask = np.concatenate(masks) if masks else np.empty(0, dtype=bool)
        self.lengths = lengths
        self.train_indices = np.array([i for i, v in enumerate(is_val) if not v], dtype=np.int64)
        self.val_indices = np.array([i for i, v in enumerate(is_val) if v], dtype=np.int64)

    @classmethod
    def from_jsonl(
        cls, path: str | os.PathLike, *, render: Render, encode: Encode, pad_id: int,
        val_fraction: float = DEFAULT_VAL_FRACTION,
    ) -> ChatDataset:
        """Read, render (``render(messages, add_generation_prompt=...)``), tokenise (``encode(text) -> ids``)
        and split a chat JSONL file. DataSourceError (one line, naming file and line) on bad input."""
        from latentmoe.data.prepare import document_in_validation

        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        path = Path(path).expanduser()
        ids, masks, is_val = [], [], []
        for number, messages in read_conversations(path):
            try:
                segments = chat_segments(messages, render)
            except ValueError as exc:
                raise DataSourceError(f"{path}:{number}: {exc}") from None
            conversation_ids, mask = tokenize_chat(segments, encode)
            if not mask.any():
                raise DataSourceError(f"{path}:{number}: the assistant's turns render to no tokens")
            ids.append(conversation_ids)
            masks.append(mask)
            canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            is_val.append(document_in_validation(canonical, val_fraction))
        if not ids:
            raise DataSourceError(f"{path}: no conversations")
        if all(is_val):
            raise DataSourceError(f"{path}: every conversation fell in the validation split; lower the val fraction")
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return cls(ids, masks, is_val, pad_id=pad_id, path=path, sha256=sha256)

    # ------------------------------------------------------------------ sizes
    @property
    def num_train(self) -> int:
        return int(self.train_indices.size)

    @property
    def num_val(self) -> int:
        return int(self.val_indices.size)

    def assistant_tokens(self, split: str = "train") -> int:
        """Tokens the loss counts in the split's conversations (before truncation)."""
        return int(sum(self._mask[self._starts[i] : self._starts[i + 1]].sum() for i in self._split(split)))

    def max_token_id(self) -> int:
        """The largest token id of any conversation (-1 when there is none)."""
        return int(self._ids.max()) if self._ids.size else -1

    def truncated(self, seq_len: int, split: str = "train") -> int:
        """How many of the split's conversations are longer than ``seq_len`` tokens (and are cut)."""
        return int((self.lengths[self._split(split)] > seq_len).sum())

    def conversation(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` of conversation ``index`` (file order, both splits)."""
        a, b = self._starts[index], self._starts[index + 1]
        return self._ids[a:b], self._mask[a:b]

    # ------------------------------------------------------------------ rows and batches
    def rows(self, indices: np.ndarray | torch.Tensor, *, seq_len: int) -> TokenBatch:
        """``[len(indices), seq_len]`` rows of these conversations: ids then padding; mask False on padding."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = np.full((indices.size, seq_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((indices.size, seq_len), dtype=bool)
        for row, index in enumerate(indices.tolist()):
            conversation_ids, conversation_mask = self.conversation(index)
            n = min(seq_len, conversation_ids.size)
            ids[row, :n] = conversation_ids[:n]
            mask[row, :n] = conversation_mask[:n]
        return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask))

    def batch(
        self, step: int, *, batch_size: int, seq_len: int, seed: int, sampling: str = "random", rank: int = 0,
        world_size: int = 1,
    ) -> TokenBatch:
        """This rank's rows of the global ``[batch_size, seq_len]`` batch of ``step`` (module docstring)."""
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must split evenly over world_size ({world_size}); rank {rank}"
            )
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = self.num_train
        if sampling == "random":
            picks = torch.randint(0, n, (batch_size,), generator=window_generator(seed, step))
        elif sampling == "sequential":
            picks = (torch.arange(batch_size, dtype=torch.int64) + step * batch_size) % n
        else:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
        rows = batch_size // world_size
        return self.rows(self.train_indices[picks[rank * rows : (rank + 1) * rows].numpy()], seq_len=seq_len)

    def val_batches(self, *, batch_size: int, seq_len: int, max_batches: int | None = None) -> list[TokenBatch]:
        """Every validation conversation (at most ``batch_size * max_batches``, the first ones) as padded
        batches of ``batch_size`` rows (the last may be smaller); [] when there is none."""
        indices = self.val_indices if max_batches is None else self.val_indices[: batch_size * max_batches]
        return [self.rows(indices[i : i + batch_size], seq_len=seq_len) for i in range(0, indices.size, batch_size)]

    def _split(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        return self.train_indices if split == "train" else self.val_indices
