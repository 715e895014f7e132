"""The training loop: one optimizer step of a DeepSeek-V3-style model, repeated, resumable bit-exactly.

One step, in order (DeepSeek-V3 report §3.3 and §4.2)::

    lr      = lr_at(step)                                   warmup + cosine, a pure function of step
    ids     = batch_fn(step)                                [B, S], a pure function of (seed, step)
    out     = model(ids)                                    logits, MTP logits, expert load, balance loss
    loss    = main + λ/D·Σ_k mtp_k + α·balance              λ = mtp_lambda, α = balance_alpha
    loss.backward()                                         (these three are Strategy.forward_backward: a pipeline
                                                            schedule runs them per micro-batch, interleaved)
    if loss is not finite: skip (no update at all), count it, move on to the next batch
    clip the global grad norm to grad_clip (a non-finite norm also skips the step)
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

**Signals.** While :func:`train` runs in the main thread, the first SIGINT (Ctrl-C) or SIGTERM (what
schedulers, ``timeout``, preemption and torchrun send) only sets a flag; the current step finishes, a
checkpoint is written, and :class:`TrainingInterrupted` (a ``KeyboardInterrupt`` carrying the checkpoint
path and the signal) is raised; the CLI exits with 130 / 143. Under several processes the flag rides on the
step's loss all-reduce, so every rank stops after the same step. A second signal acts at once (default
handler). A ``KeyboardInterrupt`` raised any other way also saves the last completed step, unless it arrived
in the middle of the parameter update, where no consistent state exists to save. Periodic checkpoints are
on by default (``save_every``).

**Non-finite losses** (fp overflow, a bad batch) skip the step: no weight, optimizer or bias change;
the step index still advances so the next batch is a different one. More than
``max_consecutive_nonfinite`` in a row means training has diverged and raises :class:`TrainingError`.
**Non-finite weights** after an update stop the run at once with :class:`TrainingError`, before anything
is saved: the newest checkpoint stays the last good one.

**One loop, any layout.** Everything that differs between one process and many is a method of the
:class:`~latentmoe.train.strategy.Strategy` the trainer is given (default :class:`SingleProcess`); the loop has
no branch on it. What the run directory holds and what is resumed is decided by
:func:`~latentmoe.train.run_dir.plan_run` before anything is written.

Library code here never prints: progress goes to a tqdm bar when ``progress=True`` and every
metrics record to the ``on_log`` callback.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentmoe.checkpoint import RUN_KIND, checkpoint_step, latest_checkpoint, load_config
from latentmoe.config import ModelConfig
from latentmoe.data.batching import TokenBatch, split_batch
from latentmoe.device import is_cuda
from latentmoe.model.mtp import causal_lm_loss
from latentmoe.train.config import TrainConfig
from latentmoe.train.evaluate import autocast, evaluate
from latentmoe.train.metrics import (
    METRICS_FILE,
    MetricsWriter,
    NullMetrics,
    expert_load_max_over_mean,
    plot_expert_load,
    plot_loss,
)
from latentmoe.train.optim import lr_at
from latentmoe.train.run_dir import RunPlan, claim_run_file, plan_run
from latentmoe.train.strategy import SingleProcess, StepLoss, Strategy

log = logging.getLogger("latentmoe")

LOSS_PLOT = "loss.png"
EXPERT_LOAD_PLOT = "expert_load.png"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_EXIT_BASE = 128  # shells report death by signal N as 128 + N

BatchFn = Callable[[int], "torch.Tensor | TokenBatch"]
ValFn = Callable[[], "float | Iterable[torch.Tensor | TokenBatch]"]

__all__ = ["DataInfo", "RankBatches", "TrainConfig", "TrainResult", "Trainer", "TrainingError", "TrainingInterrupted",
           "evaluate", "train"]


@dataclass(frozen=True)
class RankBatches:
    """A batch source that reads only this rank's rows of every global batch (what a prepared dataset does).

    ``rows(step, rank=r, world_size=W)`` returns rows ``[r·B/W, (r+1)·B/W)`` of step's global ``[B, S]`` batch
    (a tensor or a :class:`~latentmoe.data.batching.TokenBatch`), a pure function of the step like any
    ``batch_fn``. The trainer takes ``(r, W)`` from ``strategy.batch_rows()`` and does not call ``shard_batch``:
    no rank builds the rows it would throw away. A plain ``batch_fn`` returns the global batch instead.
    """

    rows: Callable[..., torch.Tensor | TokenBatch]


@dataclass(frozen=True)
class DataInfo:
    """What a run trains on, for its metrics, checkpoints and summary.

    path: the prepared dataset (or SFT file); manifest_sha256: SHA-256 of its manifest (of the SFT file, for
    chat data) — which exact data this is; train_tokens: tokens in one pass over the training stream.
    """

    path: str
    manifest_sha256: str
    train_tokens: int
    sampling: str = "random"

    def epochs(self, tokens_seen: int) -> float:
        """Passes over the training stream that ``tokens_seen`` tokens amount to."""
        return tokens_seen / self.train_tokens if self.train_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "manifest_sha256": self.manifest_sha256, "train_tokens": self.train_tokens,
                "sampling": self.sampling}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, non-finite weights, or the checkpoint does not fit the run)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during training. ``checkpoint`` is where the run was saved (None if nothing could be);
    ``exit_status`` is what a shell reports for that signal (130, 143)."""

    def __init__(self, checkpoint: Path | None, step: int, signum: int = signal.SIGINT) -> None:
        where = f"saved {checkpoint}" if checkpoint is not None else "no consistent state to save"
        super().__init__(f"training interrupted at step {step}; {where}")
        self.checkpoint = checkpoint
        self.step = step
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        return SIGNAL_EXIT_BASE + self.signum


