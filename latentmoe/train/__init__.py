"""Training: the loop, the Strategy it runs under, AdamW + warmup/cosine, the run directory, metrics and plots.

``train(TrainConfig(...), batch_fn=...)`` is the entry point; the pieces are importable on their own
(:mod:`.config` TrainConfig, :mod:`.strategy` Strategy / SingleProcess, :mod:`.run_dir` plan_run,
:mod:`.optim` lr_at / build_optimizer, :mod:`.evaluate`, :mod:`.metrics`). Checkpoints are
``latentmoe.checkpoint``'s.
"""

from latentmoe.train.config import TrainConfig
from latentmoe.train.evaluate import evaluate
from latentmoe.train.metrics import MetricsWriter, NullMetrics, clean_record, plot_expert_load, plot_loss, read_metrics
from latentmoe.train.optim import build_optimizer, lr_at
from latentmoe.train.run_dir import DEMO_KIND, RunDirectoryError, RunPlan, claim_run_file, plan_run
from latentmoe.train.strategy import (
    ForwardContext,
    LossFn,
    LossStats,
    SingleProcess,
    StepLoss,
    StepStats,
    Strategy,
    forward_backward_whole,
)
from latentmoe.train.trainer import (
    DataInfo,
    RankBatches,
    Trainer,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    train,
    weights_finite,
)

__all__ = [
    "DEMO_KIND",
    "DataInfo",
    "ForwardContext",
    "LossFn",
    "LossStats",
    "MetricsWriter",
    "NullMetrics",
    "RankBatches",
    "RunDirectoryError",
    "RunPlan",
    "SingleProcess",
    "StepLoss",
    "StepStats",
    "Strategy",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "build_optimizer",
    "claim_run_file",
    "clean_record",
    "evaluate",
    "forward_backward_whole",
    "lr_at",
    "plan_run",
    "plot_expert_load",
    "plot_loss",
    "read_metrics",
    "train",
    "weights_finite",
]
