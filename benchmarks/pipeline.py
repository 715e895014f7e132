"""Pipeline parallelism on gloo: step time, bubble per schedule (measured vs the planner's formula), memory per
stage, exposed all-to-all with and without DualPipe's overlapped chunk pairs, and the measured schedule.

    python benchmarks/pipeline.py [--steps 5] [--batch-size 8] [--seq-len 64] [--microbatches 8]

The ``small`` preset (6 layers + 1 MTP module, 16 experts) trains for ``--steps`` steps per case, as gloo
processes on 127.0.0.1 (one torch thread each), in three launches:

1. **PP 2** (2 ranks) and 2. **PP 4** (4 ranks), every schedule (1f1b, interleaved, zb, dualpipev), the default
   FLOP-balanced split, ``--microbatches`` per step. Per case: the step time (peer: 1F1B at the same PP); the
   idle fraction every rank measured (wall clock, the first step left out) beside what the planner's formula
   predicts from the run's own chunk times F, B, W (``latentmoe.plan.pipeline``); the run's recorded chunk order
   replayed with the formulas' costs (F=1, B=2, W=1) beside the formula at those costs — the bubble of the
   schedule torch actually ran, free of this machine's noise; per stage (rank): parameter + gradient + AdamW
   bytes and the process's peak resident memory, beside the planner's per-device parameters (1x / 2x of a
   stage). A PNG per PP 4 schedule draws the last step's chunks per rank (F, B, I, W, exposed EP all-to-all).
3. **PP 2 x EP 2** (4 ranks: two pipelines, half the batch and micro-batches each), DualPipeV, without and with
   ``--pp-overlap``: the all-to-all time left exposed
   (compute blocked on a transfer) and the step time.

Writes benchmarks/results/pipeline.json and benchmarks/results/pipeline_pp4_<schedule>.png. The machine is
shared (2 cores, other jobs): wall-clock times and idle fractions are noisy and dominated by per-chunk overheads at
this size; the replayed bubble and the byte counts are exact.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS_DIR, write_results  # noqa: E402

SCHEDULES = ("1f1b", "interleaved", "zb", "dualpipev")
PLANNER = {"1f1b": "1f1b", "interleaved": "interleaved", "zb": "zb1p", "dualpipev": "dualpipev"}
PER_RANK = {"1f1b": 1, "interleaved": 2, "zb": 1, "dualpipev": 2}
KIB = 1024
FP32_BYTES = 4
TRAINING_COPIES = 4  # weight, gradient, two AdamW moments per parameter (all fp32 here)
OVERLAP_NOTE = (
    "the pair's forward runs in a second thread while the backward computes; here 4 ranks (8 threads) share 2 cores "
    "with other jobs, so a thread blocked on a transfer mostly hands its core to another process, not to its twin"
)


def small_config():
    from latentmoe import ModelConfig

    return ModelConfig.from_preset("small")


def batch_fn_for(args):
    vocab = small_config().vocab_size

    def batch_fn(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + step)
        return torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)

    return batch_fn


def _state_bytes(model, optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = params  # fp32 gradients, one per parameter
    state = 0
    for family in getattr(optimizer, "families", [optimizer]):
        opt = getattr(family, "optimizer", family)
        local = getattr(opt, "optim", opt)  # ZeRO keeps its shard in .optim
        for s in local.state.values():
            state += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return params + grads + state


def run_case(rank: int, world: int, args, out: Path, *, pp: int, ep: int, schedule: str, overlap: bool,
             microbatches: int) -> None:
    from latentmoe import CausalLM
    from latentmoe.parallel.pp.strategy import PipelineConfig, PipelineStrategy
    from latentmoe.parallel.strategy import ParallelConfig
    from latentmoe.parallel.topology import build_groups
    from latentmoe.train.trainer import TrainConfig, Trainer

    pipeline = PipelineConfig(pp=pp, schedule=schedule, microbatches=microbatches, seq_len=args.seq_len,
                              overlap_f_b=overlap)
    parallel = ParallelConfig(ep=ep, pipeline=pipeline)
    strategy = PipelineStrategy(build_groups(parallel.topology(rank, world), ep_backward=overlap), parallel,
                                pipeline)
    torch.manual_seed(0)
    model = strategy.prepare_model(CausalLM(small_config()))
    name = f"pp{pp}-ep{ep}-{schedule}{'-overlap' if overlap else ''}"
    cfg = TrainConfig(out_dir=out / name, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      warmup_steps=1, log_every=1, eval_every=0, save_every=0, keep_last=None, lr=1e-3)
    trainer = Trainer(cfg, model=model, batch_fn=batch_fn_for(args), handle_signals=False, strategy=strategy)
    trainer.run()
    torch.distributed.barrier()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB  # bytes (Linux reports KiB)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps({
        "events": [e.to_dict() for e in strategy.last_events],
        "state_bytes": _state_bytes(model, trainer.optimizer),
        "peak_rss_bytes": peak_rss,
        "layers_per_stage": strategy.counts,
        "stages": [s.index for s in model.specs],
    }))


def ranks_body(rank: int, world: int, args, out: str, cases: list[tuple]) -> None:
    torch.set_num_threads(1)
    for pp, ep, schedule, overlap, microbatches in cases:
        run_case(rank, world, args, Path(out), pp=pp, ep=ep, schedule=schedule, overlap=overlap,
                 microbatches=microbatches)


def launch(world: int, args, out: Path, cases: list[tuple]) -> None:
    from tests.parallel.launch import run_ranks

    run_ranks(ranks_body, world, args, str(out), cases, deadline_s=3600, collective_timeout_s=600)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pipeline_cases(out: Path, pp: int, world: int, rows: list[dict], plots: list[str]) -> None:
    from latentmoe.parallel.pp.timeline import plot_timeline
    from latentmoe.plan.arch import arch_from_model_config
    from latentmoe.plan.pipeline import measured_pipeline, stage_params

    arch = arch_from_model_config(small_config(), "small")
    step_1f1b = None
    for schedule in SCHEDULES:
        name = f"pp{pp}-ep1-{schedule}"
        recs = records(out / name)
        layout = {"schedule": schedule, "virtual_stages": pp * PER_RANK[schedule]}
        m = measured_pipeline(layout, recs)
        ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(world)]
        step_s = sum(r["pp_step_s"] for r in recs[1:]) / max(1, len(recs) - 1)
        step_1f1b = step_s if schedule == "1f1b" else step_1f1b
        case = f"small, PP{pp}, {schedule}, {m.microbatches} micro-batches"
        t = m.times
        rows.append({
            "case": case, "metric": "step time, s (lower is better)", "ours": step_s, "peer": step_1f1b,
            "peer_name": f"1F1B at PP{pp}, same run", "ratio": step_1f1b / step_s,
            "goal": "informational (CPU: per-chunk overheads dominate at this size)", "met": None,
            "layers_per_stage": ranks[0]["layers_per_stage"],
        })
        rows.append({
            "case": case, "metric": "idle fraction, wall clock, mean over ranks (lower is better)",
            "ours": m.measured_mean, "peer": m.predicted,
            "peer_name": f"planner {m.formula} with the run's F={t.forward * 1e3:.1f} ms B={t.backward * 1e3:.1f} ms "
                         f"W={t.weight * 1e3:.1f} ms",
            "ratio": m.predicted / m.measured_mean if m.measured_mean else None,
            "goal": "informational: the formula is the bubble alone; the measurement adds stage imbalance and "
                    "per-chunk overhead", "met": None,
            "per_rank": list(m.measured_per_rank),
        })
        replayed = max(m.replayed_per_rank)
        rows.append({
            "case": case, "metric": "idle fraction, recorded chunk order replayed at F=1 B=2 W=1 (lower is better)",
            "ours": replayed, "peer": m.unit_predicted, "peer_name": f"planner {m.formula} at F=1 B=2 W=1",
            "ratio": m.unit_predicted / replayed if replayed else None,
            "goal": ">= 1 (torch's schedule has at most the formula's bubble)",
            "met": replayed <= m.unit_predicted + 1e-9, "per_rank": list(m.replayed_per_rank),
        })
        planner_params = stage_params(arch, pp * PER_RANK[schedule]) * (2 if PER_RANK[schedule] == 2 else 1)
        state = [r["state_bytes"] for r in ranks]
        rows.append({
            "case": case, "metric": "parameter + gradient + AdamW bytes per stage (rank), max (lower is better)",
            "ours": max(state), "peer": planner_params * FP32_BYTES * TRAINING_COPIES,
            "peer_name": "planner parameters per device (1x / 2x of a stage, even split) x fp32 x (weight, grad, 2 "
                         "moments)",
            "ratio": planner_params * FP32_BYTES * TRAINING_COPIES / max(state),
            "goal": "informational (our split is FLOP-balanced, the planner's even)", "met": None,
            "per_rank": state, "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
        })
        if pp == 4:
            png = RESULTS_DIR / f"pipeline_pp4_{schedule}.png"
            plot_timeline([r["events"] for r in ranks], png,
                          title=f"small, PP4, {schedule}: last step per rank (gaps = bubble)")
            plots.append(png.name)


def overlap_cases(out: Path, rows: list[dict]) -> None:
    base, ovl = (records(out / f"pp2-ep2-dualpipev{s}") for s in ("", "-overlap"))

    def mean(recs, key):
        tail = recs[1:] or recs
        return sum(r[key] for r in tail) / len(tail)

    rows.append({
        "case": "small, PP2 x EP2, dualpipev", "metric": "exposed all-to-all per step, s (lower is better)",
        "ours": mean(ovl, "a2a_exposed_comm_s"), "peer": mean(base, "a2a_exposed_comm_s"),
        "peer_name": "the same pairs run one after the other (no --pp-overlap)",
        "ratio": mean(base, "a2a_exposed_comm_s") / mean(ovl, "a2a_exposed_comm_s"),
        "goal": "> 1 on hardware where transfers and compute run side by side", "met": None, "note": OVERLAP_NOTE,
    })
    rows.append({
        "case": "small, PP2 x EP2, dualpipev", "metric": "step time, s (lower is better)",
        "ours": mean(ovl, "pp_step_s"), "peer": mean(base, "pp_step_s"),
        "peer_name": "no --pp-overlap", "ratio": mean(base, "pp_step_s") / mean(ovl, "pp_step_s"),
        "goal": "informational", "met": None,
        "losses_equal": [a["loss"] for a in ovl] == [b["loss"] for b in base],
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=8)
    args = p.parse_args()
    rows: list[dict] = []
    plots: list[str] = []
    with tempfile.TemporaryDirectory(prefix="latentmoe-pipeline-bench-") as tmp:
        out = Path(tmp)
        n = args.microbatches
        launch(2, args, out, [(2, 1, s, False, n) for s in SCHEDULES])
        pipeline_cases(out, 2, 2, rows, plots)
        launch(4, args, out, [(4, 1, s, False, n) for s in SCHEDULES])
        pipeline_cases(out, 4, 4, rows, plots)
        # EP 2 inside each stage: two pipelines, each gets half the batch
        launch(4, args, out, [(2, 2, "dualpipev", overlap, n // 2) for overlap in (False, True)])
        overlap_cases(out, rows)
    path = write_results("pipeline", rows)
    for row in rows:
        ratio = f"{row['ratio']:.3g}" if isinstance(row.get("ratio"), float) else row.get("ratio")
        print(f"{row['case']:45s} {row['metric'][:60]:60s} ours {row['ours']:.4g}  peer {row['peer']:.4g}  "
              f"ratio {ratio}")
    print(f"wrote {path} and {', '.join(plots)}")


if __name__ == "__main__":
    main()
