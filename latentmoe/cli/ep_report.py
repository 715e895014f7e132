"""``latentmoe ep-report`` and the expert-parallel options of ``train`` (``--ep``, ``--ep-dispatch``, ...)."""

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


def parallel_config_from_args(args: argparse.Namespace):
    from latentmoe.parallel.strategy import ParallelConfig

    return ParallelConfig(
        ep=args.ep,
        gpus_per_node=args.gpus_per_node,
        dispatch=args.ep_dispatch,
        combine=args.ep_combine,
        overlap=args.ep_overlap,
        timeout_s=args.collective_timeout,
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
