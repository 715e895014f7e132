"""``latentmoe eval``: loss, perplexity and bits per byte of a checkpoint (ours or Hugging Face) on a prepared
dataset's validation (or training) windows, or on raw text files."""

from __future__ import annotations

import argparse
import json

from latentmoe.cli.common import add_device_option, field_type, fmt, positive_int
from latentmoe.train.config import TrainConfig

DEFAULTS = TrainConfig()
SPLITS = ("val", "train")
DTYPES = ("fp32", "bf16")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="validation loss, perplexity and bits per byte of a checkpoint",
        description="Score a checkpoint (a checkpoint-STEP dir, a run dir or a Hugging Face DeepSeek-V2/V3 directory) "
        "on a dataset prepared by `latentmoe prepare-data` — the non-overlapping windows the trainer validates on — "
        "or on raw text / JSONL / Parquet files tokenised with the checkpoint's tokenizer. With a run's own "
        "--batch-size, --seq-len and --max-batches (= its --eval-batches) the loss is the run's val loss.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face directory")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="a prepared dataset directory, or raw files / directories of them")
    p.add_argument("--split", choices=SPLITS, default=None, help="split of a prepared dataset (default val)")
    p.add_argument("--batch-size", type=field_type(TrainConfig, "batch_size"), default=None,
                   help=f"windows per forward (default: the run's, else {DEFAULTS.batch_size})")
    p.add_argument("--seq-len", type=field_type(TrainConfig, "seq_len"), default=None,
                   help=f"tokens per window (default: the run's, else {DEFAULTS.seq_len})")
    p.add_argument("--max-batches", type=positive_int(), default=None,
                   help="score the first N batches of evenly spread windows (default: every window of the split)")
    p.add_argument("--text-field", default="text", help="JSONL / Parquet column of raw files (default text)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from latentmoe.train.evaluate import evaluate_checkpoint, run_settings

    settings = run_settings(args.checkpoint)
    batch_size = args.batch_size or int(settings.get("batch_size") or DEFAULTS.batch_size)
    seq_len = args.seq_len or int(settings.get("seq_len") or DEFAULTS.seq_len)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, batch_size=batch_size, seq_len=seq_len,
                              max_batches=args.max_batches, device=args.device, dtype=dtype,
                              text_field=args.text_field)
    if args.json:
        print(json.dumps(out.to_dict()))
        return 0
    r = out.result
    where = f"{out.data} ({out.split})" if out.split else out.data
    print(f"{where}: {r.windows} windows of {out.seq_len} tokens, {r.tokens:,} tokens scored")
    print(f"loss {r.loss:.4f} nats/token   perplexity {fmt(r.perplexity, '.2f')}   "
          f"bits per byte {fmt(r.bits_per_byte, '.4f')}")
    return 0
