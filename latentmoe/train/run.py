"""Training runs end to end — what ``latentmoe train`` and the demo call: open the data, plan the run directory,
build or load the model, check that model and data fit, train.

**Data** (exactly one of):

- ``data=DIR``: a dataset written by ``latentmoe prepare-data`` (memory-mapped token shards; docs/data.md),
  read in random windows or a sequential pass (``sampling``);
- ``sft=FILE.jsonl``: chat conversations, rendered by the checkpoint's chat template (or the default one) with
  a loss only on the assistant's tokens, one padded row per conversation (:mod:`latentmoe.data.chat`);
- neither: the shipped Shakespeare corpus, prepared once as a dataset (``prepare_shipped_corpus``, cached) with
  a tokenizer of the model's vocabulary size — the same token streams and windows the demo has always used.

Each data-parallel rank reads only its own rows of every batch (:class:`~latentmoe.train.trainer.RankBatches`);
the validation batches are fixed at the start (``eval_batches`` of them).

**Model** (exactly one of): a fresh one from ``model_spec`` (a preset or config.json; trained on a prepared
dataset, its ``vocab_size`` and BOS/EOS ids are set to the dataset tokenizer's, which defines the
vocabulary), ``init_from`` a checkpoint (ours or Hugging Face: :mod:`latentmoe.train.init_from`; fresh
optimizer and schedule; validated once before the first step), or the run's own newest checkpoint when resuming
(``resume``; ``init_from`` is then not read again). The data must be tokenised with the model's tokenizer: a
dataset whose tokenizer has another vocabulary than the checkpoint's, more tokens than the model, or other
BOS/EOS ids is refused with one line, before the run directory is touched where that can be known.

The run directory gets ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens and, for chat
fine-tuning, the chat template used), so ``generate`` and ``eval`` find them beside the checkpoints.
``cfg.batch_size`` is the global batch whatever the strategy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latentmoe.checkpoint import RUN_KIND, CheckpointError, load_config
from latentmoe.config import ModelConfig
from latentmoe.config import load_config as load_model_config
from latentmoe.data.chat import DEFAULT_VAL_FRACTION, ChatDataset
from latentmoe.data.dataset import SAMPLING_MODES, TokenDataset
from latentmoe.data.prepare import prepare_shipped_corpus
from latentmoe.data.shards import DatasetError
from latentmoe.data.sources import DataSourceError
from latentmoe.device import resolve_device
from latentmoe.hf.tokenizer import HFTokenizer, as_hf_tokenizer, chat_template_of, load_tokenizer
from latentmoe.hf.tokenizer import tokenizer_config_text as hf_tokenizer_config_text
from latentmoe.io import atomic_path, write_text_atomic
from latentmoe.train.config import TrainConfig
from latentmoe.train.init_from import LoadReport, PretrainedSource, load_pretrained_weights, open_pretrained
from latentmoe.train.run_dir import RunDirectoryError, claim_run_file, plan_run
from latentmoe.train.strategy import SingleProcess, Strategy
from latentmoe.train.trainer import DataInfo, RankBatches, Trainer, TrainResult

log = logging.getLogger("latentmoe")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SHIPPED_CORPUS = "the shipped corpus"


@dataclass
class RunData:
    """What a run trained on. ``tokenizer``: the model's (special tokens, chat template); ``dataset``: the prepared
    dataset (None for chat data); ``chat``: the conversations (None otherwise); ``info``: path, manifest hash,
    tokens per epoch; ``label``: how the summary names it; ``init``: what ``init_from`` loaded (None otherwise)."""

    tokenizer: HFTokenizer
    info: DataInfo
    label: str
    dataset: TokenDataset | None = None
    chat: ChatDataset | None = None
    init: LoadReport | None = None


def model_config_for(spec: str | None, checkpoint: Path | None, default: str, *,
                     dataset: TokenDataset | None = None) -> ModelConfig:
    """The model to train: the checkpoint's when resuming (an explicit ``spec`` must then describe the same model),
    else the preset or config.json ``spec`` (``default`` when None), fitted to ``dataset``'s tokenizer."""
    if checkpoint is None:
        return fit_vocabulary(load_model_config(spec or default), dataset)
    saved = load_config(checkpoint)
    if spec is not None and fit_vocabulary(load_model_config(spec), dataset).to_dict() != saved.to_dict():
        raise RunDirectoryError(
            f"--preset {spec} describes another model than {checkpoint} was trained with; resume without --preset "
            "(the checkpoint's config.json is used) or start a new run directory"
        )
    return saved


