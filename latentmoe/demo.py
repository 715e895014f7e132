"""What ``make demo`` runs: train the ``small`` preset on the shipped corpus, compare its validation loss with a
unigram baseline, write the plots, and sample a few continuations. Nothing here parses argv or prints.

The shipped corpus is read as every dataset is: prepared once into token shards (``prepare_shipped_corpus``,
cached under ``$LATENTMOE_CACHE``) and read by ``train_on_corpus`` like ``latentmoe train --data DIR``.

The demo's run directory is marked as a demo run (``.latentmoe.json``): running the demo again replaces the
previous demo's files — and only those; a directory holding anything else is refused unless ``overwrite``, which
keeps the other files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentmoe.checkpoint import load_model
from latentmoe.config import ModelConfig
from latentmoe.data import unigram_cross_entropy
from latentmoe.device import resolve_device
from latentmoe.infer import SamplingParams, generate_text
from latentmoe.plan import param_count
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.train import DEMO_KIND, TrainConfig, TrainResult
from latentmoe.train.run import train_on_corpus

DEMO_PROMPTS = ("ROMEO:", "To be, or not to be", "KING HENRY:\nWhat")
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.95


@dataclass
class DemoResult:
    train: TrainResult
    unigram_val_loss: float
    num_parameters: int
    num_active_parameters: int
    samples: list[tuple[str, str]] = field(default_factory=list)


def active_parameters(config: ModelConfig) -> int:
    """Parameters used per token by the main model (embedding and head included, MTP excluded) — the planner's
    count, so the demo and ``latentmoe plan`` agree."""
    return param_count(arch_from_model_config(config, "model")).active


def run_demo(
    cfg: TrainConfig,
    *,
    model_spec: str | None = None,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    sample_tokens: int = 80,
    progress: bool = True,
    cache_dir: Path | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> DemoResult:
    """Train from scratch (a previous demo run in ``cfg.out_dir`` is replaced), then sample continuations of
    ``prompts`` from the final checkpoint."""
    device = resolve_device(device)
    result, data = train_on_corpus(
        cfg, model_spec=model_spec, progress=progress, cache_dir=cache_dir, overwrite=overwrite, replace_own=True,
        device=device, kind=DEMO_KIND,
    )
    model, _ = load_model(result.checkpoint, device=device)
    vocab = model.config.vocab_size
    unigram = unigram_cross_entropy(data.dataset.ids("train"), data.dataset.ids("val"), vocab)
    samples = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=sample_tokens, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P,
                                seed=cfg.seed + i)
        samples.append((prompt, generate_text(model, data.tokenizer.tokenizer, prompt, params)))
    return DemoResult(
        train=result,
        unigram_val_loss=unigram,
        num_parameters=model.num_parameters(),
        num_active_parameters=active_parameters(model.config),
        samples=samples,
    )
