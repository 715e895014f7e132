"""End-to-end jobs that tie data, model, trainer and generation together (used by the CLI and the demo).

``train_on_corpus`` trains any config on the shipped corpus; ``run_demo`` is what ``make demo`` runs:
train the ``small`` preset, compare its validation loss with a unigram baseline, write plots, and
sample a few continuations. Nothing here parses argv or prints: results come back as dataclasses.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latentmoe.config import ModelConfig, load_config
from latentmoe.data import (
    encode_splits,
    load_corpus,
    load_or_train_tokenizer,
    random_windows,
    unigram_cross_entropy,
    val_batches,
)
from latentmoe.infer import SamplingParams, generate_text
from latentmoe.model.transformer import CausalLM
from latentmoe.plan import param_count
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.train.checkpoint import latest_checkpoint, load_model, resolve_checkpoint
from latentmoe.train.trainer import TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from latentmoe.parallel.training import ParallelConfig

TOKENIZER_FILE = "tokenizer.json"
CACHE_ENV = "LATENTMOE_CACHE"
DEMO_PROMPTS = ("ROMEO:", "To be, or not to be", "KING HENRY:\nWhat")


@dataclass
class PreparedData:
    tokenizer: object
    train_ids: torch.Tensor
    val_ids: torch.Tensor


def default_cache_dir() -> Path:
    """Where tokenizers and encoded corpora are cached: ``$LATENTMOE_CACHE`` or ~/.cache/latentmoe."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentmoe")


def prepare_data(vocab_size: int, cache_dir: Path | None = None) -> PreparedData:
    """Tokenizer (trained once and cached) and the encoded train/validation token ids."""
    cache_dir = cache_dir or default_cache_dir()
    splits = load_corpus()
    tokenizer = load_or_train_tokenizer(vocab_size, cache_dir)
    tokens = encode_splits(tokenizer, splits, cache_dir)
    return PreparedData(tokenizer, tokens.train, tokens.val)


def train_on_corpus(
    cfg: TrainConfig,
    *,
    model_spec: str,
    resume: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    parallel: ParallelConfig | None = None,
) -> tuple[TrainResult, PreparedData]:
    """Train the model described by ``model_spec`` (preset name or config.json) on the shipped corpus.

    On ``resume`` the model shape comes from the newest checkpoint in ``cfg.out_dir``. The tokenizer is
    copied to ``out_dir/tokenizer.json`` so that ``generate`` finds it next to the checkpoints.
    Under torchrun, ``parallel`` lays the run over the processes (expert + data parallelism,
    ``latentmoe.parallel.training``); ``cfg.batch_size`` stays the global batch.
    """
    from latentmoe.parallel.training import (
        ParallelConfig,
        attach,
        barrier,
        collective_errors,
        start_parallel,
        write_layout,
    )

    groups = start_parallel(parallel or ParallelConfig())
    is_main = groups is None or groups.topology.rank == 0
    out_dir = Path(cfg.out_dir)
    latest = latest_checkpoint(out_dir) if resume else None
    config = ModelConfig.from_json(latest) if latest is not None else load_config(model_spec)
    if not is_main:
        barrier()  # rank 0 trains and caches the tokenizer first; the others then read the cache
    data = prepare_data(config.vocab_size, cache_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_path = out_dir / TOKENIZER_FILE
        tmp = tokenizer_path.with_suffix(".json.tmp")
        data.tokenizer.save(str(tmp))
        tmp.replace(tokenizer_path)
        if groups is not None:
            write_layout(out_dir, groups, parallel or ParallelConfig(), config)
            barrier()

    torch.manual_seed(cfg.seed)
    model = CausalLM(config)
    distributed = attach(model, groups, parallel or ParallelConfig()) if groups is not None else None
    train_ids, val_ids = data.train_ids, data.val_ids

    def batch_fn(step: int) -> torch.Tensor:
        return random_windows(train_ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, step=step)

    def val_fn():
        return val_batches(val_ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)

    with collective_errors(groups, (parallel or ParallelConfig()).timeout_s):
        result = train(
            cfg, batch_fn=batch_fn, model=model, val_fn=val_fn, resume=resume, progress=progress,
            distributed=distributed,
        )
    return result, data


def find_tokenizer(checkpoint: Path):
    """``tokenizer.json`` inside the checkpoint directory or in its run directory."""
    from tokenizers import Tokenizer

    for candidate in (checkpoint / TOKENIZER_FILE, checkpoint.parent / TOKENIZER_FILE):
        if candidate.is_file():
            return Tokenizer.from_file(str(candidate))
    raise FileNotFoundError(f"no {TOKENIZER_FILE} in {checkpoint} or {checkpoint.parent}")


def load_for_generation(checkpoint: str | Path):
    """``(model, tokenizer)`` from a checkpoint directory, a run directory (its newest checkpoint), or a
    Hugging Face DeepSeek-V3/V2 directory (config.json + safetensors + tokenizer.json; FP8 is dequantised)."""
    from latentmoe.hf import is_hf_checkpoint, load_pretrained, load_tokenizer

    if is_hf_checkpoint(checkpoint):
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer is None:
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {checkpoint}")
        return load_pretrained(checkpoint), tokenizer
    path = resolve_checkpoint(checkpoint)
    model, _ = load_model(path)
    return model, find_tokenizer(path)


@dataclass
class DemoResult:
    train: TrainResult
    unigram_val_loss: float
    num_parameters: int
    num_active_parameters: int
    samples: list[tuple[str, str]] = field(default_factory=list)


def active_parameters(config: ModelConfig) -> int:
    """Parameters used per token by the main model (embedding and head included, MTP excluded) —
    the planner's count, so the demo and ``latentmoe plan`` agree."""
    return param_count(arch_from_model_config(config, "model")).active


def run_demo(
    cfg: TrainConfig,
    *,
    model_spec: str = "small",
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    sample_tokens: int = 80,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> DemoResult:
    """Train on the shipped corpus from scratch (a previous demo run in ``out_dir`` is replaced),
    then sample continuations of ``prompts`` from the final checkpoint."""
    out_dir = Path(cfg.out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    result, data = train_on_corpus(cfg, model_spec=model_spec, progress=progress, cache_dir=cache_dir)
    model, _ = load_model(result.checkpoint)
    vocab = model.config.vocab_size
    unigram = unigram_cross_entropy(data.train_ids, data.val_ids, vocab)
    samples = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=sample_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed + i)
        samples.append((prompt, generate_text(model, data.tokenizer, prompt, params)))
    return DemoResult(
        train=result,
        unigram_val_loss=unigram,
        num_parameters=model.num_parameters(),
        num_active_parameters=active_parameters(model.config),
        samples=samples,
    )
