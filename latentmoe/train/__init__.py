"""Training: the loop, AdamW + warmup/cosine schedule, crash-safe checkpoints, metrics and plots.

``train(TrainConfig(...), batch_fn=...)`` is the entry point; the pieces are importable on their own
(``lr_at`` and ``build_optimizer`` from :mod:`.optim`, ``save_checkpoint`` / ``load_checkpoint`` /
``load_model`` from :mod:`.checkpoint`, ``MetricsWriter`` and the plots from :mod:`.metrics`).
"""

from latentmoe.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from latentmoe.train.metrics import MetricsWriter, plot_expert_load, plot_loss, read_metrics
from latentmoe.train.optim import build_optimizer, lr_at
from latentmoe.train.trainer import (
    TrainConfig,
    Trainer,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    evaluate,
    train,
)

__all__ = [
    "CheckpointError",
    "MetricsWriter",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "build_optimizer",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "lr_at",
    "plot_expert_load",
    "plot_loss",
    "read_metrics",
    "save_checkpoint",
    "train",
]
