"""``latentmoe train``: train a preset (or a config.json, or a checkpoint with ``--init-from``) on a prepared dataset,
chat data or the shipped corpus, resumably, on one or many processes."""

from __future__ import annotations

import argparse

from latentmoe.cli.common import add_device_option, add_overwrite_option, field_type, fmt
from latentmoe.train.config import PRECISIONS, TrainConfig
from latentmoe.train.optim import MOMENT_DTYPES

DEFAULTS = TrainConfig()
RESUME_AUTO = "auto"
RESUME_REQUIRED = "required"


def resume_value(text: str) -> str:
    if text not in (RESUME_AUTO, RESUME_REQUIRED):  # argparse passes the const ("required") through here too
        raise argparse.ArgumentTypeError(f"takes no value or '{RESUME_AUTO}', got {text!r}")
    return text


def add_train_options(p: argparse.ArgumentParser, *, steps: int = DEFAULTS.steps) -> None:
    """The TrainConfig options, with TrainConfig's defaults and limits (``steps`` may differ: the demo's)."""
    t = TrainConfig

    def opt(flag: str, name: str, help: str, **kw) -> None:
        p.add_argument(
            flag,
            type=field_type(t, name),
            default=kw.pop("default", getattr(DEFAULTS, name)),
            help=f"{help} (default %(default)s)",
            **kw,
        )

    opt("--steps", "steps", "total optimizer steps", default=steps)
    opt("--batch-size", "batch_size", "sequences per step (the global batch)")
    opt("--seq-len", "seq_len", "tokens per sequence")
    opt("--lr", "lr", "peak learning rate")
    opt("--min-lr", "min_lr", "final learning rate of the cosine")
    p.add_argument(
        "--warmup",
        dest="warmup_steps",
        type=field_type(t, "warmup_steps"),
        default=None,
        help="warmup steps (default: 5%% of --steps)",
    )
    opt("--seed", "seed", "seed of the initial weights and the data stream")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULTS.precision,
        help="fp8: DeepSeek-V3's FP8 GEMMs (1x128 / 128x128 scaling; emulated on CPU, ~2x slower than bf16)",
    )
    p.add_argument(
        "--adam-moments",
        choices=tuple(MOMENT_DTYPES),
        default=DEFAULTS.adam_moments,
        help="dtype the AdamW moments are stored in (TR: bf16)",
    )
    opt("--eval-every", "eval_every", "validation every K steps (0: at the end)")
    opt("--eval-batches", "eval_batches", "validation batches")
    opt("--log-every", "log_every", "metrics record every K steps")
    opt("--save-every", "save_every", "checkpoint every K steps (0: only at the end)")
    opt("--keep-last", "keep_last", "checkpoints kept")
    opt("--mtp-lambda", "mtp_lambda", "weight λ of the MTP loss (TR: 0.3)")
    opt("--bias-gamma", "bias_gamma", "router bias update speed γ (TR: 0.001)")
    opt("--balance-alpha", "balance_alpha", "sequence-wise balance loss α (TR: 1e-4)")
    opt("--grad-clip", "grad_clip", "clip the global gradient norm to this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_option(p)


def train_config_from_args(args: argparse.Namespace, *, preset: str | None) -> TrainConfig:
    names = (
        "steps",
        "batch_size",
        "seq_len",
        "lr",
        "min_lr",
        "warmup_steps",
        "seed",
        "precision",
        "adam_moments",
        "eval_every",
        "eval_batches",
        "log_every",
        "save_every",
        "keep_last",
        "mtp_lambda",
        "bias_gamma",
        "balance_alpha",
        "grad_clip",
    )
    return TrainConfig(
        out_dir=args.out, preset=preset or DEFAULTS.preset, **{n: getattr(args, n) for n in names}
    ).validate()


def add_parser(sub) -> None:
    from latentmoe.cli.data_options import add_data_options
    from latentmoe.cli.ep_report import add_parallel_options

    p = sub.add_parser(
        "train",
        help="train a model on your data (or the shipped corpus)",
        description=(
            "Train a preset, a config.json or a checkpoint (--init-from) on a prepared dataset (--data), chat "
            "conversations (--sft) or the shipped Shakespeare corpus; writes metrics.jsonl, loss.png, "
            "expert_load.png and checkpoint-STEP/ under --out (a checkpoint every --save-every steps; SIGINT or "
            "SIGTERM saves one and exits with 130 / 143)."
        ),
    )
    p.add_argument(
        "--preset",
        default=None,
        help=f"preset name or path to a config.json (default {DEFAULTS.preset}; on --resume the "
        "checkpoint's model, which an explicit --preset must match)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        nargs="?",
        const=RESUME_REQUIRED,
        default=False,
        type=resume_value,
        metavar="auto",
        help="continue from the newest valid checkpoint in --out (an error if there is none); "
        "'--resume auto' starts fresh when there is none",
    )
    add_overwrite_option(p, "--out")
    add_train_options(p)
    add_data_options(p)
    add_parallel_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentmoe.cli.data_options import data_kwargs
    from latentmoe.cli.ep_report import parallel_config_from_args
    from latentmoe.parallel.runtime import shutdown
    from latentmoe.parallel.strategy import start_strategy
    from latentmoe.train.run import train_on_corpus

    cfg = train_config_from_args(args, preset=args.preset)
    parallel = parallel_config_from_args(args)
    strategy = start_strategy(parallel, device=args.device)
    try:
        with strategy.errors():
            result, data = train_on_corpus(
                cfg,
                model_spec=args.preset,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                strategy=strategy,
                device=args.device,
                **data_kwargs(args),
            )
        if not strategy.is_main:  # under torchrun only rank 0 reports
            return 0
    finally:
        shutdown()
    print_summary(result, data)
    return 0


def print_summary(result, data=None) -> None:
    at = (
        f" (logged at step {result.final_loss_step})" if result.final_loss_step not in (None, result.final_step) else ""
    )
    label = data.label if data is not None else "the shipped corpus"
    epochs = f", {result.data.epochs(result.tokens_seen):.3g} epochs" if result.data is not None else ""
    print(
        f"trained to step {result.final_step} on {label} ({result.tokens_seen:,} tokens trained in this run's "
        f"history{epochs}): loss {fmt(result.final_loss)}{at}, final val loss {fmt(result.final_val_loss)}"
    )
    if result.initial_val_loss is not None:
        print(f"val loss before the first step (the checkpoint's): {fmt(result.initial_val_loss)}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics: {result.metrics_path}; plots: {result.loss_plot}, {result.expert_load_plot}")
