"""``latentmoe ep-report`` and the parallel options of ``train``: expert (``--ep``, ``--ep-dispatch``, ...) and
pipeline (``--pp``, ``--pp-schedule``, ``--microbatches``, ``--pp-layers``, ...)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latentmoe.cli.common import number, positive_int
from latentmoe.parallel.payload import COMBINE_CODECS, DISPATCH_CODECS

MAX_TIMEOUT_S = 7 * 24 * 3600
PLOT_FILE = "ep_traffic.png"


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert parallelism (launch with torchrun --nproc-per-node N -m latentmoe train ...)")
    g.add_argument("--ep", type=positive_int(), default=1,
                   help="expert-parallel size: ranks sharing one copy of the routed experts (default 1)")
    g.add_argument("--gpus-per-node", type=positive_int(), default=None,
                   help="ranks per node, for the intra/inter-node traffic split (default: all ranks on one node)")
    g.add_argument("--ep-dispatch", choices=DISPATCH_CODECS, default="fp32",
                   help="dispatch payload: fp32 (exact), bf16, or fp8 (E4M3, 1x128 scales; DeepSeek-V3)")
    g.add_argument("--ep-combine", choices=COMBINE_CODECS, default="fp32",
                   help="combine payload: fp32 (exact), bf16 (DeepSeek-V3), or logfmt (LogFMT-8, ISCA §3.2)")
    g.add_argument("--ep-overlap", action="store_true",
                   help="dual micro-batch overlap: one half's all-to-all runs while the other half computes")
    g.add_argument("--collective-timeout", type=number(0, MAX_TIMEOUT_S, low_open=True), default=300.0,
                   help="seconds a collective may wait for a peer before the run fails (default %(default)s)")
    add_pipeline_options(p)


PP_SCHEDULES = ("1f1b", "interleaved", "zb", "dualpipev")  # latentmoe.parallel.pp.schedules.SCHEDULE_NAMES


def layer_counts(text: str) -> tuple[int, ...]:
    """``--pp-layers 3,3``: decoder layers per virtual stage."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 3,3, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"layer counts must be >= 0, got {text!r}")
    return counts


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline parallelism (world = PP x EP x DP; launch with torchrun)")
    g.add_argument("--pp", type=positive_int(), default=1, help="pipeline stages over ranks (default 1)")
    g.add_argument("--pp-schedule", choices=PP_SCHEDULES, default="1f1b",
                   help="torch.distributed.pipelining schedule: 1f1b, interleaved (2 stages per rank), zb (ZB1P), "
                   "dualpipev (DeepSeek's DualPipe folded into a V, 2 stages per rank) (default %(default)s)")
    g.add_argument("--microbatches", type=positive_int(), default=None,
                   help="micro-batches per pipeline per step (default: the fewest that keep every stage busy)")
    g.add_argument("--pp-layers", type=layer_counts, default=None, metavar="N,N,...",
                   help="decoder layers per virtual stage (default: balanced by the planner's per-layer FLOPs)")
    g.add_argument("--pp-overlap", action="store_true",
                   help="dualpipev: run each paired forward/backward chunk overlapped (the forward's all-to-alls "
                   "in flight while the backward computes)")
    g.add_argument("--no-zero", action="store_true",
                   help="keep the full AdamW state on every rank (default with --pp: ZeRO-1 over each replica group)")


def parallel_config_from_args(args: argparse.Namespace):
    from latentmoe.parallel.pp.strategy import PipelineConfig
    from latentmoe.parallel.strategy import ParallelConfig

    pipeline = None
    if getattr(args, "pp", 1) > 1:
        pipeline = PipelineConfig(
            pp=args.pp,
            schedule=args.pp_schedule,
            microbatches=args.microbatches,
            layers=args.pp_layers,
            seq_len=getattr(args, "seq_len", PipelineConfig.seq_len),
            zero=not args.no_zero,
            overlap_f_b=args.pp_overlap,
        ).validate()
    return ParallelConfig(
        ep=args.ep,
        gpus_per_node=args.gpus_per_node,
        dispatch=args.ep_dispatch,
        combine=args.ep_combine,
        overlap=args.ep_overlap,
        timeout_s=args.collective_timeout,
        pipeline=pipeline,
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ep-report",
        help="expert-parallel traffic of a training run (table + PNG)",
        description="Summarise the a2a_* metrics of RUN_DIR/metrics.jsonl: bytes over intra- and inter-node "
        "links, the straggler rank, the DeepEP-style two-hop count, node-limited routing's bound; writes "
        "RUN_DIR/ep_traffic.png.",
    )
    p.add_argument("run_dir", help="a run directory trained with --ep")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentmoe.io import DestinationError, claim, read_ownership
    from latentmoe.parallel.report import ep_report, format_ep_report, plot_ep_traffic

    run_dir = Path(args.run_dir)
    report = ep_report(run_dir)
    if not args.no_plot:
        target = run_dir / PLOT_FILE
        owner = read_ownership(run_dir)
        if target.exists() and (owner is None or target.name not in owner.entries):
            raise DestinationError(f"{target}: exists and was not written by latentmoe; pass --no-plot")
        report.plot = str(plot_ep_traffic(report, target))
        if owner is not None:
            claim(run_dir, owner.kind, [target.name])
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_ep_report(report))
    return 0
