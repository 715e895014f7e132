"""Turn the planner's numbers into a side-by-side table, JSON objects and PNG charts.

:func:`model_report` gathers everything the planner knows about one model on one cluster into a
:class:`ModelReport`; :func:`format_model_table` lays several side by side (ISCA Tables 1 and 2 layout, the
paper's figures beside ours); :func:`model_json` gives the JSON object. Plots use matplotlib's object API
(``Figure`` + Agg canvas, no pyplot state) and import matplotlib only when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latentmoe.io import BYTES_PER_MIB, GIGA, MS_PER_S, DestinationError, check_destination, claim, save_figure
from latentmoe.plan.arch import ArchSpec
from latentmoe.plan.arith import (
    FLOPS_RULE,
    ParamCount,
    TrainFlops,
    kv_bytes_per_token,
    kv_cache_kb,
    materialised_kv_bytes_per_token,
    param_count,
    train_flops_per_token,
)
from latentmoe.plan.decode import DecodeLimit, decode_limit, decode_limit_for_arch
from latentmoe.plan.errors import PlanError
from latentmoe.plan.hardware import Cluster
from latentmoe.plan.memory import (
    ParallelLayout,
    Precision,
    ServingCapacity,
    StageMemory,
    max_micro_batch,
    memory_per_device,
    serving_capacity,
)
from latentmoe.plan.network import TopologyCost
from latentmoe.plan.paper import (
    ISCA_DECODE_CASES,
    ISCA_DECODE_TOKENS_PER_DEVICE,
    ISCA_TABLE1_KV_KB,
    ISCA_TABLE1_MULTIPLIER,
    ISCA_TABLE2_GFLOPS,
    ISCA_TABLE5_LATENCY,
    ISCA_TABLE5_SOURCE,
    DecodeCase,
)

KUSD = 1e3
MUSD = 1e6
KV_RATIO_DIGITS = 2  # ISCA Table 1 prints ratios to two decimals
PLOT_DPI = 120
# TPOT-vs-bandwidth chart: from a quarter of one 400G NIC to twice NVL72's per-GPU NVLink, in GB/s.
TPOT_PLOT_GBYTES_PER_S = (12.5, 25, 50, 100, 200, 400, 900, 1800)


@dataclass(frozen=True)
class ModelReport:
    """Everything the planner computes for one model on one cluster and layout."""

    arch: ArchSpec
    params: ParamCount
    kv_dtype: str
    kv_bytes: int
    materialised_kv_bytes: int
    flops: TrainFlops
    layout: ParallelLayout
    precision: Precision
    seq_len: int
    micro_batch: int
    recompute: str
    memory: StageMemory
    device_memory_bytes: float
    max_micro_batch: int
    serving: ServingCapacity
    serve_weight_dtype: str
    decode: DecodeLimit | None

    @property
    def fits(self) -> bool:
        return self.memory.total_bytes <= self.device_memory_bytes


def model_report(
    arch: ArchSpec,
    *,
    cluster: Cluster,
    layout: ParallelLayout,
    precision: Precision,
    seq_len: int,
    micro_batch: int,
    recompute: str,
    kv_dtype: str,
    causal: bool = True,
    serve_gpus: int,
    serve_weight_dtype: str,
    decode_tokens: int,
    mtp_acceptance: float | None,
) -> ModelReport:
    """Compute every figure of the model report (see docs/planner.md for each formula)."""
    hw = cluster.hardware
    effective = layout if arch.is_moe else dataclasses.replace(layout, ep=1)
    memory = memory_per_device(
        arch, effective, precision, seq_len=seq_len, micro_batch=micro_batch, recompute=recompute
    )
    decode = None
    if arch.is_moe:
        decode = decode_limit_for_arch(
            arch, bw=hw.scale_out_bytes_per_s, tokens=decode_tokens, mtp_acceptance=mtp_acceptance
        )
    return ModelReport(
        arch=arch,
        params=param_count(arch),
        kv_dtype=kv_dtype,
        kv_bytes=kv_bytes_per_token(arch, kv_dtype),
        materialised_kv_bytes=materialised_kv_bytes_per_token(arch, kv_dtype),
        flops=train_flops_per_token(arch, seq_len=seq_len, causal=causal),
        layout=effective,
        precision=precision,
        seq_len=seq_len,
        micro_batch=micro_batch,
        recompute=recompute,
        memory=memory,
        device_memory_bytes=hw.memory_bytes,
        max_micro_batch=max_micro_batch(
            arch,
            effective,
            precision,
            seq_len=seq_len,
            recompute=recompute,
            device_memory_bytes=hw.memory_bytes,
        ),
        serving=serving_capacity(
            arch,
            devices=serve_gpus,
            device_memory_bytes=hw.memory_bytes,
            weight_dtype=serve_weight_dtype,
            kv_dtype=kv_dtype,
        ),
        serve_weight_dtype=serve_weight_dtype,
        decode=decode,
    )


# ---------------------------------------------------------------------------------------------- JSON
def _quoted(table: Any, name: str) -> float | None:
    row = table.get(name)
    return None if row is None else row.value


def model_json(report: ModelReport, *, baseline: ModelReport) -> dict[str, Any]:
    """One JSON object per model; exact integers for counts, the paper's figures under ``paper``."""
    p, a = report.params, report.arch
    mem = report.memory
    return {
        "name": a.name,
        "architecture": a.label,
        "attention": a.attention_label,
        "total_params": p.total,
        "active_params": p.active,
        "embedding_params": p.embedding,
        "head_params": p.head,
        "mtp_params": p.mtp,
        "mtp_active_params": p.mtp_active,
        "params_note": "total and active include embedding and head, exclude MTP (reported as mtp_params)",
        "active_matmul_params": p.active_matmul,
        "kv_cache_dtype": report.kv_dtype,
        "kv_cache_bytes_per_token": report.kv_bytes,
        "kv_cache_kb_per_token": kv_cache_kb(report.kv_bytes),
        "kv_cache_ratio": report.kv_bytes / baseline.kv_bytes,
        "kv_cache_ratio_baseline": baseline.arch.name,
        "materialised_kv_cache_bytes_per_token": report.materialised_kv_bytes,
        "train_gflops_per_token": report.flops.gflop_per_token,
        "train_flops_seq_len": report.flops.seq_len,
        "train_flops_causal": report.flops.causal,
        "train_flops_rule": FLOPS_RULE,
        "memory_per_device": {
            "layout": asdict(report.layout),
            "precision": asdict(report.precision),
            "seq_len": report.seq_len,
            "micro_batch": report.micro_batch,
            "recompute": report.recompute,
            "busiest_stage": mem.stage,
            "layers_on_stage": mem.layers,
            "params_on_device": mem.params,
            "weights_bytes": mem.weights_bytes,
            "grads_bytes": mem.grads_bytes,
            "master_bytes": mem.master_bytes,
            "optimizer_bytes": mem.optimizer_bytes,
            "activations_bytes": mem.activations_bytes,
            "micro_batches_in_flight": mem.micro_batches_in_flight,
            "total_bytes": mem.total_bytes,
            "device_memory_bytes": report.device_memory_bytes,
            "fits": report.fits,
            "max_micro_batch": report.max_micro_batch,
        },
        "serving": {
            "devices": report.serving.devices,
            "weight_dtype": report.serve_weight_dtype,
            "weights_bytes_per_device": report.serving.weights_bytes_per_device,
            "fits": report.serving.fits,
            "max_kv_tokens": report.serving.max_kv_tokens,
        },
        "decode": None if report.decode is None else decode_json(report.decode),
        "paper": {
            "kv_cache_kb_per_token": _quoted(ISCA_TABLE1_KV_KB, a.name),
            "kv_cache_ratio": _quoted(ISCA_TABLE1_MULTIPLIER, a.name),
            "train_gflops_per_token": _quoted(ISCA_TABLE2_GFLOPS, a.name),
        },
    }


