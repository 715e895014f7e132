"""The data and starting-point options of ``latentmoe train``: ``--data``, ``--sampling``, ``--init-from``, ``--sft``
(and ``--no-verify-data``, ``--sft-val-fraction``).

Kept apart from ``cli/train.py`` so the training command's own options and these grow independently; both end in
``latentmoe.train.run.train_on_corpus``.
"""

from __future__ import annotations

import argparse
from typing import Any

from latentmoe.cli.common import number

SAMPLING_CHOICES = ("random", "sequential")  # latentmoe.data.dataset.SAMPLING_MODES (kept torch-free here)
DEFAULT_SFT_VAL_FRACTION = 0.05  # latentmoe.data.chat.DEFAULT_VAL_FRACTION


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and starting point")
    g.add_argument("--data", metavar="DIR", default=None,
                   help="a dataset prepared by `latentmoe prepare-data` (default: the shipped Shakespeare corpus); "
                   "a fresh model takes its tokenizer's vocabulary")
    g.add_argument("--no-verify-data", dest="verify_data", action="store_false",
                   help="check only the shards' sizes at start, not their SHA-256 (for a dataset too large to "
                   "read once)")
    g.add_argument("--sampling", choices=SAMPLING_CHOICES, default="random",
                   help="random windows (a pure function of seed and step) or one sequential pass after another "
                   "(default %(default)s)")
    g.add_argument("--init-from", metavar="PATH", default=None,
                   help="start from this checkpoint: a latentmoe run / checkpoint directory or a Hugging Face "
                   "DeepSeek-V2/V3 directory (BF16, FP32 or FP8); model, weights and tokenizer come from it, the "
                   "optimizer and schedule start fresh (unlike --resume)")
    g.add_argument("--sft", metavar="FILE.jsonl", default=None,
                   help='chat fine-tuning on {"messages": [{"role", "content"}, ...]} lines, rendered by the '
                   "checkpoint's chat template (or latentmoe's default); the loss counts only the assistant's "
                   "tokens; one padded row per conversation")
    g.add_argument("--sft-val-fraction", type=number(0, 1, high_open=True), default=DEFAULT_SFT_VAL_FRACTION,
                   help="share of the conversations held out for validation, chosen by content "
                   "(default %(default)s)")


def data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``train_on_corpus`` these options set (and, without a progress bar, a line on
    stdout per metrics record)."""
    return {"data": args.data, "verify_data": args.verify_data, "sampling": args.sampling,
            "init_from": args.init_from, "sft": args.sft, "sft_val_fraction": args.sft_val_fraction,
            "on_log": print_record if getattr(args, "no_progress", False) else None}


def print_record(record: dict[str, Any]) -> None:
    """``step 200: loss 4.9123, val loss 5.0211, 409,600 tokens seen, 0.183 epochs``"""
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("val_loss") is not None:
        parts.append(f"val loss {record['val_loss']:.4f}")
    parts.append(f"{record.get('tokens_seen', 0):,} tokens seen")
    if record.get("dataset_epochs") is not None:
        parts.append(f"{record['dataset_epochs']:.3g} epochs")
    print(f"step {record['step']}: {', '.join(parts)}", flush=True)
