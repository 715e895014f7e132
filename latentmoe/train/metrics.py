"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, and the two PNG plots.

``metrics.jsonl`` is append-only and flushed after every line, so ``tail -f`` shows progress and a
killed run keeps everything it logged. A record looks like::

    {"step": 200, "loss": 4.91, "mtp_loss": 5.37, "val_loss": 5.02, "lr": 0.00093,
     "tokens_per_s": 5120.4, "expert_load_max_over_mean": [1.31, 1.18],
     "expert_load_max_over_mean_mean": 1.245, "skipped_steps": 0, ...}

``step`` counts completed optimizer steps; ``val_loss`` is present only on steps where validation
ran. Non-finite floats are written as ``null`` (strict JSON has no NaN).

**Expert load.** For each MoE layer, ``max/mean`` of the number of tokens routed to each expert:
1.0 is perfect balance, ``n_routed_experts / num_experts_per_tok`` means every token picked the same
experts. The auxiliary-loss-free bias update should pull it towards 1.

**Plots** use matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), so
nothing touches pyplot's global state or the process-wide backend, and each PNG is written to a
temporary file and renamed, so a reader never sees half an image.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentmoe.device import HOST
from latentmoe.io import save_figure, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def clean_record(value: Any) -> Any:
    """Make a value strict-JSON: tensors to numbers/lists, NaN/inf to None."""
    if torch.is_tensor(value):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [clean_record(v) for v in value]
    if isinstance(value, dict):
        return {str(k): clean_record(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


class MetricsWriter:
    """Appends one JSON line per call to ``out_dir/metrics.jsonl``.

    A fresh run (``resume_step=None``) starts an empty file. A resumed run keeps the records up to
    ``resume_step`` and drops later ones: those were logged after the checkpoint and will be
    logged again.
    """

    def __init__(self, out_dir: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_text_atomic(self.path, text)
        self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (cleaned to strict JSON) and flush; return the cleaned record."""
        clean = clean_record(record)
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()
        return clean

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullMetrics:
    """The metrics writer of ranks other than 0: records are computed (they involve collectives) but not written."""

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        return clean_record(record)

    def close(self) -> None:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a missing file is empty, a torn last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def expert_load_max_over_mean(load_LE: torch.Tensor | np.ndarray) -> list[float]:
    """``max_i load_i / mean_i load_i`` per MoE layer for a load ``[n_moe_layers, n_routed_experts]``.

    A layer that routed no tokens (mean 0) reports 1.0 (nothing is imbalanced).
    """
    load = torch.from_numpy(_as_numpy(load_LE))
    if load.ndim != 2:
        raise ValueError(f"expert load must be [layers, experts], got shape {tuple(load.shape)}")
    if load.shape[0] == 0 or load.shape[1] == 0:
        return []
    mean = load.mean(dim=1)
    ratio = torch.where(mean > 0, load.max(dim=1).values / mean.clamp_min(1e-30), torch.ones_like(mean))
    return [float(r) for r in ratio]


# ---------------------------------------------------------------------------------------------- plots


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Train loss (line) and validation loss (markers) against step, from a metrics.jsonl."""
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", markersize=4)
    if not train and not val:
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "Training and validation loss")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend()
    return save_figure(fig, png_path)


def plot_expert_load(
    load_LE: torch.Tensor | np.ndarray,
    png_path: str | os.PathLike,
    *,
    layer_labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Heatmap of routed-token counts ``[n_moe_layers, n_routed_experts]``, each row divided by its mean.

    A value of 1 (white) is a perfectly balanced expert; red is overloaded, blue underused.
    ``layer_labels`` names the rows (default ``layer 0..L-1``), e.g. the transformer layer of each MoE layer.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    load = _as_numpy(load_LE)
    if load.ndim != 2:
        raise ValueError(f"expert load must be [layers, experts], got shape {load.shape}")
    n_layers, n_experts = load.shape
    mean = load.mean(axis=1, keepdims=True) if n_experts else np.ones((n_layers, 1))
    rel = np.divide(load, mean, out=np.ones_like(load), where=mean > 0)
    fig = Figure(figsize=(max(5.0, 0.35 * n_experts + 2.5), max(2.5, 0.45 * n_layers + 1.5)))
    ax = fig.add_subplot()
    if rel.size:
        # At least ±25% of colour range, so a nearly balanced layer looks nearly white.
        norm = TwoSlopeNorm(vmin=min(float(rel.min()), 0.75), vcenter=1.0, vmax=max(float(rel.max()), 1.25))
        image = ax.imshow(rel, aspect="auto", cmap="coolwarm", norm=norm, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="tokens routed / layer mean")
    else:
        ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
    labels = layer_labels if layer_labels is not None else [f"layer {i}" for i in range(n_layers)]
    if len(labels) != n_layers:
        raise ValueError(f"{len(labels)} layer labels for {n_layers} layers")
    ax.set_yticks(range(n_layers), labels)
    step = max(1, n_experts // 32)
    ax.set_xticks(range(0, n_experts, step))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ratios = expert_load_max_over_mean(load)
    subtitle = f"max/mean per layer: {', '.join(f'{r:.2f}' for r in ratios)}" if ratios else ""
    ax.set_title((title or "Expert load") + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return save_figure(fig, png_path)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to(HOST, torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
