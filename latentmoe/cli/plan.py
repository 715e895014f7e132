"""``latentmoe plan``: parses flags, calls the planner's pure functions, prints tables or JSON. Torch-free.

``add_plan_subcommand(subparsers)`` registers ``plan`` on any argparse sub-parser set (the main
``latentmoe`` CLI uses it); ``python -m latentmoe.plan`` builds a parser of its own around it. Every parser
sets ``func`` (``args -> exit status``). Every numeric flag is checked when it is parsed (finite, in range);
what the planner rejects later raises :class:`~latentmoe.plan.errors.PlanError` with a one-line message; the
caller prints ``error: ...`` and exits with status 2.

    latentmoe plan [--model M ...] [--hardware NAME] [--nodes N] ... [--json] [--plot DIR]
    latentmoe plan decode-limit [--model M] [--hidden H] [--tokens T] [--fanout F] [--gbps G] ... [--json]
    latentmoe plan network [--radix K] [--planes P] [--json] [--plot DIR]
    latentmoe plan all-to-all [--nodes N] [--gpus-per-node G] [--radix K] [--fail-plane P] ... [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentmoe.cli.common import OneLineErrorParser, add_overwrite_option, number, positive_int
from latentmoe.io import BITS_PER_BYTE, BYTES_PER_MIB, GIGA, MS_PER_S
from latentmoe.plan.arch import ArchSpec, load_arch
from latentmoe.plan.arith import DTYPE_BYTES
from latentmoe.plan.decode import decode_limit, gbps_to_bytes_per_s
from latentmoe.plan.errors import PlanError
from latentmoe.plan.fabric import MULTI_PLANE, MULTI_RAIL, all_to_all, fat_tree_fabric, leaf, spine
from latentmoe.plan.hardware import DEFAULT_HARDWARE, Cluster, Hardware, load_hardware
from latentmoe.plan.memory import NO_MASTER, RECOMPUTE_MODES, ZERO_STAGES, ParallelLayout, Precision
from latentmoe.plan.network import UnitPrices, paper_unit_prices, topologies, topology_cost
from latentmoe.plan.paper import (
    BF16_BYTES,
    FP8_BYTES,
    ISCA_DECODE_FANOUT,
    ISCA_DECODE_HIDDEN,
    ISCA_DECODE_LAYERS,
    ISCA_DECODE_TOKENS_PER_DEVICE,
    ISCA_MPFT_PLANES,
    ISCA_TABLE3_RADIX,
)
from latentmoe.plan.report import (
    decode_json,
    format_all_to_all,
    format_decode,
    format_model_table,
    format_network_table,
    model_json,
    model_report,
    topology_json,
    write_plots,
)

# The paper's Table 1 / Table 2 models, compared when no --model is given.
PAPER_MODELS = ("deepseek-v3", "qwen2.5-72b", "llama-3.1-405b")
# DeepSeek-V3's training layout (TR §3.2, ISCA §4.2): 2,048 H800 in 256 nodes, PP16, EP64, ZeRO-1, no TP.
PAPER_NODES = 256
PAPER_PP = 16
PAPER_EP = 64
PAPER_SEQ_LEN = 4096
# all-to-all demo: small enough for the flow simulator to finish in well under a second.
A2A_NODES = 8
A2A_GPUS_PER_NODE = 4
A2A_RADIX = 8
A2A_MIB_PER_PAIR = 1
DEFAULT_FAIL_PLANE = 0
DEFAULT_FAIL_LINK = "0:0:0"
MAX_COUNT = 2**31 - 1  # nodes, GPUs, layers, tokens: anything larger is a typo
MAX_GBPS = 1e9
MAX_GB = 1e9
MAX_USD = 1e12
MAX_ELEMENT_BYTES = 64
MAX_MIB = 2**30


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _add_hardware_flags(parser: argparse.ArgumentParser, *, cluster: bool = True) -> None:
    g = parser.add_argument_group("hardware (a preset, any field overridable)")
    g.add_argument("--hardware", default=DEFAULT_HARDWARE, help=f"preset name (default {DEFAULT_HARDWARE})")
    g.add_argument("--memory-gb", type=number(0, MAX_GB, low_open=True), help="override device memory, GB (1e9 bytes)")
    g.add_argument(
        "--scale-up-gbps",
        type=number(0, MAX_GBPS, low_open=True),
        help="override NVLink bandwidth per GPU per direction, Gbit/s (900 GB/s = 7200)",
    )
    g.add_argument(
        "--scale-out-gbps",
        type=number(0, MAX_GBPS, low_open=True),
        help="override NIC bandwidth per GPU, Gbit/s (e.g. 400)",
    )
    g.add_argument("--gpus-per-node", type=positive_int(MAX_COUNT), help="override GPUs per node")
    if cluster:
        g.add_argument(
            "--nodes",
            type=positive_int(MAX_COUNT),
            default=PAPER_NODES,
            help=f"nodes in the cluster (default {PAPER_NODES}: the paper's 2,048 GPUs)",
        )


def _hardware(args: argparse.Namespace) -> Hardware:
    scale_up = None if args.scale_up_gbps is None else args.scale_up_gbps / BITS_PER_BYTE  # -> GB/s
    return load_hardware(
        args.hardware,
        memory_gb=args.memory_gb,
        scale_up_gbytes_per_s=scale_up,
        scale_out_gbps=args.scale_out_gbps,
        gpus_per_node=args.gpus_per_node,
    )


def _cluster(args: argparse.Namespace) -> Cluster:
    return Cluster(_hardware(args), args.nodes)


# ---------------------------------------------------------------------------------------------- report
def _expert_parallel(arch: ArchSpec, ep: int | None, dp_tp: int) -> int:
    """``--ep`` if given (MoE models only), else gcd(the paper's 64, routed experts, DP x TP)."""
    moe = arch.moe_ffn
    if moe is None:
        return 1
    return math.gcd(PAPER_EP, moe.n_routed_experts, dp_tp) if ep is None else ep


def default_pp(arch: ArchSpec) -> int:
    """The paper's 16 pipeline stages, or fewer for a model with fewer layers (a power of two, so it divides the
    cluster's GPUs as the paper's does)."""
    return min(PAPER_PP, 2 ** int(math.log2(max(1, arch.num_layers))))


def run_report(args: argparse.Namespace) -> int:
    """``latentmoe plan``: the side-by-side model table, JSON or plots."""
    cluster = _cluster(args)
    archs = [load_arch(m) for m in (args.model or PAPER_MODELS)]
    tp = args.tp
    precision = Precision(
        weight=args.weight_dtype, grad=args.grad_dtype, master=args.master_dtype, moment=args.moment_dtype
    )
    serve_gpus = args.serve_gpus or cluster.hardware.gpus_per_node
    reports = []
    for arch in archs:
        pp = args.pp or default_pp(arch)
        if args.dp is None:
            if cluster.gpus % (tp * pp):
                raise PlanError(f"{cluster.gpus} GPUs are not divisible by tp x pp = {tp * pp}")
            dp = cluster.gpus // (tp * pp)
        else:
            dp = args.dp
        layout = ParallelLayout(dp=dp, tp=tp, pp=pp, ep=_expert_parallel(arch, args.ep, dp * tp), zero_stage=args.zero)
        reports.append(
            model_report(
                arch,
                cluster=cluster,
                layout=layout,
                precision=precision,
                seq_len=args.seq_len,
                micro_batch=args.micro_batch,
                recompute=args.recompute,
                kv_dtype=args.kv_dtype,
                causal=not args.non_causal,
                serve_gpus=serve_gpus,
                serve_weight_dtype=args.serve_weight_dtype,
                decode_tokens=args.tokens_per_device,
                mtp_acceptance=args.mtp_acceptance,
            )
        )
    if args.json:
        _print_json([model_json(r, baseline=reports[0]) for r in reports])
    else:
        print(format_model_table(reports, cluster=cluster))
    if args.plot:
        costs = [topology_cost(t, paper_unit_prices()) for t in topologies(ISCA_TABLE3_RADIX)]
        paths = write_plots(Path(args.plot), reports=reports, costs=costs, overwrite=args.overwrite)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr if args.json else sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------- decode
def run_decode_limit(args: argparse.Namespace) -> int:
    """``latentmoe plan decode-limit``: ISCA §2.3.2's communication bound on decoding."""
    arch = load_arch(args.model) if args.model else None
    if arch is not None and not arch.is_moe:
        raise PlanError(f"model {arch.name!r} is dense: it has no expert-parallel all-to-all to bound decoding")
    hidden = args.hidden or (arch.hidden_size if arch else ISCA_DECODE_HIDDEN)
    fanout = args.fanout or (arch.fanout if arch else ISCA_DECODE_FANOUT)
    layers = args.layers or (arch.num_layers if arch else ISCA_DECODE_LAYERS)
    if args.gbps is not None:
        bw = gbps_to_bytes_per_s(args.gbps)
    elif args.gbytes_per_s is not None:
        bw = args.gbytes_per_s * GIGA
    else:
        hw = _hardware(args)
        bw = hw.scale_up_bytes_per_s if args.over == "scale-up" else hw.scale_out_bytes_per_s
    limit = decode_limit(
        hidden=hidden,
        tokens=args.tokens,
        fanout=fanout,
        bw=bw,
        layers=layers,
        dispatch_bytes=args.dispatch_bytes,
        combine_bytes=args.combine_bytes,
        micro_batches=args.micro_batches,
        mtp_acceptance=args.mtp_acceptance,
    )
    if args.json:
        _print_json(decode_json(limit))
    else:
        print(format_decode(limit))
    return 0


# ---------------------------------------------------------------------------------------------- network
def _prices(args: argparse.Namespace) -> UnitPrices:
    paper = paper_unit_prices()
    if args.switch_usd is None and args.link_usd is None:
        return paper
    switch = paper.switch_usd if args.switch_usd is None else args.switch_usd
    link = paper.link_usd if args.link_usd is None else args.link_usd
    return UnitPrices(switch, link, "given on the command line")


def run_network(args: argparse.Namespace) -> int:
    """``latentmoe plan network``: ISCA Table 3 for any switch radix."""
    prices = _prices(args)
    costs = [
        topology_cost(t, prices)
        for t in topologies(args.radix, planes=args.planes, dragonfly_groups=args.dragonfly_groups)
    ]
    if args.json:
        _print_json([topology_json(c) for c in costs])
    else:
        note = f"switches x ${prices.switch_usd:,.0f} + links x ${prices.link_usd:,.2f} ({prices.source})"
        print(format_network_table(costs, prices_note=note))
    if args.plot:
        paths = write_plots(Path(args.plot), costs=costs, overwrite=args.overwrite)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr if args.json else sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------- all-to-all
def _parse_link(text: str) -> tuple[int, int, int]:
    try:
        plane, leaf_index, spine_index = (int(x) for x in text.split(":"))
    except ValueError:
        raise PlanError(f"--fail-link must look like PLANE:LEAF:SPINE (integers), got {text!r}") from None
    return plane, leaf_index, spine_index


def run_all_to_all(args: argparse.Namespace) -> int:
    """``latentmoe plan all-to-all``: multi-rail vs multi-plane fat-tree, healthy and with failures."""
    hw = _hardware(args)
    gpus_per_node = args.gpus_per_node or A2A_GPUS_PER_NODE
    common = dict(
        nodes=args.nodes,
        gpus_per_node=gpus_per_node,
        radix=args.radix,
        nic_bytes_per_s=hw.scale_out_bytes_per_s,
        nvlink_bytes_per_s=hw.scale_up_bytes_per_s,
    )
    size = args.mib_per_pair * BYTES_PER_MIB
    fail_plane = DEFAULT_FAIL_PLANE if args.fail_plane is None else args.fail_plane
    scenarios = [
        ("MRFT, PXN", MULTI_RAIL, True, {}),
        ("MRFT, direct (cross rails at spines)", MULTI_RAIL, False, {}),
        ("MPFT", MULTI_PLANE, True, {}),
        (f"MPFT, plane {fail_plane} down", MULTI_PLANE, True, {"failed_planes": [fail_plane]}),
    ]
    # The default link failure needs leaf-spine links; a fabric small enough for one leaf per plane has none.
    healthy = fat_tree_fabric(MULTI_PLANE, **common)
    has_spines = any(u == spine(0, 0) or v == spine(0, 0) for u, v in healthy.capacity)
    if args.fail_link is not None or has_spines:
        fail_link = DEFAULT_FAIL_LINK if args.fail_link is None else args.fail_link
        plane, leaf_i, spine_i = _parse_link(fail_link)
        cut = (leaf(plane, leaf_i), spine(plane, spine_i))
        scenarios.append((f"MPFT, link {fail_link} down", MULTI_PLANE, True, {"failed_links": [cut]}))
    results = [
        all_to_all(fat_tree_fabric(kind, **common, **extra), bytes_per_pair=size, pxn=pxn)
        for _, kind, pxn, extra in scenarios
    ]
    labels = [s[0] for s in scenarios]
    if args.json:
        _print_json(
            [
                {
                    "scenario": label,
                    **dataclasses.asdict(r),
                    "time_ms": r.time_s * MS_PER_S,
                    "algo_bandwidth_gbytes_per_s": r.algo_bandwidth_bytes_per_s / GIGA,
                }
                for label, r in zip(labels, results)
            ]
        )
    else:
        print(format_all_to_all(results, labels))
    return 0


# ---------------------------------------------------------------------------------------------- parsers
def add_plan_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan`` (with ``decode-limit``, ``network`` and ``all-to-all``) on ``subparsers``."""
    plan = subparsers.add_parser(
        "plan",
        help="co-design planner: params, KV cache, FLOPs, memory, decode limit, network cost",
        description="Compare models side by side as ISCA Tables 1-2 do (default), or run a sub-analysis.",
    )
    plan.add_argument(
        "--model",
        action="append",
        help="preset name or config.json path; repeat to compare (default: the paper's three)",
    )
    _add_hardware_flags(plan)
    lay = plan.add_argument_group("training layout")
    lay.add_argument("--dp", type=positive_int(MAX_COUNT), help="data-parallel degree (default: GPUs / (tp x pp))")
    lay.add_argument("--tp", type=positive_int(MAX_COUNT), default=1, help="tensor-parallel degree (default 1)")
    lay.add_argument(
        "--pp",
        type=positive_int(MAX_COUNT),
        default=None,
        help=f"pipeline stages (default: {PAPER_PP} as the paper, at most the model's layers, a power of 2)",
    )
    lay.add_argument(
        "--ep",
        type=positive_int(MAX_COUNT),
        help=f"expert-parallel degree (default: gcd({PAPER_EP}, routed experts, dp x tp))",
    )
    lay.add_argument(
        "--zero",
        type=number(0, max(ZERO_STAGES), integer=True),
        default=1,
        choices=ZERO_STAGES,
        help="ZeRO stage (default 1)",
    )
    lay.add_argument("--seq-len", type=positive_int(MAX_COUNT), default=PAPER_SEQ_LEN, help="training sequence length")
    lay.add_argument("--micro-batch", type=positive_int(MAX_COUNT), default=1, help="sequences per micro-batch")
    lay.add_argument("--recompute", default="none", choices=RECOMPUTE_MODES)
    lay.add_argument("--non-causal", action="store_true", help="count the full attention matrix in FLOPs")
    dtypes = sorted(DTYPE_BYTES)
    lay.add_argument("--weight-dtype", default="bf16", choices=dtypes)
    lay.add_argument("--grad-dtype", default="fp32", choices=dtypes)
    lay.add_argument("--master-dtype", default="fp32", choices=[*dtypes, NO_MASTER])
    lay.add_argument("--moment-dtype", default="bf16", choices=dtypes)
    inf = plan.add_argument_group("inference")
    inf.add_argument("--kv-dtype", default="bf16", choices=dtypes, help="KV-cache element type")
    inf.add_argument(
        "--serve-gpus", type=positive_int(MAX_COUNT), help="GPUs holding one copy of the weights (default: one node)"
    )
    inf.add_argument("--serve-weight-dtype", default="bf16", choices=dtypes)
    inf.add_argument(
        "--tokens-per-device",
        type=positive_int(MAX_COUNT),
        default=ISCA_DECODE_TOKENS_PER_DEVICE,
        help="decode batch per device for the EP limit",
    )
    inf.add_argument("--mtp-acceptance", type=number(0, 1), help="MTP draft acceptance rate, e.g. 0.85")
    plan.add_argument("--json", action="store_true", help="print a JSON list with one object per model")
    plan.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")
    add_overwrite_option(plan, "--plot DIR")
    plan.set_defaults(func=run_report)

    sub = plan.add_subparsers(dest="plan_command", metavar="{decode-limit,network,all-to-all}")

    dec = sub.add_parser(
        "decode-limit",
        help="EP communication bound on decoding (ISCA §2.3.2)",
        description="Defaults are the paper's case: hidden 7000, 32 tokens, fan-out 9, 61 layers, "
        "FP8 dispatch + BF16 combine over the H800's 400 Gbps NIC.",
    )
    dec.add_argument("--model", help="take hidden, fan-out and layers from this model")
    dec.add_argument(
        "--hidden", type=positive_int(MAX_COUNT), help=f"hidden size (default {ISCA_DECODE_HIDDEN}, the paper's '7K')"
    )
    dec.add_argument(
        "--tokens", type=positive_int(MAX_COUNT), default=ISCA_DECODE_TOKENS_PER_DEVICE, help="tokens per device"
    )
    dec.add_argument(
        "--fanout", type=positive_int(MAX_COUNT), help=f"experts per token incl. shared (default {ISCA_DECODE_FANOUT})"
    )
    dec.add_argument("--layers", type=positive_int(MAX_COUNT), help=f"layers (default {ISCA_DECODE_LAYERS})")
    dec.add_argument(
        "--dispatch-bytes",
        type=number(0, MAX_ELEMENT_BYTES, low_open=True),
        default=FP8_BYTES,
        help="bytes per element dispatched",
    )
    dec.add_argument(
        "--combine-bytes",
        type=number(0, MAX_ELEMENT_BYTES, low_open=True),
        default=BF16_BYTES,
        help="bytes per element combined",
    )
    dec.add_argument(
        "--micro-batches", type=positive_int(MAX_COUNT), default=2, help="overlapped micro-batches per layer"
    )
    dec.add_argument("--mtp-acceptance", type=number(0, 1), help="MTP draft acceptance rate, e.g. 0.85")
    bw = dec.add_mutually_exclusive_group()
    bw.add_argument("--gbps", type=number(0, MAX_GBPS, low_open=True), help="bandwidth in Gbit/s (400 = 50 GB/s)")
    bw.add_argument(
        "--gbytes-per-s", type=number(0, MAX_GBPS, low_open=True), help="bandwidth in GB/s (e.g. 900 for NVL72)"
    )
    dec.add_argument(
        "--over",
        choices=("scale-out", "scale-up"),
        default="scale-out",
        help="which link of --hardware carries the all-to-all",
    )
    _add_hardware_flags(dec, cluster=False)
    dec.add_argument("--json", action="store_true")
    dec.set_defaults(func=run_decode_limit)

    net = sub.add_parser("network", help="topology sizes and cost (ISCA Table 3)")
    net.add_argument(
        "--radix", type=number(2, MAX_COUNT, integer=True), default=ISCA_TABLE3_RADIX, help="switch ports (default 64)"
    )
    net.add_argument(
        "--planes", type=positive_int(MAX_COUNT), default=ISCA_MPFT_PLANES, help="planes of the MPFT (default 8)"
    )
    net.add_argument(
        "--dragonfly-groups", type=positive_int(MAX_COUNT), help="dragonfly groups (default: the maximum, a*h+1)"
    )
    net.add_argument(
        "--switch-usd", type=number(0, MAX_USD), help="price of a switch (default: implied by ISCA Table 3)"
    )
    net.add_argument("--link-usd", type=number(0, MAX_USD), help="price of a link (default: implied by ISCA Table 3)")
    net.add_argument("--json", action="store_true", help="print one JSON object per topology")
    net.add_argument("--plot", metavar="DIR", help="write the cost-per-endpoint chart into DIR")
    add_overwrite_option(net, "--plot DIR")
    net.set_defaults(func=run_network)

    a2a = sub.add_parser("all-to-all", help="flow simulation: multi-rail vs multi-plane fat-tree, failures")
    a2a.add_argument("--nodes", type=positive_int(MAX_COUNT), default=A2A_NODES, help=f"nodes (default {A2A_NODES})")
    a2a.set_defaults(gpus_per_node=A2A_GPUS_PER_NODE)
    a2a.add_argument(
        "--radix",
        type=number(2, MAX_COUNT, integer=True),
        default=A2A_RADIX,
        help=f"switch ports (default {A2A_RADIX})",
    )
    a2a.add_argument(
        "--mib-per-pair",
        type=number(0, MAX_MIB, low_open=True),
        default=A2A_MIB_PER_PAIR,
        help="MiB each GPU sends each GPU",
    )
    a2a.add_argument(
        "--fail-plane",
        type=number(0, MAX_COUNT, integer=True),
        default=None,
        help="plane to take down (default: the failure scenarios use plane 0)",
    )
    a2a.add_argument(
        "--fail-link",
        default=None,
        help="leaf-spine link to cut, PLANE:LEAF:SPINE (default: the failure scenarios cut 0:0:0)",
    )
    _add_hardware_flags(a2a, cluster=False)
    a2a.add_argument("--json", action="store_true")
    a2a.set_defaults(func=run_all_to_all)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser whose only command is ``plan`` (for ``python -m latentmoe.plan``)."""
    parser = OneLineErrorParser(prog="latentmoe", description="latentmoe co-design planner")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    add_plan_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``plan ...``; ``argv`` may start with or without the word ``plan``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plan":
        argv = ["plan", *argv]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (already reported on one line)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except ValueError as exc:  # PlanError is a ValueError; so is ModelConfig's ConfigError
        print(f"error: {exc}", file=sys.stderr)
        return 2