def decode_json(limit: DecodeLimit) -> dict[str, Any]:
    """The decode-limit object: ``comm_us_per_step``, ``tpot_ms``, ``tokens_per_s`` and the inputs."""
    out = asdict(limit)
    case = paper_decode_case(limit)
    out["paper"] = (
        None
        if case is None
        else {
            "case": case.name,
            "comm_us_per_step": case.quoted_comm_us,
            "tpot_ms": case.quoted_tpot_ms,
            "tokens_per_s": case.quoted_tokens_per_s,
        }
    )
    return out


def paper_decode_case(limit: DecodeLimit) -> DecodeCase | None:
    """The ISCA §2.3.2 case these inputs reproduce, if any."""
    for case in ISCA_DECODE_CASES:
        same = (
            case.hidden,
            case.tokens,
            case.fanout,
            case.dispatch_bytes,
            case.combine_bytes,
            case.layers,
        ) == (
            limit.hidden,
            limit.tokens,
            limit.fanout,
            limit.dispatch_bytes,
            limit.combine_bytes,
            limit.layers,
        )
        if same and case.bw_bytes_per_s == limit.bw_bytes_per_s and limit.micro_batches == 2:
            return case
    return None


def topology_json(cost: TopologyCost) -> dict[str, Any]:
    """One row of the network table; ``cost_per_endpoint`` is in k$ like ISCA Table 3."""
    t, q = cost.topology, cost.quoted
    return {
        "name": t.name,
        "description": t.description,
        "radix": t.radix,
        "endpoints": t.endpoints,
        "switches": t.switches,
        "links": t.links,
        "cost_usd": cost.cost_usd,
        "cost_per_endpoint": cost.cost_per_endpoint_usd / KUSD,
        "cost_per_endpoint_unit": "k$",
        "paper": None if q is None else asdict(q),
    }


