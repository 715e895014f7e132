"""The training loop: one optimizer step of a DeepSeek-V3-style model, repeated, resumable bit-exactly.

One step, in order (DeepSeek-V3 report §3.3 and §4.2)::

    lr      = lr_at(step)                                   warmup + cosine, a pure function of step
    ids     = batch_fn(step)                                [B, S], a pure function of (seed, step)
    out     = model(ids)                                    logits, MTP logits, expert load, balance loss
    loss    = main + λ/D·Σ_k mtp_k + α·balance              λ = mtp_lambda, α = balance_alpha
    if loss is not finite: skip (no update at all), count it, move on to the next batch
    loss.backward(); clip the global grad norm to grad_clip (a non-finite norm also skips the step)
    AdamW step (decay on matrices only)
    model.update_router_biases(out.expert_load, γ)          aux-loss-free balancing, outside autograd

The router bias update uses the load of *this* step and happens only when the optimizer stepped, so
bias and weights always move together. The complementary sequence-wise balance loss is tiny
(α = 1e-4) and only guards against extreme imbalance inside one sequence; the bias does the work.

**Exact resume.** Everything that influences step ``t`` is either a pure function of ``t`` (the
learning rate, the batch) or saved in the checkpoint (weights, router-bias buffers, AdamW moments
and step counts, torch's CPU RNG state, the skipped-step counters). So 20 steps in one run and
10 steps + checkpoint + resume + 10 steps give bit-identical fp32 weights on CPU. Anything added to
the loop must keep that property: derive it from the step, or save it.

**Ctrl-C.** While :func:`train` runs in the main thread, the first SIGINT only sets a flag; the
current step finishes, a checkpoint is written, and :class:`TrainingInterrupted` (a
``KeyboardInterrupt`` carrying the checkpoint path) is raised. A second Ctrl-C interrupts at once.
A ``KeyboardInterrupt`` raised any other way also saves the last completed step, unless it arrived
in the middle of the parameter update, where no consistent state exists to save.

**Non-finite losses** (fp overflow, a bad batch) skip the step: no weight, optimizer or bias change;
the step index still advances so the next batch is a different one. More than
``max_consecutive_nonfinite`` in a row means training has diverged and raises
:class:`TrainingError`.

Library code here never prints: progress goes to a tqdm bar when ``progress=True`` and every
metrics record to the ``on_log`` callback.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from latentmoe.config import ConfigError, ModelConfig
from latentmoe.model.mtp import causal_lm_loss, next_token_loss
from latentmoe.train.checkpoint import (
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from latentmoe.train.metrics import (
    METRICS_FILE,
    MetricsWriter,
    expert_load_max_over_mean,
    plot_expert_load,
    plot_loss,
)
from latentmoe.train.optim import MOMENT_DTYPES, build_optimizer, lr_at

if TYPE_CHECKING:
    from latentmoe.parallel.training import DistributedTraining

PRECISIONS = ("fp32", "bf16", "fp8")
LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"

BatchFn = Callable[[int], torch.Tensor]
ValFn = Callable[[], "float | Iterable[torch.Tensor]"]


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or the output directory/checkpoint does not fit the run)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. ``checkpoint`` is where the run was saved (None if nothing could be)."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        where = f"saved {checkpoint}" if checkpoint is not None else "no consistent state to save"
        super().__init__(f"training interrupted at step {step}; {where}")
        self.checkpoint = checkpoint
        self.step = step


@dataclass
class TrainConfig:
    """Settings of one training run (the model's own shape lives in ModelConfig).

    ``steps`` is the total number of optimizer steps (a resumed run stops at the same total).
    ``eval_every``/``save_every`` of 0 mean "only at the end". ``eval_batches`` caps how many
    validation batches are consumed. ``precision="bf16"`` runs forward and loss under
    ``torch.autocast(bfloat16)`` with fp32 weights and optimizer state. ``precision="fp8"`` does the
    same after converting the model's Linear layers and routed experts to FP8 GEMMs with fine-grained
    scaling (``latentmoe.fp8.convert_to_fp8``; parameters stay fp32). ``adam_moments="bf16"`` stores
    AdamW's moments in bf16 (TR §3.3.3).
    """

    out_dir: str | Path = "runs/train"
    preset: str = "small"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    bias_gamma: float = 1e-3
    balance_alpha: float = 1e-4
    precision: str = "fp32"
    adam_moments: str = "fp32"
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0
    keep_last: int | None = 3
    max_consecutive_nonfinite: int = 10

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad field; return self."""
        for name in ("steps", "batch_size", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a token and its successor), got {self.seq_len}")
        for name in (
            "warmup_steps",
            "eval_every",
            "save_every",
            "max_consecutive_nonfinite",
            "weight_decay",
            "mtp_lambda",
            "bias_gamma",
            "balance_alpha",
            "min_lr",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.adam_moments not in MOMENT_DTYPES:
            raise ConfigError(f"adam_moments must be one of {', '.join(MOMENT_DTYPES)}, got {self.adam_moments!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["betas"] = list(self.betas)
        return data


@dataclass
class TrainResult:
    """What a finished run reports. Losses are nats/token; ``final_loss`` is the last logged window's mean."""

    final_step: int
    final_loss: float | None
    final_val_loss: float | None
    skipped_steps: int
    checkpoint: Path
    tokens_per_s: float | None
    out_dir: Path
    metrics_path: Path
    loss_plot: Path
    expert_load_plot: Path | None
    resumed_from: Path | None = None


@dataclass
class _Window:
    """Sums over the steps since the last metrics record."""

    steps: int = 0
    finite_steps: int = 0
    loss: float = 0.0
    mtp: list[float] = field(default_factory=list)
    balance: float = 0.0
    grad_norm: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    load: torch.Tensor | None = None

    def add(self, *, main: float, mtp: list[float], balance: float, grad_norm: float, load: torch.Tensor) -> None:
        self.finite_steps += 1
        self.loss += main
        self.mtp = [a + b for a, b in zip(self.mtp, mtp)] if self.mtp else list(mtp)
        self.balance += balance
        self.grad_norm += grad_norm
        self.load = load.clone() if self.load is None else self.load + load


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> float:
    """Mean main-head next-token loss (nats/token) over ``batches`` of ``[B, S]`` ids, in eval mode.

    The MTP heads are not run: validation measures the model that generates. The model's previous
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i, ids in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = ids.to(device)
            with _autocast(device, precision):
                logits = model(ids, compute_mtp=False).logits
            total += float(next_token_loss(logits, ids))
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no validation batches")
    return total / count


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp8"):  # fp8: the converted GEMMs run in FP8, everything else under bf16 autocast
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def moe_layer_labels(model: nn.Module) -> list[str]:
    """Row labels for ``expert_load``: main-model MoE layers by index, then the MTP blocks."""
    try:
        labels = [f"layer {i}" for i, b in enumerate(model.model.layers) if b.is_moe]
        labels += [f"MTP {k}" for k, m in enumerate(model.mtp, 1) if m.block.is_moe]
        return labels
    except AttributeError:
        return [f"MoE {i}" for i in range(len(model.moe_layers()))]


class Trainer:
    """Owns the model, optimizer and counters of one run; :meth:`run` trains to ``cfg.steps``.

    ``batch_fn(step)`` must return the ``[batch, seq]`` LongTensor for that step and depend only on
    the step (and a seed fixed for the run) — that is what makes resume exact. ``val_fn()`` returns
    either the validation loss itself or an iterable of ``[batch, seq]`` validation batches.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: nn.Module,
        batch_fn: BatchFn,
        val_fn: ValFn | None = None,
        progress: bool = False,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        handle_sigint: bool = True,
        distributed: DistributedTraining | None = None,
    ) -> None:
        self.cfg = cfg.validate()
        # Expert/data-parallel runs (latentmoe.parallel.training): batch sharding, gradient reduction,
        # global grad norm, rank-0-only metrics and sharded checkpoints. None: one process.
        self.distributed = distributed
        self.is_main = distributed is None or distributed.is_main
        self.model = model
        self.model_config: ModelConfig = model.config
        self.batch_fn = batch_fn
        self.val_fn = val_fn
        self.progress = progress
        self.on_log = on_log
        self.handle_sigint = handle_sigint
        self.out_dir = Path(cfg.out_dir)
        self.device = next(model.parameters()).device
        if cfg.precision == "fp8":
            from latentmoe.fp8 import convert_to_fp8

            # In place, sharing the Parameter objects: state dicts and checkpoints stay fp32.
            convert_to_fp8(model)
        self.optimizer = build_optimizer(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, moments=cfg.adam_moments
        )
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.tokens_seen = 0
        self.tokens_per_s_history: list[float] = []
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_expert_load: torch.Tensor | None = None
        self._stop_requested = False
        self._stop_agreed = False
        self._in_update = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON trainer state stored in ``trainer_state.json`` (the step is added by the checkpoint)."""
        return {
            "seed": self.cfg.seed,
            "data": {"seed": self.cfg.seed, "next_step": self.step},
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s_history": self.tokens_per_s_history,
            "last_loss": self.last_loss,
            "last_val_loss": self.last_val_loss,
            "last_expert_load": (
                None if self.last_expert_load is None else self.last_expert_load.double().round(decimals=4).tolist()
            ),
            "torch_rng_state": _encode_rng(torch.get_rng_state()),
            "train_config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.tokens_per_s_history = [float(x) for x in state.get("tokens_per_s_history", [])]
        self.last_loss = state.get("last_loss")
        self.last_val_loss = state.get("last_val_loss")
        load = state.get("last_expert_load")
        self.last_expert_load = None if load is None else torch.tensor(load, dtype=torch.float32)
        torch.set_rng_state(_decode_rng(state["torch_rng_state"]))

    def save(self) -> Path:
        if self.distributed is not None:
            return self.distributed.save_checkpoint(self)
        return save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.optimizer,
            self.state_dict(),
            self.model_config,
            keep_last=self.cfg.keep_last,
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any] | None:
        """Run optimizer step ``step`` (0-based). Returns its losses, or None when it was skipped."""
        cfg = self.cfg
        lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = self.batch_fn(step).to(self.device)
        tokens = ids.numel()  # the global batch, whatever the world size
        if self.distributed is not None:
            ids = self.distributed.begin_step(self.model, ids)  # this rank's rows
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, cfg.precision):
            out = self.model(ids)
            losses = causal_lm_loss(out, ids, mtp_lambda=cfg.mtp_lambda)
            loss = losses.total
            if cfg.balance_alpha and out.balance_loss is not None:
                loss = loss + cfg.balance_alpha * out.balance_loss
        stats = None
        if self.distributed is not None:  # global means; every rank then takes the same branch below
            stats, self._stop_agreed = self.distributed.mean_losses(
                loss, losses.main, losses.mtp, out.balance_loss, stop=self._stop_requested
            )
        if not (math.isfinite(stats["total"]) if stats is not None else torch.isfinite(loss.detach())):
            return None
        loss.backward()
        if self.distributed is not None:
            grad_norm = self.distributed.reduce_and_clip(self.model, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._in_update = True
        self.optimizer.step()
        # The router bias is a buffer, not a parameter: it moves by ±γ outside autograd, after the
        # weights, using this step's load, and only changes which experts are selected.
        load = out.expert_load if self.distributed is None else self.distributed.sum(out.expert_load)
        self.model.update_router_biases(load, cfg.bias_gamma)
        self._in_update = False
        self.optimizer.zero_grad(set_to_none=True)
        if stats is not None:
            self.distributed.end_step(self.model)
            return {
                "lr": lr,
                "main": stats["main"],
                "mtp": stats["mtp"],
                "balance": stats["balance"],
                "grad_norm": grad_norm.item(),
                "load": load.float().cpu(),
                "tokens": tokens,
            }
        return {
            "lr": lr,
            "main": losses.main.item(),
            "mtp": [x.item() for x in losses.mtp],
            "balance": out.balance_loss.item() if out.balance_loss is not None else 0.0,
            "grad_norm": grad_norm.item(),
            "load": out.expert_load.detach().float().cpu(),
            "tokens": ids.numel(),
        }

    def validation_loss(self) -> float | None:
        if self.val_fn is None:
            return None
        result = self.val_fn()
        if isinstance(result, int | float):
            return float(result)
        if self.distributed is not None:
            return self.distributed.evaluate(
                self.model, result, max_batches=self.cfg.eval_batches, precision=self.cfg.precision
            )
        return evaluate(self.model, result, max_batches=self.cfg.eval_batches, precision=self.cfg.precision)

    # ------------------------------------------------------------------ the loop
    def run(self, *, resume: bool = False) -> TrainResult:
        """Train from scratch (or from the newest checkpoint in ``out_dir`` when ``resume``) to ``cfg.steps``."""
        cfg = self.cfg
        resumed_from = latest_checkpoint(self.out_dir)
        if resumed_from is not None and not resume:
            raise TrainingError(
                f"{self.out_dir} already holds checkpoints (newest {resumed_from.name}); "
                "resume from it or choose an empty output directory"
            )
        if resumed_from is not None:
            if self.distributed is not None:
                state = self.distributed.load_checkpoint(resumed_from, self.model, self.optimizer)
            else:
                state = load_checkpoint(resumed_from, self.model, self.optimizer)
            if state.get("seed") != cfg.seed:
                raise TrainingError(
                    f"{resumed_from} was trained with seed {state.get('seed')}, not {cfg.seed}; "
                    "an exact resume needs the same seed (same data stream)"
                )
            self.load_state_dict(state)
        else:
            torch.manual_seed(cfg.seed)
        resume_step = self.step if resumed_from is not None else None
        if self.distributed is not None:
            metrics = self.distributed.metrics_writer(self.out_dir, resume_step=resume_step)
        else:
            metrics = MetricsWriter(self.out_dir, resume_step=resume_step)
        checkpoint: Path | None = resumed_from
        try:
            with self._sigint_deferred():
                checkpoint = self._loop(metrics) or checkpoint
        finally:
            metrics.close()
        if checkpoint is None or checkpoint_step(checkpoint) != self.step:
            checkpoint = self.save()
        loss_png = self.out_dir / LOSS_PLOT
        if self.is_main:
            plot_loss(self.out_dir / METRICS_FILE, loss_png)
        load_png = None
        if self.last_expert_load is not None and not self.is_main:
            load_png = self.out_dir / EXPERT_LOAD_PLOT
        elif self.last_expert_load is not None:
            load_png = plot_expert_load(
                self.last_expert_load,
                self.out_dir / EXPERT_LOAD_PLOT,
                title="Expert load, last logged window",
                layer_labels=moe_layer_labels(self.model),
            )
        return TrainResult(
            final_step=self.step,
            final_loss=self.last_loss,
            final_val_loss=self.last_val_loss,
            skipped_steps=self.skipped_steps,
            checkpoint=checkpoint,
            tokens_per_s=statistics.median(self.tokens_per_s_history) if self.tokens_per_s_history else None,
            out_dir=self.out_dir,
            metrics_path=self.out_dir / METRICS_FILE,
            loss_plot=loss_png,
            expert_load_plot=load_png,
            resumed_from=resumed_from,
        )

    def _loop(self, metrics: MetricsWriter) -> Path | None:
        """Steps ``self.step .. cfg.steps-1``; returns the last checkpoint written, if any."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        window = _Window()
        checkpoint = None
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (self.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
            desc="train",
        )
        try:
            while self.step < cfg.steps:
                step = self.step
                t0 = time.perf_counter()
                result = self.train_step(step)
                window.seconds += time.perf_counter() - t0
                window.steps += 1
                self.step = step + 1
                if result is None:
                    self.skipped_steps += 1
                    self.consecutive_nonfinite += 1
                    if self.consecutive_nonfinite > cfg.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"loss or gradient was non-finite for {self.consecutive_nonfinite} consecutive steps "
                            f"(steps {self.step - self.consecutive_nonfinite}..{step}); training diverged — "
                            "lower the learning rate or use fp32"
                        )
                else:
                    self.consecutive_nonfinite = 0
                    window.add(
                        main=result["main"],
                        mtp=result["mtp"],
                        balance=result["balance"],
                        grad_norm=result["grad_norm"],
                        load=result["load"],
                    )
                    window.tokens += result["tokens"]
                    self.tokens_seen += result["tokens"]
                bar.update(1)

                done = self.step
                is_last = done == cfg.steps
                do_eval = self.val_fn is not None and (is_last or (cfg.eval_every and done % cfg.eval_every == 0))
                val_loss = self.validation_loss() if do_eval else None
                if val_loss is not None:
                    self.last_val_loss = _finite(val_loss)
                if is_last or done % cfg.log_every == 0 or do_eval:
                    record = self._record(window, lr=result["lr"] if result else None, val_loss=val_loss)
                    record = metrics.write(record)
                    if self.on_log is not None:
                        self.on_log(record)
                    postfix = {"loss": f"{record['loss']:.3f}" if record["loss"] is not None else "nan"}
                    if record["tokens_per_s"]:
                        postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
                    if self.last_val_loss is not None:
                        postfix["val"] = f"{self.last_val_loss:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    window = _Window()
                if cfg.save_every and done % cfg.save_every == 0 and not is_last:
                    checkpoint = self.save()
                # Distributed: a Ctrl-C counts once every rank knows of it (it rides on the loss all-reduce).
                stop = self._stop_requested if self.distributed is None else self._stop_agreed
                if stop and not is_last:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self._in_update:
                raise TrainingInterrupted(latest_checkpoint(self.out_dir), self.step) from None
            raise TrainingInterrupted(self.save(), self.step) from None
        finally:
            bar.close()
        return checkpoint

    def _record(self, window: _Window, *, lr: float | None, val_loss: float | None) -> dict[str, Any]:
        n = window.finite_steps
        loss = window.loss / n if n else None
        mtp_per_depth = [x / n for x in window.mtp] if n else []
        ratios = expert_load_max_over_mean(window.load) if window.load is not None else []
        tokens_per_s = window.tokens / window.seconds if window.seconds > 0 and window.tokens else None
        if loss is not None:
            self.last_loss = _finite(loss)
        if window.load is not None:
            self.last_expert_load = window.load / n
        if tokens_per_s is not None:
            self.tokens_per_s_history.append(tokens_per_s)
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "mtp_loss": sum(mtp_per_depth) / len(mtp_per_depth) if mtp_per_depth else None,
            "mtp_losses": mtp_per_depth,
            "balance_loss": window.balance / n if n else None,
            "grad_norm": window.grad_norm / n if n else None,
            "lr": lr
            if lr is not None
            else lr_at(
                self.step - 1,
                max_lr=self.cfg.lr,
                min_lr=self.cfg.min_lr,
                warmup_steps=self.cfg.warmup_steps,
                total_steps=self.cfg.steps,
            ),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "expert_load_max_over_mean": ratios,
            "expert_load_max_over_mean_mean": sum(ratios) / len(ratios) if ratios else None,
            "skipped_steps": self.skipped_steps,
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        if self.distributed is not None:
            record.update(self.distributed.window_metrics(window.steps))  # a2a_* traffic (collective)
        return record

    @contextlib.contextmanager
    def _sigint_deferred(self) -> Iterator[None]:
        """Turn the first Ctrl-C into "stop after this step"; a second one interrupts immediately."""
        if not self.handle_sigint or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum: int, frame: object) -> None:
            self._stop_requested = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(
    cfg: TrainConfig,
    *,
    batch_fn: BatchFn,
    model: nn.Module | None = None,
    val_fn: ValFn | None = None,
    resume: bool = False,
    progress: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    handle_sigint: bool = True,
    distributed: DistributedTraining | None = None,
) -> TrainResult:
    """Train to ``cfg.steps`` and return a :class:`TrainResult`; see the module docstring for one step.

    Without ``model``, a ``CausalLM`` is built from ``cfg.preset`` after ``torch.manual_seed(cfg.seed)``
    — or, when resuming, from the newest checkpoint's ``config.json``. Writes ``metrics.jsonl``,
    ``checkpoint-STEP/`` (every ``save_every`` steps and at the end), ``loss.png`` and
    ``expert_load.png`` under ``cfg.out_dir``. Raises :class:`TrainingInterrupted` on Ctrl-C (after
    saving) and :class:`TrainingError` when training diverges or ``out_dir`` holds another run.
    """
    if model is None:
        from latentmoe import CausalLM

        latest = latest_checkpoint(cfg.out_dir) if resume else None
        config = ModelConfig.from_json(latest) if latest is not None else ModelConfig.from_preset(cfg.preset)
        torch.manual_seed(cfg.seed)
        model = CausalLM(config)
    trainer = Trainer(
        cfg,
        model=model,
        batch_fn=batch_fn,
        val_fn=val_fn,
        progress=progress,
        on_log=on_log,
        handle_sigint=handle_sigint,
        distributed=distributed,
    )
    return trainer.run(resume=resume)
