"""``latentmoe prepare-data``: parse flags, call :func:`~latentmoe.data.prepare.prepare_data`, draw a
tqdm bar (bytes/s, ETA), print one summary line (or ``--json``).

    latentmoe prepare-data corpus/ --out data/mine --tokenizer train --vocab-size 16384 [--workers 2]
    latentmoe prepare-data more/ --out data/mine --append
    latentmoe prepare-data chats.parquet --out data/p --tokenizer path/to/tokenizer.json --text-field body

``add_parser(subparsers)`` registers it on any argparse sub-parser set; the parser's ``func`` returns the exit
status. Bad input raises the library's one-line ``ValueError`` subclasses,
which the main CLI prints as ``latentmoe: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from latentmoe.cli.common import add_overwrite_option, number, positive_int
from latentmoe.data.corpus import DEFAULT_VAL_FRACTION
from latentmoe.data.prepare import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_TOKENIZER_SAMPLE_BYTES,
    SPLIT_RULES,
    PrepareProgress,
    PrepareResult,
    prepare_data,
)
from latentmoe.data.sources import DEFAULT_GLOB, DEFAULT_TEXT_FIELD, ENCODING_ERRORS
from latentmoe.io import BYTES_PER_MIB


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenise text, JSONL, Parquet or saved datasets into memory-mapped token shards",
        description="Tokenise once into token shards + manifest.json (docs/data.md); re-running resumes.",
    )
    p.add_argument("inputs", nargs="+", help="files or directories (searched recursively with --glob)")
    p.add_argument("--out", required=True, help="dataset directory (missing, empty, or a dataset prepared here)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'train' (a byte-level BPE, needs --vocab-size), a tokenizer.json or a directory with one; "
        "default with --append or a re-run: the dataset's own",
    )
    p.add_argument("--vocab-size", type=positive_int(), default=None, help="vocabulary of a trained tokenizer")
    p.add_argument(
        "--tokenizer-sample-mb",
        type=positive_int(),
        default=DEFAULT_TOKENIZER_SAMPLE_BYTES // BYTES_PER_MIB,
        help="MiB of training text the tokenizer is trained on (default %(default)s)",
    )
    p.add_argument("--bos-token", default=None, help="BOS token of a given tokenizer (default: its config, <|bos|>)")
    p.add_argument("--eos-token", default=None, help="EOS token of a given tokenizer (default: its config, <|eos|>)")
    p.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, help="JSONL field / column with the text")
    p.add_argument("--glob", default=DEFAULT_GLOB, help="which files of a directory to read (default %(default)s)")
    p.add_argument(
        "--encoding-errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help="strict: non-UTF-8 input is an error; replace: bad bytes become U+FFFD",
    )
    p.add_argument(
        "--split",
        choices=SPLIT_RULES,
        default="document",
        help="document: whole documents by a hash of their text; tail: the end of every document",
    )
    p.add_argument("--val-fraction", type=number(0, 1, high_open=True), default=DEFAULT_VAL_FRACTION)
    p.add_argument(
        "--shard-mb",
        type=positive_int(),
        default=DEFAULT_SHARD_BYTES // BYTES_PER_MIB,
        help="MiB of text per shard (the unit of work and of resuming; default %(default)s)",
    )
    p.add_argument("--workers", type=positive_int(), default=1, help="tokenising processes")
    p.add_argument("--append", action="store_true", help="add inputs not yet in the dataset")
    add_overwrite_option(p, "--out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare_data)
    return p


def run_prepare_data(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    bars = []  # made at the first report, so that an early error prints no empty bar

    def progress(p: PrepareProgress) -> None:
        if not bars:
            bars.append(
                tqdm(
                    total=p.bytes_total,
                    initial=p.bytes_done - p.run_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="prepare-data",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            )
        bar = bars[0]
        bar.total = p.bytes_total
        bar.set_postfix(shards=f"{p.shards_done}/{p.shards_total}", tokens=p.tokens_done, refresh=False)
        bar.update(p.bytes_done - bar.n)

    try:
        result = prepare_data(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            tokenizer_sample_bytes=args.tokenizer_sample_mb * BYTES_PER_MIB,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            text_field=args.text_field,
            glob=args.glob,
            encoding_errors=args.encoding_errors,
            split=args.split,
            val_fraction=args.val_fraction,
            shard_bytes=args.shard_mb * BYTES_PER_MIB,
            workers=args.workers,
            append=args.append,
            overwrite=args.overwrite,
            progress=None if args.no_progress else progress,
        )
    finally:
        for bar in bars:
            bar.close()
    print(json.dumps(_as_json(result), indent=2) if args.json else summary_line(result))
    return 0


def _as_json(result: PrepareResult) -> dict:
    data = dataclasses.asdict(result)
    return {k: str(v) if k.endswith(("_dir", "_path")) else v for k, v in data.items()}


def summary_line(result: PrepareResult) -> str:
    fresh = result.shards_written and not result.shards_skipped  # a rate only when this run did all the work
    rate = result.text_bytes / BYTES_PER_MIB / result.seconds if fresh and result.seconds > 0 else None
    speed = f", {rate:.1f} MiB/s" if rate is not None else ""
    return (
        f"prepared {result.out_dir}: {result.shards_total} shards ({result.shards_written} written, "
        f"{result.shards_skipped} already done), {result.train_tokens:,} train + {result.val_tokens:,} val tokens, "
        f"{result.train_documents + result.val_documents:,} documents, "
        f"{result.text_bytes / BYTES_PER_MIB:.1f} MiB of text in {result.seconds:.1f} s{speed}"
    )
