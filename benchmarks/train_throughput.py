"""Training throughput and model FLOP utilisation of the ``small`` preset against the measured matmul peak.

    python benchmarks/train_throughput.py [--repeats 5] [--batch-size 16] [--seq-len 128]

FLOPs are *counted*, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul
and attention FLOP of one full training step (forward of main model and MTP, backward), so the MFU is
counted FLOPs / step time / peak. The peak is the best median square ``torch.mm`` FLOP/s measured in
the same run with the same dtype (fp32; for bf16 autocast the bf16 peak), before and after the timed
steps. ratio = MFU (ours / peak). Run it on an otherwise idle machine: a busy neighbour lowers the
peak and the step time at different moments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, median_time, write_results  # noqa: E402

from latentmoe import CausalLM, ModelConfig  # noqa: E402
from latentmoe.model.mtp import causal_lm_loss  # noqa: E402
from latentmoe.train.optim import build_optimizer  # noqa: E402

GOAL_MFU = 0.30


def make_step(model, optimizer, ids, precision):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids)
            loss = causal_lm_loss(out, ids).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_biases(out.expert_load, 1e-3)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    tokens = ids.numel()
    cases = []
    for precision, peak_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = CausalLM(config)
        optimizer = build_optimizer(model, lr=1e-3)
        step = make_step(model, optimizer, ids, precision)
        step()  # warm-up (allocations, oneDNN kernels)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        # The machine is shared: take the GEMM peak before and after the timed steps and keep the best.
        peak_before = matmul_peak_flops(peak_dtype)
        seconds = median_time(step, repeats=args.repeats, warmup=0)
        peak = max(peak_before, matmul_peak_flops(peak_dtype))
        achieved = flops / seconds
        mfu = achieved / peak
        print(f"{args.preset} {precision}: {tokens / seconds:,.0f} tokens/s, {seconds * 1e3:.0f} ms/step, "
              f"{flops / tokens / 1e6:.1f} MFLOP/token counted, {achieved / 1e9:.1f} GFLOP/s "
              f"vs {peak_dtype} mm peak {peak / 1e9:.1f} GFLOP/s -> MFU {mfu:.1%}")
        cases.append({
            "case": f"{args.preset} train step {precision} batch={args.batch_size} seq={args.seq_len}",
            "metric": "model FLOP/s (counted) vs measured matmul peak; ratio = MFU",
            "ours": round(achieved / 1e9, 2),
            "peak": round(peak / 1e9, 2),
            "peer": round(peak / 1e9, 2),
            "peer_name": f"torch.mm {str(peak_dtype).removeprefix('torch.')} square GEMM peak, same run (GFLOP/s)",
            "tokens_per_s": round(tokens / seconds, 1),
            "step_ms": round(seconds * 1e3, 1),
            "mflop_per_token": round(flops / tokens / 1e6, 2),
            "ratio": round(mfu, 3),
            "goal": f">= {GOAL_MFU:.0%} MFU",
            "met": mfu >= GOAL_MFU,
        })
    path = write_results("train_throughput", cases)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