def fit_vocabulary(config: ModelConfig, dataset: TokenDataset | None) -> ModelConfig:
    """A fresh model for ``dataset``: its tokenizer's vocabulary size and BOS/EOS ids (the config unchanged
    without a dataset)."""
    if dataset is None:
        return config
    fitted = config.replace(vocab_size=dataset.vocab_size, bos_token_id=dataset.bos_id, eos_token_id=dataset.eos_id)
    if fitted.to_dict() != config.to_dict():
        log.info("the model takes the dataset's vocabulary: vocab_size %d (the preset has %d), BOS %d, EOS %d",
                 dataset.vocab_size, config.vocab_size, dataset.bos_id, dataset.eos_id)
    return fitted


def check_tokenizer_matches(dataset: TokenDataset, tokenizer: HFTokenizer, *, owner: str) -> None:
    """The dataset must be tokenised with the model's tokenizer (the same vocabulary, id for id)."""
    theirs = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    if dataset.tokenizer.get_vocab(with_added_tokens=True) != theirs:
        sizes = f"{dataset.vocab_size} tokens vs {len(theirs)}" if dataset.vocab_size != len(theirs) else \
            "the same size, other tokens"
        raise DatasetError(
            f"{dataset.path}: prepared with another tokenizer than {owner}'s ({sizes}); prepare the data with "
            f"--tokenizer {owner}"
        )


def train_on_corpus(
    cfg: TrainConfig,
    *,
    model_spec: str | None = None,
    data: str | os.PathLike | None = None,
    sampling: str = "random",
    init_from: str | os.PathLike | None = None,
    sft: str | os.PathLike | None = None,
    sft_val_fraction: float = DEFAULT_VAL_FRACTION,
    verify_data: bool = True,
    resume: bool | str = False,
    overwrite: bool = False,
    replace_own: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    strategy: Strategy | None = None,
    device: str | torch.device | None = None,
    kind: str = RUN_KIND,
    on_log=None,
) -> tuple[TrainResult, RunData]:
    """Train (see the module docstring) and return the result and what it trained on.

    ``on_log(record)`` is called with every metrics record, on rank 0 only (the CLI prints a line per record
    when there is no progress bar).

    ``verify_data``: rank 0 checks every shard's SHA-256 against the manifest before training (the others, and
    every rank without it, check sizes only) — off for a dataset too large to read once at start."""
    strategy = strategy or SingleProcess()
    device = resolve_device(device)
    out_dir = Path(cfg.out_dir)
    cfg.validate()
    _check_options(out_dir, data=data, sft=sft, init_from=init_from, model_spec=model_spec, sampling=sampling)

    # Everything that can be checked before the run directory is touched.
    dataset = TokenDataset.open(data, verify_hashes=verify_data and strategy.is_main) if data is not None else None
    if dataset is not None and dataset.train_tokens < cfg.seq_len:
        raise DatasetError(f"{dataset.path}: the training split holds {dataset.train_tokens} tokens, fewer than "
                           f"--seq-len {cfg.seq_len}")
    source = open_pretrained(init_from) if init_from is not None else None
    if source is not None and dataset is not None:
        _check_fit(dataset, source.config, source.tokenizer, owner=str(init_from))
    chat = None
    if source is not None and sft is not None:
        chat = _read_chat(sft, source.tokenizer, source.config, val_fraction=sft_val_fraction)

    plan = strategy.broadcast_object(
        plan_run(out_dir, resume=resume, overwrite=overwrite, replace_own=replace_own, kind=kind)
        if strategy.is_main else None
    )
    resuming = plan.checkpoint is not None
    if resuming and source is not None:
        log.info("resuming %s: --init-from %s is not read again", plan.checkpoint, source.path)
    if resuming:
        config = model_config_for(model_spec, plan.checkpoint, cfg.preset, dataset=dataset)
        tokenizer = _run_tokenizer(out_dir, config)
        if tokenizer is None and sft is not None:
            raise CheckpointError(f"{out_dir}: no {TOKENIZER_FILE} beside the checkpoints (needed to render --sft)")
        if dataset is not None:
            dataset.check_model(config.vocab_size, bos_token_id=config.bos_token_id,
                                eos_token_id=config.eos_token_id)
            if tokenizer is not None:
                check_tokenizer_matches(dataset, tokenizer, owner=str(out_dir))
    elif source is not None:
        config, tokenizer = source.config, source.tokenizer
    else:
        if sft is not None:
            raise RunDirectoryError("--sft needs --init-from (the model to fine-tune, with its tokenizer)")
        config = model_config_for(model_spec, None, cfg.preset, dataset=dataset)
        tokenizer = None
    cfg.check_model(config)
    if sft is not None and chat is None:
        chat = _read_chat(sft, tokenizer, config, val_fraction=sft_val_fraction)

    if not strategy.is_main:
        strategy.barrier()  # rank 0 goes first: prepares the shipped corpus, verifies checkpoints
    label = str(sft if sft is not None else data if data is not None else SHIPPED_CORPUS)
    if chat is None and dataset is None:
        dataset = prepare_shipped_corpus(cache_dir, config.vocab_size)
        if tokenizer is not None:  # a checkpoint's model: the corpus must be tokenised as it was
            owner = str(init_from) if source is not None and not resuming else str(out_dir)
            _check_fit(dataset, config, tokenizer, owner=owner)
    if tokenizer is None:
        tokenizer = _bare(dataset.tokenizer, config)

    init = None
    if source is not None and not resuming:
        model, init = _load_model(source, config, strategy=strategy, device=device, seed=cfg.seed)
    else:
        torch.manual_seed(cfg.seed)
        model = strategy.prepare_model(_build(config, device))

    if chat is not None:
        batch_fn, val, info = _chat_source(chat, cfg, sampling)
    else:
        batch_fn, val, info = _token_source(dataset, cfg, sampling)
    whole = [b for b in val if b.shape[0] % strategy.world_size == 0]  # each rank takes an equal share of rows
    if len(whole) < len(val):
        log.warning("validation: %d of %d batches do not split over %d ranks and are left out",
                    len(val) - len(whole), len(val), strategy.world_size)
        val = whole
    if not strategy.is_main:
        on_log = None  # rank 0 reports
    trainer = Trainer(
        cfg, model=model, batch_fn=batch_fn, val_fn=(lambda: val) if val else None, progress=progress,
        strategy=strategy, kind=kind, data=info, eval_at_start=init is not None, on_log=on_log,
    )
    if strategy.is_main:
        if not resuming or not (out_dir / TOKENIZER_FILE).is_file():  # a resumed run keeps the files it started with
            _save_tokenizer(out_dir, tokenizer, chat_template=chat_template_of(tokenizer)[0] if chat else None,
                            kind=kind)
        strategy.record_layout(out_dir, config, kind=kind)
        strategy.barrier()
    result = trainer.run(plan=plan)
    return result, RunData(tokenizer=tokenizer, info=info, label=label, dataset=dataset, chat=chat, init=init)


