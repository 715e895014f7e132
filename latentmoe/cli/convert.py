"""``latentmoe convert``: the Hugging Face layout ⇄ our checkpoints (and HF → HF, e.g. FP8 → BF16)."""

from __future__ import annotations

import argparse

from latentmoe.cli.common import add_device_option, add_overwrite_option


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between the Hugging Face layout and latentmoe checkpoints",
                       description="Convert a Hugging Face DeepSeek-V3/V2 directory (BF16/FP32, or FP8 with "
                       "--dequantize) into a latentmoe run directory, or a latentmoe checkpoint/run directory into "
                       "the Hugging Face layout (MTP modules and tokenizer included), or either into one GGUF file "
                       "for llama.cpp (--to gguf). DST must be new, empty, or an earlier conversion; it is never "
                       "the source, a training run or a checkpoint.")
    p.add_argument("src", help="Hugging Face directory, or latentmoe checkpoint / run directory")
    p.add_argument("dst", help="output directory (a NAME.gguf file with --to gguf)")
    p.add_argument("--to", choices=("hf", "latentmoe", "gguf"), default=None,
                   help="output kind (default: the other kind than SRC's; hf -> hf re-saves, e.g. FP8 -> BF16; "
                   "gguf: one file for llama.cpp, architecture deepseek2, MTP modules not written)")
    p.add_argument("--dtype", choices=tuple(DTYPE_ALIASES), default=None,
                   help="weight dtype written (default: as stored; bf16 for FP8 sources); f16/fp16 for gguf")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantise FP8 block-quantised weights (required when SRC has them)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file written in the hf layout (default %(default)s)")
    add_overwrite_option(p, "DST")
    add_device_option(p)
    p.set_defaults(func=run)


# --dtype: our short names, and GGUF's spelling of the same (f32, f16)
DTYPE_ALIASES = {"bf16": "bf16", "fp32": "fp32", "fp16": "fp16", "f32": "fp32", "f16": "fp16"}


def run(args: argparse.Namespace) -> int:
    from latentmoe.dtypes import dtype_from_name
    from latentmoe.hf import convert

    dtype = dtype_from_name(DTYPE_ALIASES[args.dtype]) if args.dtype else None
    result = convert(args.src, args.dst, to=args.to, dtype=dtype, dequantize=args.dequantize,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite, device=args.device)
    dequantized = f", {result.dequantized} FP8 tensors dequantised" if result.dequantized else ""
    if result.destination_kind == "gguf":
        print(f"converted {result.source} ({result.source_kind}) -> {result.written} (gguf, llama.cpp deepseek2): "
              f"{result.num_parameters / 1e6:.1f}M parameters in {str(result.dtype).removeprefix('torch.')} "
              "(norms and router in float32), MTP modules not written, tokenizer included")
        return 0
    print(f"converted {result.source} ({result.source_kind}) -> {result.written} ({result.destination_kind}): "
          f"{result.num_parameters / 1e6:.1f}M parameters in {str(result.dtype).removeprefix('torch.')}, "
          f"{result.mtp_layers} MTP module(s){dequantized}, tokenizer {'copied' if result.tokenizer else 'absent'}")
    return 0
