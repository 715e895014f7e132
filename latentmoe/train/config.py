"""TrainConfig: the settings of one training run, with every default and every numeric limit in one place.

The command line (``latentmoe train`` / ``demo``) takes its defaults and its argparse limits from here, and the
benchmarks build a TrainConfig and change only the fields they name, so nothing can drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentmoe.config import ConfigError, ModelConfig
from latentmoe.limits import bounds, check_fields
from latentmoe.train.optim import MOMENT_DTYPES

PRECISIONS = ("fp32", "bf16", "fp8")
MAX_STEPS = 10**9
MAX_SEED = 2**63 - 1
WARMUP_FRACTION = 20  # default warmup: steps // 20 (5%), at least one step
DEFAULT_SAVE_EVERY = 100


@dataclass
class TrainConfig:
    """Settings of one training run (the model's own shape lives in ModelConfig).

    ``steps`` is the total number of optimizer steps (a resumed run stops at the same total). ``eval_every`` /
    ``save_every`` of 0 mean "only at the end"; ``warmup_steps`` None means 5% of ``steps``. ``eval_batches`` caps
    how many validation batches are consumed. ``precision="bf16"`` runs forward and loss under
    ``torch.autocast(bfloat16)`` with fp32 weights and optimizer state. ``precision="fp8"`` does the same after
    converting the model's Linear layers and routed experts to FP8 GEMMs with fine-grained scaling
    (``latentmoe.fp8.convert_to_fp8``; parameters stay fp32). ``adam_moments="bf16"`` stores AdamW's moments in
    bf16 (TR §3.3.3). ``keep_last`` checkpoints are kept (None: all).
    """

    out_dir: str | Path = "runs/train"
    preset: str = "small"
    steps: int = field(default=1000, metadata=bounds(1, MAX_STEPS, integer=True))
    batch_size: int = field(default=16, metadata=bounds(1, 2**20, integer=True))
    seq_len: int = field(default=128, metadata=bounds(2, 2**24, integer=True))
    lr: float = field(default=2e-3, metadata=bounds(0, 1, low_open=True))
    min_lr: float = field(default=2e-4, metadata=bounds(0, 1))
    warmup_steps: int | None = field(default=None, metadata=bounds(0, MAX_STEPS, integer=True, optional=True))
    weight_decay: float = field(default=0.1, metadata=bounds(0, 1))
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = field(default=1.0, metadata=bounds(0, 1e6, low_open=True))
    mtp_lambda: float = field(default=0.3, metadata=bounds(0, 100))
    bias_gamma: float = field(default=1e-3, metadata=bounds(0, 1))
    balance_alpha: float = field(default=1e-4, metadata=bounds(0, 1))
    precision: str = "fp32"
    adam_moments: str = "fp32"
    seed: int = field(default=0, metadata=bounds(0, MAX_SEED, integer=True))
    eval_every: int = field(default=200, metadata=bounds(0, MAX_STEPS, integer=True))
    eval_batches: int = field(default=8, metadata=bounds(1, 2**20, integer=True))
    log_every: int = field(default=10, metadata=bounds(1, MAX_STEPS, integer=True))
    save_every: int = field(default=DEFAULT_SAVE_EVERY, metadata=bounds(0, MAX_STEPS, integer=True))
    keep_last: int | None = field(default=3, metadata=bounds(1, 2**20, integer=True, optional=True))
    max_consecutive_nonfinite: int = field(default=10, metadata=bounds(0, MAX_STEPS, integer=True))

    @property
    def warmup(self) -> int:
        """The warmup length in effect: ``warmup_steps``, or 5% of ``steps`` (at least 1)."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // WARMUP_FRACTION)

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad field; return self."""
        check_fields(self, ConfigError)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g})")
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.adam_moments not in MOMENT_DTYPES:
            raise ConfigError(f"adam_moments must be one of {', '.join(MOMENT_DTYPES)}, got {self.adam_moments!r}")
        return self

    def check_model(self, config: ModelConfig) -> TrainConfig:
        """Settings that depend on the model: windows must fit its context. Returns self."""
        if self.seq_len > config.max_position_embeddings:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds the model's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        return self

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed (what the benchmarks use: they name what they change)."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["betas"] = list(self.betas)
        return data
