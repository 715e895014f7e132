"""``latentmoe demo`` (what ``make demo`` runs): train the small model, compare with a unigram baseline, sample."""

from __future__ import annotations

import argparse

from latentmoe.cli.common import add_overwrite_option, fmt, positive_int
from latentmoe.cli.train import add_train_options, train_config_from_args

DEMO_STEPS = 200
DEMO_EVAL_EVERY = 100
MAX_SAMPLE_TOKENS = 4096


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train the small model, compare with a unigram baseline, sample",
                       description="What `make demo` runs: train, evaluate against a unigram baseline, plot, sample. "
                       "A previous demo run in --out is replaced (only its own files).")
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/demo", help="run directory (default %(default)s)")
    p.add_argument("--sample-tokens", type=positive_int(MAX_SAMPLE_TOKENS), default=80)
    add_overwrite_option(p, "--out")
    add_train_options(p, steps=DEMO_STEPS)
    p.set_defaults(func=run, eval_every=DEMO_EVAL_EVERY)


def run(args: argparse.Namespace) -> int:
    from latentmoe.demo import run_demo

    cfg = train_config_from_args(args, preset=args.preset)
    print(f"latentmoe demo: training '{cfg.preset}' for {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens")
    result = run_demo(cfg, model_spec=args.preset, progress=not args.no_progress, sample_tokens=args.sample_tokens,
                      overwrite=args.overwrite, device=args.device)
    tr = result.train
    print()
    print(f"model: {result.num_parameters / 1e6:.1f}M parameters with MTP "
          f"({result.num_active_parameters / 1e6:.1f}M active per token in the main model)")
    print(f"training: {tr.final_step} steps, median {fmt(tr.tokens_per_s, '.0f')} tokens/s")
    print(f"validation loss: {fmt(tr.final_val_loss)} nats/token   "
          f"(unigram baseline: {result.unigram_val_loss:.3f}; lower is better)")
    print(f"plots: {tr.loss_plot}, {tr.expert_load_plot}; metrics: {tr.metrics_path}")
    print(f"checkpoint: {tr.checkpoint}")
    for prompt, text in result.samples:
        print("\n--- sample ---------------------------------------------")
        print(prompt + text)
    print(f"\nmore: latentmoe generate --checkpoint {tr.out_dir} --prompt 'JULIET:'")
    return 0