# ---------------------------------------------------------------------------------------------- text
def _b(n: int) -> str:
    return f"{n / GIGA:,.2f}B"


def _gb(n: float) -> str:
    return f"{n / GIGA:,.1f} GB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def format_model_table(reports: Sequence[ModelReport], *, cluster: Cluster) -> str:
    """The terminal table: models side by side, our numbers with the paper's beside them."""
    base = reports[0]
    hw = cluster.hardware
    r0 = reports[0]
    lay = r0.layout
    rows: list[list[str]] = []
    decode_tokens = next((r.decode.tokens for r in reports if r.decode), ISCA_DECODE_TOKENS_PER_DEVICE)

    def row(label: str, fn) -> None:
        rows.append([label, *[fn(r) for r in reports]])

    def paper(table: Any, fmt: str):
        return lambda r: "-" if r.arch.name not in table else fmt.format(table[r.arch.name].value)

    row("architecture", lambda r: r.arch.label)
    row("total params (emb+head, no MTP)", lambda r: f"{r.params.total:,}")
    row("  in billions", lambda r: _b(r.params.total))
    row("activated params / token", lambda r: _b(r.params.active))
    row("  embedding + head", lambda r: f"{_b(r.params.embedding)} + {_b(r.params.head)}")
    row("  MTP modules (not in total)", lambda r: f"{_b(r.params.mtp)}" if r.params.mtp else "-")
    row(f"KV cache / token ({base.kv_dtype})", lambda r: f"{kv_cache_kb(r.kv_bytes):,.3f} KB")
    row(f"  ratio to {base.arch.name}", lambda r: f"{r.kv_bytes / base.kv_bytes:.{KV_RATIO_DIGITS}f}x")
    row("  paper, ISCA Table 1", paper(ISCA_TABLE1_KV_KB, "{:.3f} KB"))
    row("  paper ratio", paper(ISCA_TABLE1_MULTIPLIER, "{:.2f}x"))
    row("  per-head (materialised) cache", lambda r: f"{kv_cache_kb(r.materialised_kv_bytes):,.3f} KB")
    causal = "causal" if r0.flops.causal else "non-causal"
    row(f"train GFLOP/token (S={r0.flops.seq_len}, {causal})", lambda r: f"{r.flops.gflop_per_token:,.1f}")
    row("  paper, ISCA Table 2", paper(ISCA_TABLE2_GFLOPS, "{:g}"))
    row("training layout", lambda r: f"DP{r.layout.dp} TP{r.layout.tp} PP{r.layout.pp} EP{r.layout.ep}")
    row(
        f"memory / GPU, busiest stage (recompute: {r0.recompute})",
        lambda r: f"{_gb(r.memory.total_bytes)} (stage {r.memory.stage})",
    )
    row("  weights + grads + optimizer", lambda r: _gb(r.memory.static_bytes))
    row(
        f"  activations (micro-batch {r0.micro_batch} x S={r0.seq_len})",
        lambda r: f"{_gb(r.memory.activations_bytes)} ({r.memory.micro_batches_in_flight} in flight)",
    )
    row(f"  fits {hw.memory_gb:g} GB?", lambda r: "yes" if r.fits else "no")
    row(
        f"  largest micro-batch at S={r0.seq_len}",
        lambda r: str(r.max_micro_batch) if r.max_micro_batch else "0 (does not fit)",
    )
    row(
        f"serving on {r0.serving.devices} GPUs ({r0.serve_weight_dtype} weights)",
        lambda r: f"{r.serving.max_kv_tokens:,} KV tokens" if r.serving.fits else "weights do not fit",
    )
    row(
        f"decode limit @ {hw.scale_out_gbps:g} Gbps, {decode_tokens} tok/GPU",
        lambda r: (
            "dense: no EP"
            if r.decode is None
            else f"{r.decode.tpot_ms:.2f} ms, {r.decode.tokens_per_s:.1f} tok/s"
        ),
    )
    header = ["", *[r.arch.name for r in reports]]
    title = (
        f"Model plan on {hw.name} ({hw.memory_gb:g} GB, NVLink {hw.scale_up_gbytes_per_s:g} GB/s, "
        f"NIC {hw.scale_out_gbps:g} Gbps), {cluster.nodes} nodes x {hw.gpus_per_node} = {cluster.gpus} GPUs\n"
        f"training: ZeRO-{lay.zero_stage}, weights {r0.precision.weight}, grads {r0.precision.grad}, "
        f"master {r0.precision.master}, moments {r0.precision.moment}"
    )
    notes = [
        "FLOPs rule: " + FLOPS_RULE,
        "KB = 1000 bytes (the paper's unit). The paper's 7.28x for Llama does not follow from its own bytes "
        "(7.34x); its dense FLOPs rows (394, 2448) are not reproducible (docs/planner.md).",
    ]
    return "\n".join([title, "", _table(rows, header), "", *notes])