# ---------------------------------------------------------------------------------------------- the pieces


def _check_options(out_dir: Path, *, data, sft, init_from, model_spec, sampling: str) -> None:
    if data is not None and sft is not None:
        raise ValueError("--data and --sft exclude each other (chat fine-tuning reads only the --sft conversations)")
    if init_from is not None and model_spec is not None:
        raise ValueError("--init-from takes the model from the checkpoint; drop --preset")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
    if sft is not None and not Path(sft).is_file():
        raise DataSourceError(f"{sft}: no such file")
    if init_from is not None:
        source, out = Path(init_from).resolve(), out_dir.resolve()
        if source == out or out in source.parents or source in out.parents:
            raise RunDirectoryError(f"--init-from {init_from} and --out {out_dir} overlap (one is inside the other); "
                                    "start the new run in a directory of its own")


def _check_fit(dataset: TokenDataset, config: ModelConfig, tokenizer: HFTokenizer, *, owner: str) -> None:
    dataset.check_model(config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    check_tokenizer_matches(dataset, tokenizer, owner=owner)


def _bare(tokenizer, config: ModelConfig) -> HFTokenizer:
    """Our trained BPE as an HFTokenizer whose special tokens are the config's BOS/EOS (and our pad token), with
    our prompt rule: BOS first, as documents are framed (latentmoe.hf.tokenizer)."""
    return as_hf_tokenizer(tokenizer, config=config)


def _run_tokenizer(out_dir: Path, config: ModelConfig) -> HFTokenizer | None:
    """The tokenizer a run saved beside its checkpoints (with its tokenizer_config.json when there is one)."""
    tokenizer = load_tokenizer(out_dir)
    if tokenizer is None:
        return None
    if not tokenizer.special_tokens:
        return _bare(tokenizer.tokenizer, config)
    return tokenizer


def _read_chat(path, tokenizer: HFTokenizer, config: ModelConfig, *, val_fraction: float) -> ChatDataset:
    _, is_default = chat_template_of(tokenizer)
    # the server's and generate --chat's rule (latentmoe.hf.tokenizer): the template rendered, tokenised as it is
    render = tokenizer.render_chat

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    pad_text = tokenizer.special_tokens.get("pad_token")
    pad_id = tokenizer.tokenizer.token_to_id(pad_text) if pad_text else None
    chat = ChatDataset.from_jsonl(
        path, render=render, encode=encode, pad_id=pad_id if pad_id is not None else config.eos_token_id or 0,
        val_fraction=val_fraction,
    )
    largest = chat.max_token_id()
    if largest >= config.vocab_size:
        raise DatasetError(f"{path}: renders to token id {largest}, outside the model's vocab_size {config.vocab_size}")
    if is_default:
        log.info("the tokenizer has no chat template: rendered with latentmoe's default (latentmoe/hf/tokenizer.py "
                 "DEFAULT_CHAT_TEMPLATE)")
    return chat


def _load_model(source: PretrainedSource, config: ModelConfig, *, strategy: Strategy, device: torch.device,
                seed: int):
    """The checkpoint's model, straight on ``device``, each EP rank reading only its experts."""
    from latentmoe.model.transformer import materialize, meta_model

    model = strategy.prepare_model(meta_model(config))
    materialize(model, device=device)
    # rank 0 verified the checksums before the others passed the barrier: they check sizes only
    report = load_pretrained_weights(source, model, seed=seed, check_hashes=strategy.is_main)
    log.info("initialised from %s (%s parameters; fresh optimizer and schedule)", source.describe(),
             f"{sum(p.numel() for p in model.parameters()):,}")
    return model.train(), report


def _token_source(dataset: TokenDataset, cfg: TrainConfig, sampling: str):
    def rows(step: int, *, rank: int, world_size: int) -> torch.Tensor:
        return dataset.batch(step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, sampling=sampling,
                             rank=rank, world_size=world_size)

    if dataset.val_tokens >= cfg.seq_len:
        val = dataset.val_batches(batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)
    else:
        val = []
        log.warning("%s: the validation split holds %d tokens, fewer than --seq-len %d: no validation",
                    dataset.path, dataset.val_tokens, cfg.seq_len)
    info = DataInfo(str(dataset.path), dataset.manifest_sha256, dataset.train_tokens, sampling)
    return RankBatches(rows), val, info


def _chat_source(chat: ChatDataset, cfg: TrainConfig, sampling: str):
    def rows(step: int, *, rank: int, world_size: int):
        return chat.batch(step, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, sampling=sampling,
                          rank=rank, world_size=world_size)

    truncated = chat.truncated(cfg.seq_len)
    if truncated:
        log.warning("%s: %d of %d training conversations are longer than --seq-len %d and are cut", chat.path,
                    truncated, chat.num_train, cfg.seq_len)
    val = chat.val_batches(batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches)
    if not val:
        log.warning("%s: no conversation fell in the validation split (--sft-val-fraction; a conversation's side "
                    "depends on its content, so duplicates share one): no validation", chat.path)
    log.info("%s: %d training conversations (%d assistant tokens), %d for validation; one padded row each",
             chat.path, chat.num_train, chat.assistant_tokens(), chat.num_val)
    # one epoch = every training conversation once, as padded rows
    info = DataInfo(str(chat.path), chat.sha256, chat.num_train * cfg.seq_len, sampling)
    return RankBatches(rows), val, info


def _save_tokenizer(out_dir: Path, tokenizer: HFTokenizer, *, chat_template: str | None, kind: str) -> None:
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tokenizer.tokenizer.save(str(tmp))
    claim_run_file(out_dir, TOKENIZER_FILE, kind=kind)
    saved = HFTokenizer(tokenizer.tokenizer, chat_template=chat_template or tokenizer.chat_template,
                        special_tokens=tokenizer.special_tokens, model_max_length=tokenizer.model_max_length,
                        add_bos_token=tokenizer.add_bos_token, add_eos_token=tokenizer.add_eos_token)
    write_text_atomic(out_dir / TOKENIZER_CONFIG_FILE, hf_tokenizer_config_text(saved))
    claim_run_file(out_dir, TOKENIZER_CONFIG_FILE, kind=kind)


def _build(config: ModelConfig, device: torch.device):
    from latentmoe.model.transformer import CausalLM

    return CausalLM(config).to(device)