@dataclass
class TrainResult:
    """What a finished run reports. Losses are nats/token; ``final_loss`` is the mean of the last logged window
    with a finite step, logged at ``final_loss_step``."""

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
    final_loss_step: int | None = None
    tokens_seen: int = 0
    initial_val_loss: float | None = None
    data: DataInfo | None = None


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


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one float64 sum per tensor: NaN and inf propagate)."""
    sums = [t.detach().sum(dtype=torch.float64) for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point()]
    return bool(torch.stack(sums).isfinite().all()) if sums else True


def moe_layer_labels(model: nn.Module) -> list[str]:
    """Row labels for ``expert_load``: main-model MoE layers by index, then the MTP blocks (a model holding only
    part of the layers, e.g. one pipeline stage, names the rows itself with ``moe_layer_labels()``)."""
    if hasattr(model, "moe_layer_labels"):
        return model.moe_layer_labels()
    try:
        labels = [f"layer {i}" for i, b in enumerate(model.model.layers) if b.is_moe]
        labels += [f"MTP {k}" for k, m in enumerate(model.mtp, 1) if m.block.is_moe]
        return labels
    except AttributeError:
        return [f"MoE {i}" for i in range(len(model.moe_layers()))]


class Trainer:
    """Owns the model, optimizer and counters of one run; :meth:`run` trains to ``cfg.steps``.

    ``batch_fn(step)`` must return the ``[batch, seq]`` LongTensor for that step (the *global* batch; or a
    :class:`~latentmoe.data.batching.TokenBatch` whose loss mask says which targets count; or be a
    :class:`RankBatches` that returns this rank's rows only) and depend only on the step (and a seed fixed for
    the run) — that is what makes resume exact. ``val_fn()`` returns either the validation loss itself or an
    iterable of validation batches. ``strategy`` lays the run over processes (default: one). The model must
    already be on its device; batches follow it. ``kind`` is what the run directory's marker says ("run"; the
    demo uses "demo"). ``data`` describes the training data for the metrics (epochs, manifest hash) and the
    checkpoints; ``eval_at_start`` validates once before the first step of a fresh run (logged as step 0).
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
        handle_signals: bool = True,
        strategy: Strategy | None = None,
        kind: str = RUN_KIND,
        data: DataInfo | None = None,
        eval_at_start: bool = False,
    ) -> None:
        self.cfg = cfg.validate().check_model(model.config)
        self.strategy: Strategy = strategy or SingleProcess()
        self.is_main = self.strategy.is_main
        self.model = model
        self.model_config: ModelConfig = model.config
        self.batch_fn = batch_fn
        self.val_fn = val_fn
        self.progress = progress
        self.on_log = on_log
        self.handle_signals = handle_signals
        self.kind = kind
        self.data = data
        self.eval_at_start = eval_at_start
        self.initial_val_loss: float | None = None
        self.out_dir = Path(cfg.out_dir)
        self.device = next(model.parameters()).device
        if cfg.precision == "fp8":
            from latentmoe.fp8 import convert_to_fp8

            # In place, sharing the Parameter objects: state dicts and checkpoints stay fp32.
            convert_to_fp8(model)
        self.optimizer = self.strategy.make_optimizer(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, moments=cfg.adam_moments
        )
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.tokens_seen = 0
        self.tokens_per_s_history: list[float] = []
        self.last_loss: float | None = None
        self.last_loss_step: int | None = None
        self.last_val_loss: float | None = None
        self.last_expert_load: torch.Tensor | None = None
        self._stop_signal: int | None = None
        self._stop_agreed = False
        self._in_update = False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON trainer state stored in ``trainer_state.json`` (the step is added by the checkpoint)."""
        state = {
            "seed": self.cfg.seed,
            "data": {"seed": self.cfg.seed, "next_step": self.step,
                     **({"dataset": self.data.to_dict()} if self.data is not None else {})},
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s_history": self.tokens_per_s_history,
            "last_loss": self.last_loss,
            "last_loss_step": self.last_loss_step,
            "last_val_loss": self.last_val_loss,
            "initial_val_loss": self.initial_val_loss,
            "last_expert_load": (
                None if self.last_expert_load is None else self.last_expert_load.double().round(decimals=4).tolist()
            ),
            "torch_rng_state": _encode_rng(torch.get_rng_state()),
            "train_config": self.cfg.to_dict(),
        }
        if is_cuda(self.device):
            state["cuda_rng_state"] = _encode_rng(torch.cuda.get_rng_state(self.device))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.tokens_per_s_history = [float(x) for x in state.get("tokens_per_s_history", [])]
        self.last_loss = state.get("last_loss")
        self.last_loss_step = state.get("last_loss_step")
        self.last_val_loss = state.get("last_val_loss")
        load = state.get("last_expert_load")
        self.last_expert_load = None if load is None else torch.tensor(load, dtype=torch.float32)
        self.initial_val_loss = state.get("initial_val_loss")
        saved = (state.get("data") or {}).get("dataset") or {}
        if self.data is not None and saved and saved.get("manifest_sha256") != self.data.manifest_sha256:
            log.warning(
                "the checkpoint of step %d was trained on %s (manifest sha256 %s...), this run reads %s (%s...): "
                "from here on the batches are not those the original run would have read", self.step,
                saved.get("path"), str(saved.get("manifest_sha256"))[:12], self.data.path,
                self.data.manifest_sha256[:12],
            )
        torch.set_rng_state(_decode_rng(state["torch_rng_state"]))
        if is_cuda(self.device) and "cuda_rng_state" in state:
            torch.cuda.set_rng_state(_decode_rng(state["cuda_rng_state"]), self.device)

    def save(self) -> Path:
        """Checkpoint the current step (every rank takes part). Non-finite weights are never saved."""
        if not self.strategy.all_finite(weights_finite(self.model)):
            raise TrainingError(
                f"the weights are not finite at step {self.step}; not saved (the newest checkpoint, "
                f"{latest_checkpoint(self.out_dir)}, is the last good one)"
            )
        return self.strategy.save_checkpoint(
            self.out_dir, self.step, self.model, self.optimizer, self.state_dict(), self.model_config,
            keep_last=self.cfg.keep_last, owner_kind=self.kind,
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any] | None:
        """Run optimizer step ``step`` (0-based). Returns its losses, or None when it was skipped."""
        cfg = self.cfg
        lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup, total_steps=cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids, loss_mask, tokens = self.batch(step)
        self.strategy.begin_step(self.model)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Forward, loss and backward (a pipeline schedule interleaves them over micro-batches); the losses are global
        # means and the stop flag rides along, so every rank takes the same branch below.
        step_stats = self.strategy.forward_backward(
            self.model, ids, self.loss, forward_context=lambda: autocast(self.device, cfg.precision),
            stop=self._stop_signal is not None, loss_mask_bS=loss_mask,
        )
        stats, self._stop_agreed = step_stats.losses, step_stats.stop
        if not stats.finite:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        grad_norm = self.strategy.reduce_and_clip(self.model, cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self._in_update = True
        self.optimizer.step()
        if not self.strategy.all_finite(weights_finite(self.model)):
            raise TrainingError(
                f"the weights became non-finite in step {step} (lr {lr:g}); stopped without saving — the newest "
                f"checkpoint, {latest_checkpoint(self.out_dir)}, is the last good one"
            )
        # The router bias is a buffer, not a parameter: it moves by ±γ outside autograd, after the
        # weights, using the load of this step's whole global batch, and only changes which experts are selected.
        load = step_stats.expert_load
        self.model.update_router_biases(load, cfg.bias_gamma)
        self._in_update = False
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.end_step(self.model)
        return {
            "lr": lr,
            "main": stats.main,
            "mtp": stats.mtp,
            "balance": stats.balance,
            "grad_norm": grad_norm.item(),
            "load": load.detach().float().cpu(),
            "tokens": tokens,
        }

    def loss(self, out: Any, ids_bS: torch.Tensor, loss_mask_bS: torch.Tensor | None = None) -> StepLoss:
        """The training loss of one forward: main + λ/D·Σ_k mtp_k + α·balance (TR §2.1.2, §2.2); with a mask
        (SFT), only the targets it marks count."""
        cfg = self.cfg
        losses = causal_lm_loss(out, ids_bS, mtp_lambda=cfg.mtp_lambda, loss_mask_BS=loss_mask_bS)
        total = losses.total
        if cfg.balance_alpha and out.balance_loss is not None:
            total = total + cfg.balance_alpha * out.balance_loss
        return StepLoss(total, losses.main, losses.mtp, out.balance_loss)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """This rank's ids ``[b, S]`` and loss mask (None: every target counts) of ``step``, on the model's
        device, and the number of tokens in the *global* batch (whatever the world size)."""
        if isinstance(self.batch_fn, RankBatches):
            rank, count = self.strategy.batch_rows()
            batch = self.batch_fn.rows(step, rank=rank, world_size=count)
            tokens = batch.numel() * count
        else:
            batch = self.batch_fn(step)
            tokens = batch.numel()
            batch = self.strategy.shard_batch(batch)  # this rank's rows
        ids, loss_mask = split_batch(batch.to(self.device))
        return ids, loss_mask, tokens

    def validation_loss(self) -> float | None:
        if self.val_fn is None:
            return None
        result = self.val_fn()
        if isinstance(result, int | float):
            return float(result)
        return self.strategy.evaluate(self.model, result, max_batches=self.cfg.eval_batches,
                                      precision=self.cfg.precision)

    # ------------------------------------------------------------------ the loop
    def plan(self, *, resume: bool | str = False, overwrite: bool = False) -> RunPlan:
        """Decide what this run does with its directory (rank 0 decides, every rank learns the answer)."""
        plan = plan_run(self.out_dir, resume=resume, overwrite=overwrite, kind=self.kind) if self.is_main else None
        return self.strategy.broadcast_object(plan)

    def run(self, *, resume: bool | str = False, overwrite: bool = False, plan: RunPlan | None = None) -> TrainResult:
        """Train from scratch, or from the newest valid checkpoint in ``out_dir`` (``resume``: False/"no",
        True/"required", "auto"; see :mod:`latentmoe.train.run_dir`), to ``cfg.steps``."""
        cfg = self.cfg
        plan = plan or self.plan(resume=resume, overwrite=overwrite)
        resumed_from = plan.checkpoint
        if resumed_from is not None:
            state = self.strategy.load_checkpoint(resumed_from, self.model, self.optimizer, check_hashes=False)
            if state.get("seed") != cfg.seed:
                raise TrainingError(
                    f"{resumed_from} was trained with seed {state.get('seed')}, not {cfg.seed}; "
                    "an exact resume needs the same seed (same data stream)"
                )
            self.load_state_dict(state)
        else:
            torch.manual_seed(cfg.seed)
        resume_step = self.step if resumed_from is not None else None
        metrics = MetricsWriter(self.out_dir, resume_step=resume_step) if self.is_main else NullMetrics()
        if self.is_main:
            claim_run_file(self.out_dir, METRICS_FILE, kind=self.kind)
        checkpoint: Path | None = resumed_from
        try:
            with self._signals_deferred():
                checkpoint = self._loop(metrics) or checkpoint
        finally:
            metrics.close()
        if checkpoint is None or checkpoint_step(checkpoint) != self.step:
            checkpoint = self.save()
        loss_png = self.out_dir / LOSS_PLOT
        load_png = self.out_dir / EXPERT_LOAD_PLOT if self.last_expert_load is not None else None
        if self.is_main:
            plot_loss(self.out_dir / METRICS_FILE, loss_png)
            claim_run_file(self.out_dir, LOSS_PLOT, kind=self.kind)
            if load_png is not None:
                plot_expert_load(
                    self.last_expert_load, load_png, title="Expert load, last logged window",
                    layer_labels=moe_layer_labels(self.model),
                )
                claim_run_file(self.out_dir, EXPERT_LOAD_PLOT, kind=self.kind)
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
            final_loss_step=self.last_loss_step,
            tokens_seen=self.tokens_seen,
            initial_val_loss=self.initial_val_loss,
            data=self.data,
        )

    def _loop(self, metrics: MetricsWriter | NullMetrics) -> Path | None:
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
        if self.eval_at_start and self.step == 0 and self.val_fn is not None:
            self._initial_validation(metrics)
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
                    if self.data is not None:
                        postfix["epochs"] = f"{self.data.epochs(self.tokens_seen):.3g}"
                    bar.set_postfix(postfix, refresh=False)
                    window = _Window()
                if cfg.save_every and done % cfg.save_every == 0 and not is_last:
                    checkpoint = self.save()
                # A signal counts once every rank knows of it (it rides on the loss all-reduce).
                if self._stop_agreed and not is_last:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            signum = self._stop_signal if self._stop_signal is not None else signal.SIGINT
            if self._in_update:
                raise TrainingInterrupted(latest_checkpoint(self.out_dir), self.step, signum) from None
            if checkpoint is not None and checkpoint_step(checkpoint) == self.step:
                raise TrainingInterrupted(checkpoint, self.step, signum) from None
            raise TrainingInterrupted(self.save(), self.step, signum) from None
        finally:
            bar.close()
        return checkpoint

    def _record(self, window: _Window, *, lr: float | None, val_loss: float | None) -> dict[str, Any]:
        n = window.finite_steps
        loss = window.loss / n if n else None
        mtp_per_depth = [x / n for x in window.mtp] if n else []
        ratios = expert_load_max_over_mean(window.load) if window.load is not None else []
        tokens_per_s = window.tokens / window.seconds if window.seconds > 0 and window.tokens else None
        if loss is not None and math.isfinite(loss):
            self.last_loss, self.last_loss_step = loss, self.step
        if window.load is not None:
            self.last_expert_load = window.load / n
        if tokens_per_s is not None:
            self.tokens_per_s_history.append(tokens_per_s)
        cfg = self.cfg
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "mtp_loss": sum(mtp_per_depth) / len(mtp_per_depth) if mtp_per_depth else None,
            "mtp_losses": mtp_per_depth,
            "balance_loss": window.balance / n if n else None,
            "grad_norm": window.grad_norm / n if n else None,
            "lr": lr if lr is not None else lr_at(
                self.step - 1, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup, total_steps=cfg.steps
            ),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "expert_load_max_over_mean": ratios,
            "expert_load_max_over_mean_mean": sum(ratios) / len(ratios) if ratios else None,
            "skipped_steps": self.skipped_steps,
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        record.update(self._data_fields())
        record.update(self.strategy.window_metrics(window.steps))  # e.g. a2a_* traffic (collective)
        return record

    def _data_fields(self) -> dict[str, Any]:
        if self.data is None:
            return {}
        return {"dataset_epochs": self.data.epochs(self.tokens_seen),
                "dataset_manifest_sha256": self.data.manifest_sha256}

    def _initial_validation(self, metrics: MetricsWriter | NullMetrics) -> None:
        """Validation before any update (the starting point of a fine-tune), logged as step 0."""
        val_loss = self.validation_loss()
        self.initial_val_loss = _finite(val_loss)
        record = metrics.write({"step": 0, "val_loss": val_loss, "tokens_seen": 0, **self._data_fields()})
        if self.on_log is not None:
            self.on_log(record)

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Turn the first SIGINT or SIGTERM into "stop after this step"; a second one acts at once."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def request_stop(signum: int, frame: object) -> None:
            self._stop_signal = signum
            for s, handler in previous.items():
                signal.signal(s, handler)

        for s in STOP_SIGNALS:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def train(
    cfg: TrainConfig,
    *,
    batch_fn: BatchFn,
    model: nn.Module | None = None,
    val_fn: ValFn | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    progress: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    handle_signals: bool = True,
    strategy: Strategy | None = None,
    kind: str = RUN_KIND,
) -> TrainResult:
    """Train to ``cfg.steps`` and return a :class:`TrainResult`; see the module docstring for one step.

    Without ``model``, a ``CausalLM`` is built from ``cfg.preset`` after ``torch.manual_seed(cfg.seed)`` — or,
    when resuming, from the checkpoint's ``config.json``. Writes ``metrics.jsonl``, ``checkpoint-STEP/`` (every
    ``save_every`` steps and at the end), ``loss.png`` and ``expert_load.png`` under ``cfg.out_dir``. Raises
    :class:`TrainingInterrupted` on SIGINT/SIGTERM (after saving), :class:`TrainingError` when training diverges,
    and :class:`~latentmoe.train.run_dir.RunDirectoryError` when ``out_dir`` cannot be used as asked.
    """
    strategy = strategy or SingleProcess()
    plan = None
    if model is None:
        from latentmoe import CausalLM

        plan = strategy.broadcast_object(
            plan_run(cfg.out_dir, resume=resume, overwrite=overwrite, kind=kind) if strategy.is_main else None
        )
        config = load_config(plan.checkpoint) if plan.checkpoint is not None else ModelConfig.from_preset(cfg.preset)
        torch.manual_seed(cfg.seed)
        model = CausalLM(config)
    trainer = Trainer(
        cfg,
        model=model,
        batch_fn=batch_fn,
        val_fn=val_fn,
        progress=progress,
        on_log=on_log,
        handle_signals=handle_signals,
        strategy=strategy,
        kind=kind,
    )
    return trainer.run(resume=resume, overwrite=overwrite, plan=plan)