def format_decode(limit: DecodeLimit) -> str:
    """Text form of one decode limit, with the paper's figures when the inputs are a paper case."""
    case = paper_decode_case(limit)

    def quoted(value: float, unit: str) -> str:
        return f"   (paper: {value:g} {unit})" if case else ""

    lines = [
        f"EP decode speed limit (ISCA §2.3.2): hidden {limit.hidden}, {limit.tokens} tokens/device, "
        f"fan-out {limit.fanout}, dispatch {limit.dispatch_bytes:g} B + combine {limit.combine_bytes:g} B "
        f"per element, {limit.bw_bytes_per_s / GIGA:g} GB/s, {limit.layers} layers, "
        f"{limit.micro_batches} micro-batches",
        f"  bytes per EP step   {limit.step_bytes:,.0f}",
        f"  comm per EP step    {limit.comm_us_per_step:.10g} us"
        + (quoted(case.quoted_comm_us, "us") if case else ""),
        f"  time per layer      {limit.layer_us:.10g} us",
        f"  TPOT                {limit.tpot_ms:.10g} ms"
        + (quoted(case.quoted_tpot_ms, "ms") if case else ""),
        f"  tokens/s            {limit.tokens_per_s:.2f}"
        + (quoted(case.quoted_tokens_per_s, "tokens/s") if case else ""),
    ]
    if limit.mtp_acceptance is not None:
        lines.append(
            f"  with MTP (accept {limit.mtp_acceptance:g})  {limit.effective_tokens_per_s:.2f} tokens/s "
            f"(x{1 + limit.mtp_acceptance:g}; verification cost ignored)"
        )
    return "\n".join(lines)


