"""LogFMT-8/10 against E4M3 and E5M2 (per-1×128-tile scales) on real activations of a trained model (ISCA §3.2).

    python benchmarks/logfmt_error.py [--checkpoint runs/fp8_parity/bf16] [--batches 4]

DeepSeek evaluated LogFMT as a format for the MoE *combine*: the output of a residual branch, quantised
before it is sent back. So the activations compared here are the residual-branch outputs of the trained
model on validation text — each MoE layer's output (routed + shared experts) and each attention
block's output — captured with forward hooks, plus 1×128 Gaussian tiles (paper.md §16 check 18).
Each codec encodes and decodes the same tensor; the figure is the relative MSE
``mean((x̂ − x)²) / mean(x²)`` (lower is better), and ``ratio = peer / ours`` (> 1: LogFMT is better).
BF16 rounding is listed as the reference the paper compares LogFMT-10 with. Writes
``benchmarks/results/fp8_logfmt.json``; ``benchmarks/fp8_parity.py`` calls :func:`logfmt_cases` on the
model it has just trained.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from latentmoe.fp8 import logfmt_decode, logfmt_encode, quantize_tiles, relative_mse  # noqa: E402
from latentmoe.model.moe import MoEOutput  # noqa: E402

GAUSSIAN_TOKENS = 4096

CODECS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "LogFMT-8": lambda x: logfmt_decode(logfmt_encode(x, bits=8)),
    "LogFMT-10": lambda x: logfmt_decode(logfmt_encode(x, bits=10)),
    "E4M3 1x128": lambda x: quantize_tiles(x, fmt="e4m3").dequantize(),
    "E5M2 1x128": lambda x: quantize_tiles(x, fmt="e5m2").dequantize(),
    "BF16": lambda x: x.bfloat16().float(),
}
COMPARISONS = (  # (ours, peer, goal, ISCA §3.2 claim)
    ("LogFMT-8", "E4M3 1x128", "LogFMT-8 < E4M3 (ISCA §3.2)"),
    ("LogFMT-8", "E5M2 1x128", "LogFMT-8 < E5M2 (ISCA §3.2)"),
    ("LogFMT-10", "BF16", None),
)


@torch.no_grad()
def residual_branch_outputs(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"MoE output": [T·layers, D], "attention output": [...]}`` fp32, from forward hooks on every block."""
    captured: dict[str, list[torch.Tensor]] = {"MoE output": [], "attention output": []}
    handles = []

    def keep(kind: str):
        def hook(module, inputs, output):
            tensor = output.hidden_BSD if isinstance(output, MoEOutput) else output
            captured[kind].append(tensor.detach().float().reshape(-1, tensor.shape[-1]))

        return hook

    for block in model.model.layers:
        handles.append(block.self_attn.register_forward_hook(keep("attention output")))
        if block.is_moe:
            handles.append(block.mlp.register_forward_hook(keep("MoE output")))
    model.eval()
    try:
        for ids in batches:
            model(ids, compute_mtp=False)
    finally:
        for h in handles:
            h.remove()
    return {kind: torch.cat(parts) for kind, parts in captured.items() if parts}


def codec_errors(x: torch.Tensor) -> dict[str, float]:
    return {name: relative_mse(codec(x), x) for name, codec in CODECS.items()}


def logfmt_cases(model: torch.nn.Module, batches: Iterable[torch.Tensor], *, source: str) -> list[dict]:
    """Result cases for the activations of ``model`` on ``batches`` and for Gaussian tiles."""
    tensors = residual_branch_outputs(model, batches)
    D = next(iter(tensors.values())).shape[-1]
    tensors["Gaussian 1x128 tiles"] = torch.randn(GAUSSIAN_TOKENS, D, generator=torch.Generator().manual_seed(0))
    cases = []
    for kind, x in tensors.items():
        errors = codec_errors(x)
        print(f"{kind} ({x.shape[0]}x{x.shape[1]}): " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        for ours, peer, goal in COMPARISONS:
            ratio = errors[peer] / errors[ours] if errors[ours] > 0 else float("inf")
            cases.append(
                {
                    "case": f"{ours} vs {peer}: {kind}" + ("" if kind.startswith("Gaussian") else f" ({source})"),
                    "metric": f"relative MSE of encode+decode (lower is better); ratio = {peer} / {ours}",
                    "ours": float(f"{errors[ours]:.4g}"),
                    "peer": float(f"{errors[peer]:.4g}"),
                    "peer_name": peer + (" with one scale per 1x128 tile" if "1x128" in peer else " rounding"),
                    "ratio": round(ratio, 3),
                    "goal": goal or "informational (ISCA §3.2: LogFMT-10 trains like the BF16 combine)",
                    "met": (errors[ours] < errors[peer]) if goal else None,
                }
            )
    return cases


def main() -> int:
    from latentmoe.checkpoint import load_model, resolve_checkpoint
    from latentmoe.data import prepare_shipped_corpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/fp8_parity/bf16", help="checkpoint or run directory")
    parser.add_argument("--batches", type=int, default=4, help="validation batches of 8x128 tokens")
    args = parser.parse_args()
    path = resolve_checkpoint(args.checkpoint)
    model, _ = load_model(path)
    data = prepare_shipped_corpus(None, model.config.vocab_size)
    batches = data.val_batches(batch_size=8, seq_len=128, max_batches=args.batches)
    cases = logfmt_cases(model, batches, source=f"trained model {path}")
    print(f"wrote {write_results('fp8_logfmt', cases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
