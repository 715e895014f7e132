"""``latentmoe generate``: sample continuations from one of our checkpoints or a Hugging Face directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from latentmoe.cli.common import add_device_option, field_type
from latentmoe.infer.sampling import SamplingParams

MAX_BATCH = 16


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample a continuation from a checkpoint",
                       description="Sample text from a trained checkpoint (a checkpoint-STEP dir or a run dir) "
                       "or a Hugging Face DeepSeek-V3/V2 directory.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, run directory (newest checkpoint), or Hugging Face directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--batch-file", help="a UTF-8 text file with one prompt per line, generated as one batch")
    s = SamplingParams
    p.add_argument("--max-tokens", type=field_type(s, "max_tokens"), default=100, help="default %(default)s")
    p.add_argument("--temperature", type=field_type(s, "temperature"), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=field_type(s, "top_k"), default=0, help="0 = off")
    p.add_argument("--top-p", type=field_type(s, "top_p"), default=0.95, help="nucleus mass, 1.0 = off")
    p.add_argument("--seed", type=field_type(s, "seed"), default=None)
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=False,
                   help="MTP speculative decoding: the MTP module(s) draft, the model verifies (default: off)")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered with the checkpoint's chat template (or the "
                   "default one) and answered; the template decides about BOS")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="decode and verify through the torch.compile'd static-shape step (first use of each batch/"
                        "cache bucket compiles, cached on disk by inductor; falls back to eager, saying why, where "
                        "compiling is unavailable) (default: --no-compile)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (with --prompt)")
    p.add_argument("--cache-dtype", choices=("fp32", "bf16", "fp8"), default=None,
                   help="latent KV cache dtype (default: the model's)")
    p.add_argument("--cache-memory", type=memory_size, default=None,
                   help="cache pool budget, e.g. 2GiB, 512MiB, 1.5GB (default: a quarter of the available memory, "
                   "at most what the batch can use)")
    add_device_option(p)
    p.set_defaults(func=run)


def memory_size(text: str) -> int:
    from latentmoe.io import parse_size

    try:
        return parse_size(text, what="memory size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def utf8_text(text: str, what: str) -> str:
    """Command-line text must be valid UTF-8 (argv bytes that are not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text (byte {exc.start})") from None
    return text


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"--batch-file {path}: not UTF-8 text (byte {exc.start})") from None
    if not prompts:
        raise ValueError(f"--batch-file {path}: has no prompts")
    return prompts


def run(args: argparse.Namespace) -> int:
    from latentmoe.infer import Engine
    from latentmoe.pretrained import load

    params = SamplingParams(  # validated before the (slower) checkpoint load
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    if args.batch_file is not None:
        if args.stream:
            raise ValueError("--stream works with --prompt, not --batch-file")
        prompts = read_prompts(args.batch_file)
    else:
        prompts = [utf8_text(args.prompt, "--prompt")]
    model, tokenizer = load(args.checkpoint, device=args.device)
    eos = model.config.eos_token_id
    params = dataclasses.replace(params, stop_token_ids=() if eos is None else (eos,))
    engine = Engine(model, tokenizer, cache_dtype=args.cache_dtype, max_batch=max(1, min(len(prompts), MAX_BATCH)),
                    cache_memory_bytes=args.cache_memory, compile=args.compile)
    shown = prompts
    if args.chat:  # token ids from the chat template; what is printed is the reply alone
        from latentmoe.serve.prompts import encode_chat

        config = model.config
        prompts = [encode_chat(tokenizer, [{"role": "user", "content": text}], bos_token_id=config.bos_token_id,
                               eos_token_id=config.eos_token_id) for text in prompts]
        shown = [""] * len(prompts)
    for prompt in prompts:  # bad input fails here, before anything is printed
        engine.new_request(prompt, params, speculative=args.speculative)
    print(f"cache: {engine.pool.describe()}", file=sys.stderr)
    t0 = time.perf_counter()
    if args.stream:
        print(shown[0], end="", flush=True)
        for event in engine.stream(prompts[0], params, speculative=args.speculative):
            print(event.new_text, end="", flush=True)
        print()
        results = [event.result]
    else:
        results = engine.generate(prompts, params, speculative=args.speculative)
        for i, (prompt, result) in enumerate(zip(shown, results, strict=True)):
            print(("\n" if i else "") + prompt + result.text)
    elapsed = time.perf_counter() - t0
    generated = sum(r.stats.generated_tokens for r in results)
    line = f"{generated} tokens in {elapsed:.2f}s: {generated / elapsed:.1f} tokens/s"
    if args.speculative:
        drafted = sum(r.stats.draft_tokens for r in results)
        accepted = sum(r.stats.accepted_draft_tokens for r in results)
        line += f", draft acceptance {accepted / drafted:.0%} ({accepted}/{drafted})" if drafted else ", no drafts"
    print(line, file=sys.stderr)
    if args.compile:
        runner = engine.runner
        if runner.fallback_reason is not None:
            print(f"compiled step not used: {runner.fallback_reason}", file=sys.stderr)
        else:
            spent = sum(runner.compile_seconds.values())
            print(f"compiled step: {len(runner.compile_seconds)} graph(s), first calls {spent:.1f}s "
                  f"(compilation included)", file=sys.stderr)
    return 0