def format_network_table(costs: Sequence[TopologyCost], *, prices_note: str) -> str:
    """Topology rows (ours) with ISCA Table 3's row beside each, then the cited latencies."""
    rows = []
    for c in costs:
        t, q = c.topology, c.quoted
        paper = (
            "-"
            if q is None
            else (
                f"{q.endpoints:,} / {q.switches:,} / {q.links:,} / "
                f"{q.cost_musd:g} / {q.cost_per_endpoint_kusd:g}"
            )
        )
        rows.append(
            [
                t.name,
                f"{t.endpoints:,}",
                f"{t.switches:,}",
                f"{t.links:,}",
                f"{c.cost_usd / MUSD:,.1f}",
                f"{c.cost_per_endpoint_usd / KUSD:.2f}",
                paper,
                t.description,
            ]
        )
    header = [
        "topology",
        "endpoints",
        "switches",
        "links",
        "cost M$",
        "k$/endpoint",
        "paper: endpoints / switches / links / M$ / k$",
        "shape",
    ]
    latency = [
        [x.link, f"{x.same_leaf_us:g}", "-" if x.cross_leaf_us is None else f"{x.cross_leaf_us:g}"]
        for x in ISCA_TABLE5_LATENCY
    ]
    radix = costs[0].topology.radix if costs else 0
    return "\n".join(
        [
            f"Scale-out topologies of {radix}-port switches (ISCA Table 3); links = switch-to-switch links",
            f"cost model: {prices_note}",
            "",
            _table(rows, header),
            "",
            f"Latency, {ISCA_TABLE5_SOURCE}:",
            _table(latency, ["link", "same leaf us", "cross leaf us"]),
        ]
    )


def format_all_to_all(results: Sequence[Any], labels: Sequence[str]) -> str:
    """The all-to-all comparison: time and algorithm bandwidth per scenario, relative to the first."""
    base = results[0].time_s
    rows = [
        [
            label,
            f"{r.time_s * MS_PER_S:.4g}",
            f"{r.algo_bandwidth_bytes_per_s / GIGA:.2f}",
            f"{r.time_s / base:.3f}",
            str(r.flows),
        ]
        for label, r in zip(labels, results)
    ]
    first = results[0]
    return "\n".join(
        [
            f"All-to-all, {first.gpus} GPUs, {first.bytes_per_pair / BYTES_PER_MIB:g} MiB per GPU pair, "
            "max-min fair flow model",
            "",
            _table(rows, ["scenario", "time ms", "algo GB/s per GPU", "time / first", "flows"]),
        ]
    )


# ---------------------------------------------------------------------------------------------- plots
def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=PLOT_DPI)


