"""``latentmoe ep-report RUN_DIR``: the expert-parallel traffic of a training run, as a table and a PNG.

Reads ``metrics.jsonl`` (the ``a2a_*`` keys the distributed trainer logs per step, summed over ranks) and
``ep_layout.json`` (the layout the run was launched with). Reports, per step: bytes over intra-node and
inter-node links, the busiest rank's bytes (the straggler that paces every all-to-all), and the DeepEP-style
two-hop inter-node count (one IB crossing per token and remote node, then NVLink fan-out); and node-limited
routing's bound — at most M nodes per token — against the unconstrained top-k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentmoe.io import read_json
from latentmoe.parallel.traffic import node_limit

LAYOUT_FILE = "ep_layout.json"
METRICS_FILE = "metrics.jsonl"
STEP_KEYS = (
    "a2a_intra_node_bytes",
    "a2a_inter_node_bytes",
    "a2a_max_rank_bytes",
    "a2a_dispatch_inter_node_bytes",
    "a2a_combine_inter_node_bytes",
    "a2a_two_hop_inter_node_bytes",
    "a2a_tokens",
    "a2a_nodes_per_token",
    "a2a_max_nodes_per_token",
    "a2a_exposed_comm_s",
)


class ReportError(ValueError):
    """The run directory has no expert-parallel metrics; the message says what is missing."""


@dataclass
class EPReport:
    run_dir: str
    layout: dict[str, Any]
    steps: list[int]
    series: dict[str, list[float]]
    mean: dict[str, float]
    node_limit: int
    unconstrained_nodes: int
    plot: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ep_report(run_dir: Path) -> EPReport:
    layout_path, metrics_path = run_dir / LAYOUT_FILE, run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{metrics_path}: missing (not a training run directory)")
    if not layout_path.is_file():
        raise ReportError(f"{layout_path}: missing (the run was not trained with torchrun and --ep)")
    layout = read_json(layout_path, error=ReportError)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("a2a_intra_node_bytes") is not None]
    if not records:
        raise ReportError(f"{metrics_path}: no a2a_* metrics (the run was not expert-parallel)")
    series = {k: [float(r.get(k) or 0.0) for r in records] for k in STEP_KEYS}
    mean = {k: sum(v) / len(v) for k, v in series.items()}
    mean["a2a_max_nodes_per_token"] = max(series["a2a_max_nodes_per_token"])
    ep_nodes = max(1, layout["ep_size"] // layout["gpus_per_node"])
    limit = node_limit(
        n_group=layout["n_group"], topk_group=layout["topk_group"], top_k=layout["num_experts_per_tok"],
        ep_nodes=ep_nodes,
    )
    notes = []
    if mean["a2a_max_nodes_per_token"] > limit:
        notes.append(f"some token reached {mean['a2a_max_nodes_per_token']:.0f} nodes, above the bound {limit}")
    return EPReport(
        run_dir=str(run_dir),
        layout=layout,
        steps=[int(r["step"]) for r in records],
        series=series,
        mean=mean,
        node_limit=limit,
        unconstrained_nodes=min(layout["num_experts_per_tok"], ep_nodes),
        notes=notes,
    )


def _mb(x: float) -> str:
    return f"{x / 1e6:10.3f}"


def format_ep_report(report: EPReport) -> str:
    L, m = report.layout, report.mean
    forward_inter = m["a2a_dispatch_inter_node_bytes"] + m["a2a_combine_inter_node_bytes"]
    tokens = m["a2a_tokens"] or 1.0
    lines = [
        f"expert-parallel traffic of {report.run_dir}",
        f"layout: {L['world_size']} ranks = {L['n_nodes']} nodes x {L['gpus_per_node']}; EP {L['ep_size']} x "
        f"DP {L['dp_size']}; {L['n_routed_experts']} experts, top-{L['num_experts_per_tok']}, "
        f"{L['n_group']} groups keep {L['topk_group']}; dispatch {L['dispatch']}, combine {L['combine']}; "
        f"{L['backend']}",
        "",
        "    step   intra MB   inter MB  max-rank MB  two-hop inter MB  nodes/token  exposed ms",
    ]
    s = report.series
    for i, step in enumerate(report.steps):
        lines.append(
            f"{step:8d} {_mb(s['a2a_intra_node_bytes'][i])} {_mb(s['a2a_inter_node_bytes'][i])}  "
            f"{_mb(s['a2a_max_rank_bytes'][i])}        {_mb(s['a2a_two_hop_inter_node_bytes'][i])}"
            f"     {s['a2a_nodes_per_token'][i]:8.3f}  {1e3 * s['a2a_exposed_comm_s'][i]:10.2f}"
        )
    lines += [
        "",
        "per step, mean over logged windows (bytes summed over ranks; forward + backward):",
        f"  intra-node {m['a2a_intra_node_bytes'] / 1e6:.3f} MB, inter-node {m['a2a_inter_node_bytes'] / 1e6:.3f} MB, "
        f"busiest rank {m['a2a_max_rank_bytes'] / 1e6:.3f} MB",
        f"  forward inter-node per token: direct {forward_inter / tokens:.0f} B, DeepEP two-hop "
        f"{m['a2a_two_hop_inter_node_bytes'] / tokens:.0f} B",
        f"  nodes per token: mean {m['a2a_nodes_per_token']:.3f}, max {m['a2a_max_nodes_per_token']:.0f}; "
        f"node-limited bound M = {report.node_limit} (unconstrained top-k: up to {report.unconstrained_nodes})",
    ]
    if report.plot:
        lines.append(f"plot: {report.plot}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def plot_ep_traffic(report: EPReport, png_path: Path) -> Path:
    from matplotlib.figure import Figure

    from latentmoe.io import save_figure

    s, steps = report.series, report.steps
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    intra = [v / 1e6 for v in s["a2a_intra_node_bytes"]]
    inter = [v / 1e6 for v in s["a2a_inter_node_bytes"]]
    width = max(1.0, (steps[-1] - steps[0]) / max(len(steps), 1) * 0.6) if len(steps) > 1 else 0.6
    ax.bar(steps, intra, width=width, label="intra-node (all ranks)", color="#4C72B0")
    ax.bar(steps, inter, width=width, bottom=intra, label="inter-node (all ranks)", color="#DD8452")
    ax.plot(steps, [v / 1e6 for v in s["a2a_max_rank_bytes"]], "k.-", label="busiest rank")
    ax.plot(steps, [v / 1e6 for v in s["a2a_two_hop_inter_node_bytes"]], "g^--", label="two-hop inter-node (fwd)")
    ax.set_xlabel("step")
    ax.set_ylabel("MB per step")
    L = report.layout
    ax.set_title(f"EP all-to-all traffic: {L['n_nodes']} nodes x {L['gpus_per_node']}, EP {L['ep_size']}, "
                 f"M = {report.node_limit}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, png_path)
