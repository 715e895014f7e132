"""Training on the shipped corpus end to end: plan the run directory, build the model, prepare the data, train.

This is what ``latentmoe train`` and the demo call. The strategy (one process, or expert + data parallel under
torchrun) is chosen by the caller and only used through its protocol; the model is built on the host with the
run's seed (so the same seed gives the same initial weights on every device) and moved to ``device``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentmoe.checkpoint import RUN_KIND, load_config
from latentmoe.config import ModelConfig
from latentmoe.config import load_config as load_model_config
from latentmoe.data import random_windows, val_batches
from latentmoe.data.shipped import PreparedData, prepare_shipped_data
from latentmoe.device import resolve_device
from latentmoe.io import atomic_path
from latentmoe.train.config import TrainConfig
from latentmoe.train.run_dir import RunDirectoryError, claim_run_file, plan_run
from latentmoe.train.strategy import SingleProcess, Strategy
from latentmoe.train.trainer import Trainer, TrainResult

TOKENIZER_FILE = "tokenizer.json"


def model_config_for(spec: str | None, checkpoint: Path | None, default: str) -> ModelConfig:
    """The model to train: the checkpoint's when resuming (an explicit ``spec`` must then describe the same model),
    else the preset or config.json ``spec`` (``default`` when None)."""
    if checkpoint is None:
        return load_model_config(spec or default)
    saved = load_config(checkpoint)
    if spec is not None and load_model_config(spec).to_dict() != saved.to_dict():
        raise RunDirectoryError(
            f"--preset {spec} describes another model than {checkpoint} was trained with; resume without --preset "
            "(the checkpoint's config.json is used) or start a new run directory"
        )
    return saved


def train_on_corpus(
    cfg: TrainConfig,
    *,
    model_spec: str | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    replace_own: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    strategy: Strategy | None = None,
    device: str | torch.device | None = None,
    kind: str = RUN_KIND,
) -> tuple[TrainResult, PreparedData]:
    """Train the model described by ``model_spec`` (preset name or config.json; default ``cfg.preset``) on the
    shipped corpus. On resume the model comes from the checkpoint. The tokenizer is saved as
    ``out_dir/tokenizer.json`` so that ``generate`` finds it next to the checkpoints. ``cfg.batch_size`` is the
    global batch whatever the strategy."""
    strategy = strategy or SingleProcess()
    device = resolve_device(device)
    out_dir = Path(cfg.out_dir)
    cfg.validate()
    plan = strategy.broadcast_object(
        plan_run(out_dir, resume=resume, overwrite=overwrite, replace_own=replace_own, kind=kind)
        if strategy.is_main else None
    )
    config = model_config_for(model_spec, plan.checkpoint, cfg.preset)
    cfg.check_model(config)
    if not strategy.is_main:
        strategy.barrier()  # rank 0 trains and caches the tokenizer first; the others then read the cache
    data = prepare_shipped_data(config.vocab_size, cache_dir)
    torch.manual_seed(cfg.seed)
    model = strategy.prepare_model(_build(config, device))
    train_ids, val_ids = data.train_ids, data.val_ids

    def batch_fn(step: int) -> torch.Tensor:
        return random_windows(train_ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, step=step)

    def val_fn():
        return val_batches(val_ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)

    trainer = Trainer(cfg, model=model, batch_fn=batch_fn, val_fn=val_fn, progress=progress, strategy=strategy,
                      kind=kind)
    if strategy.is_main:
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            data.tokenizer.save(str(tmp))
        claim_run_file(out_dir, TOKENIZER_FILE, kind=kind)
        strategy.record_layout(out_dir, config, kind=kind)
        strategy.barrier()
    return trainer.run(plan=plan), data


def _build(config: ModelConfig, device: torch.device):
    from latentmoe.model.transformer import CausalLM

    return CausalLM(config).to(device)