def plot_kv_cache(reports: Sequence[ModelReport], path: Path) -> Path:
    """Bar chart: KV cache per token (KB) per model, with the ratio to the first model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    names = [r.arch.name for r in reports]
    kb = [kv_cache_kb(r.kv_bytes) for r in reports]
    bars = ax.bar(names, kb, color="tab:blue")
    for bar, r in zip(bars, reports):
        ax.annotate(
            f"{kv_cache_kb(r.kv_bytes):.1f} KB\n{r.kv_bytes / reports[0].kv_bytes:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel(f"KV cache per token, KB ({reports[0].kv_dtype})")
    ax.set_title("KV cache per token (ISCA Table 1)")
    ax.margins(y=0.2)
    return _save(fig, path)


def plot_tpot_vs_bandwidth(reports: Sequence[ModelReport], path: Path, *, tokens: int = 32) -> Path:
    """TPOT vs scale-out bandwidth: the paper's case and each MoE model, log-log."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    xs = list(TPOT_PLOT_GBYTES_PER_S)
    case = ISCA_DECODE_CASES[0]
    paper_line = [
        decode_limit(
            hidden=case.hidden,
            tokens=case.tokens,
            fanout=case.fanout,
            bw=x * GIGA,
            layers=case.layers,
            dispatch_bytes=case.dispatch_bytes,
            combine_bytes=case.combine_bytes,
        ).tpot_ms
        for x in xs
    ]
    ax.plot(xs, paper_line, "k--", label="ISCA §2.3.2 (hidden 7000, fan-out 9, 61 layers)")
    for r in reports:
        if r.arch.is_moe:
            ys = [decode_limit_for_arch(r.arch, bw=x * GIGA, tokens=tokens).tpot_ms for x in xs]
            ax.plot(xs, ys, marker="o", label=r.arch.name)
    for c in ISCA_DECODE_CASES:
        ax.plot([c.bw_bytes_per_s / GIGA], [c.quoted_tpot_ms], "r*", markersize=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-GPU all-to-all bandwidth, GB/s")
    ax.set_ylabel("time per output token, ms")
    ax.set_title(f"EP decode limit, {tokens} tokens/GPU (red: paper)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cost_per_endpoint(costs: Sequence[TopologyCost], path: Path) -> Path:
    """Bar chart: modelled cost per endpoint per topology, the paper's figures as markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    names = [c.topology.name for c in costs]
    ax.bar(names, [c.cost_per_endpoint_usd / KUSD for c in costs], color="tab:green", label="model")
    quoted = [(c.topology.name, c.quoted.cost_per_endpoint_kusd) for c in costs if c.quoted is not None]
    if quoted:
        ax.plot([n for n, _ in quoted], [v for _, v in quoted], "r*", markersize=10, label="ISCA Table 3")
    ax.set_ylabel("cost per endpoint, k$")
    ax.set_title(f"Network cost per endpoint, radix {costs[0].topology.radix}")
    ax.legend()
    return _save(fig, path)


PLOTS_KIND = "plots"
KV_PLOT, TPOT_PLOT, COST_PLOT = "kv_cache_per_token.png", "tpot_vs_bandwidth.png", "cost_per_endpoint.png"


def write_plots(
    directory: Path,
    *,
    reports: Sequence[ModelReport] = (),
    costs: Sequence[TopologyCost] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Write the charts that have data into ``directory`` (created if needed); returns their paths.

    ``directory`` follows latentmoe's file rules (latentmoe.io): new, empty or a plot directory of ours; with
    ``overwrite`` it may hold other files, which are kept (a file named like one of the charts is refused)."""
    directory = Path(directory)
    names = ([KV_PLOT, TPOT_PLOT] if reports else []) + ([COST_PLOT] if costs else [])
    try:
        check_destination(directory, kinds=(PLOTS_KIND,), overwrite=overwrite, writes=names)
    except DestinationError as exc:
        raise PlanError(str(exc)) from None
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if reports:
        written.append(plot_kv_cache(reports, directory / KV_PLOT))
        tokens = next(
            (r.decode.tokens for r in reports if r.decode is not None), ISCA_DECODE_TOKENS_PER_DEVICE
        )
        written.append(plot_tpot_vs_bandwidth(reports, directory / TPOT_PLOT, tokens=tokens))
    if costs:
        written.append(plot_cost_per_endpoint(costs, directory / COST_PLOT))
    claim(directory, PLOTS_KIND, [p.name for p in written])
    return written
