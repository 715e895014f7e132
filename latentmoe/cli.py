"""Command line: parses arguments, calls the library, prints. ``latentmoe --help`` lists the commands.

Every expected failure (bad argument, invalid config, missing or corrupt checkpoint) ends with one
line ``latentmoe: error: ...`` on stderr and exit status 2; Ctrl-C during training saves a
checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from latentmoe.config import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_train_options(p: argparse.ArgumentParser, *, steps: int, batch_size: int, seq_len: int) -> None:
    p.add_argument("--steps", type=positive_int, default=steps, help="total optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=seq_len, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr", type=float, default=2e-4, help="final learning rate of the cosine")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="fp32",
                   help="fp8: DeepSeek-V3's FP8 GEMMs (1x128 / 128x128 scaling; emulated on CPU, ~2x slower than bf16)")
    p.add_argument("--adam-moments", choices=("fp32", "bf16"), default="fp32",
                   help="dtype the AdamW moments are stored in (TR: bf16)")
    p.add_argument("--eval-every", type=non_negative_int, default=200, help="validation every K steps (0: at the end)")
    p.add_argument("--eval-batches", type=positive_int, default=8)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--save-every", type=non_negative_int, default=0, help="checkpoint every K steps (0: at the end)")
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight λ of the MTP loss (TR: 0.3)")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="router bias update speed γ (TR: 0.001)")
    p.add_argument("--balance-alpha", type=float, default=1e-4, help="sequence-wise balance loss α (TR: 1e-4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config_from_args(args: argparse.Namespace, out_dir: str):
    from latentmoe.train.trainer import TrainConfig

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    return TrainConfig(
        out_dir=out_dir,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=warmup,
        mtp_lambda=args.mtp_lambda,
        bias_gamma=args.bias_gamma,
        balance_alpha=args.balance_alpha,
        precision=args.precision,
        adam_moments=args.adam_moments,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
        save_every=args.save_every,
    ).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from latentmoe.parallel.command import parallel_config_from_args
    from latentmoe.parallel.training import is_main_process, shutdown
    from latentmoe.pipeline import train_on_corpus

    cfg = train_config_from_args(args, args.out)
    try:
        result, _ = train_on_corpus(cfg, model_spec=args.preset, resume=args.resume, progress=not args.no_progress,
                                    parallel=parallel_config_from_args(args))
        if not is_main_process():  # under torchrun only rank 0 reports
            return 0
    finally:
        shutdown()
    print(f"trained to step {result.final_step}: loss {fmt(result.final_loss)}, val loss {fmt(result.final_val_loss)}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics: {result.metrics_path}; plots: {result.loss_plot}, {result.expert_load_plot}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from latentmoe.infer import Engine, SamplingParams

    params = SamplingParams(  # validated before the (slower) checkpoint load
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    if args.batch_file is not None:
        if args.stream:
            raise ValueError("--stream works with --prompt, not --batch-file")
        with open(args.batch_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--batch-file: {args.batch_file} has no prompts")
    else:
        prompts = [args.prompt]
    from latentmoe.pipeline import load_for_generation

    model, tokenizer = load_for_generation(args.checkpoint)
    eos = model.config.eos_token_id
    params = dataclasses.replace(params, stop_token_ids=() if eos is None else (eos,))
    engine = Engine(model, tokenizer, cache_dtype=args.cache_dtype, max_batch=max(1, min(len(prompts), 16)))
    t0 = time.perf_counter()
    if args.stream:
        print(args.prompt, end="", flush=True)
        for event in engine.stream(args.prompt, params, speculative=args.speculative):
            print(event.new_text, end="", flush=True)
        print()
        results = [event.result]
    else:
        results = engine.generate(prompts, params, speculative=args.speculative)
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            print(("\n" if i else "") + prompt + result.text)
    elapsed = time.perf_counter() - t0
    generated = sum(r.stats.generated_tokens for r in results)
    line = f"{generated} tokens in {elapsed:.2f}s: {generated / elapsed:.1f} tokens/s"
    if args.speculative:
        drafted = sum(r.stats.draft_tokens for r in results)
        accepted = sum(r.stats.accepted_draft_tokens for r in results)
        line += f", draft acceptance {accepted / drafted:.0%} ({accepted}/{drafted})" if drafted else ", no drafts"
    print(line, file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from latentmoe.hf import convert

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    result = convert(args.src, args.dst, to=args.to, dtype=dtype, dequantize=args.dequantize,
                     max_shard_size=args.max_shard_size)
    dequantized = f", {result.dequantized} FP8 tensors dequantised" if result.dequantized else ""
    print(f"converted {result.source} ({result.source_kind}) -> {result.written} ({result.destination_kind}): "
          f"{result.num_parameters / 1e6:.1f}M parameters in {str(result.dtype).removeprefix('torch.')}, "
          f"{result.mtp_layers} MTP module(s){dequantized}, tokenizer {'copied' if result.tokenizer else 'absent'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from latentmoe.pipeline import run_demo

    cfg = train_config_from_args(args, args.out)
    print(f"latentmoe demo: training '{args.preset}' for {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens")
    result = run_demo(cfg, model_spec=args.preset, progress=not args.no_progress, sample_tokens=args.sample_tokens)
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


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="latentmoe",
        description="Train, sample and plan DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)

    p = sub.add_parser("train", help="train a model on the shipped corpus", description=(
        "Train a preset (or a config.json) on the shipped Shakespeare corpus; writes metrics.jsonl, "
        "loss.png, expert_load.png and checkpoint-STEP/ under --out."))
    p.add_argument("--preset", default="small", help="preset name or path to a config.json (default %(default)s)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    add_train_options(p, steps=1000, batch_size=16, seq_len=128)
    from latentmoe.parallel.command import add_ep_report_subcommand, add_parallel_options

    add_parallel_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample a continuation from a checkpoint",
                       description="Sample text from a trained checkpoint (a checkpoint-STEP dir or a run dir) "
                       "or a Hugging Face DeepSeek-V3/V2 directory.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, run directory (newest checkpoint), or Hugging Face directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--batch-file", help="a text file with one prompt per line, generated as one batch")
    p.add_argument("--max-tokens", type=non_negative_int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass, 1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=False,
                   help="MTP speculative decoding: the MTP module(s) draft, the model verifies (default: off)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (with --prompt)")
    p.add_argument("--cache-dtype", choices=("fp32", "bf16", "fp8"), default=None,
                   help="latent KV cache dtype (default: the model's)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert between the Hugging Face layout and latentmoe checkpoints",
                       description="Convert a Hugging Face DeepSeek-V3/V2 directory (BF16/FP32, or FP8 with "
                       "--dequantize) into a latentmoe run directory, or a latentmoe checkpoint/run directory into "
                       "the Hugging Face layout (MTP modules and tokenizer included).")
    p.add_argument("src", help="Hugging Face directory, or latentmoe checkpoint / run directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "latentmoe"), default=None,
                   help="output kind (default: the other kind than SRC's; hf -> hf re-saves, e.g. FP8 -> BF16)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="weight dtype written (default: as stored; bf16 for FP8 sources)")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantise FP8 block-quantised weights (required when SRC has them)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file written in the hf layout (default %(default)s)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="train the small model, compare with a unigram baseline, sample",
                       description="What `make demo` runs: train, evaluate against a unigram baseline, plot, sample.")
    p.add_argument("--preset", default="small", help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/demo", help="run directory, replaced (default %(default)s)")
    p.add_argument("--sample-tokens", type=positive_int, default=80)
    add_train_options(p, steps=200, batch_size=16, seq_len=128)
    p.set_defaults(func=cmd_demo, eval_every=100)

    add_ep_report_subcommand(sub)

    from latentmoe.data.command import add_prepare_data_subcommand

    add_prepare_data_subcommand(sub)

    try:
        from latentmoe.plan.command import add_plan_subcommand
    except ImportError:  # the planner is optional at this stage of the package
        pass
    else:
        add_plan_subcommand(sub)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, reported as one line (anything else is a bug: full traceback)."""
    from latentmoe.parallel.training import CollectiveError
    from latentmoe.train.checkpoint import CheckpointError
    from latentmoe.train.trainer import TrainingError

    errors: list[type[BaseException]] = [
        ConfigError, CheckpointError, TrainingError, CollectiveError, ValueError, OSError
    ]
    try:
        from latentmoe.plan import PlanError
    except ImportError:
        pass
    else:
        errors.append(PlanError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from latentmoe.train.trainer import TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:
        where = f"; checkpoint saved at {exc.checkpoint}" if exc.checkpoint else ""
        print(f"latentmoe: interrupted at step {exc.step}{where} (resume with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("latentmoe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected_errors() as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"latentmoe: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

