"""Start a run from pretrained weights (``latentmoe train --init-from PATH``): one of our checkpoints or run
directories, or a Hugging Face DeepSeek-V2/V3 directory (BF16, FP32, or FP8 blocks, which are dequantised to
the training dtype).

What comes from the checkpoint: the model (its ``config.json``), the weights, the tokenizer and its chat
template. What does not: the optimizer (fresh AdamW moments) and the schedule (warmup + cosine from step 0 to
``--steps``) — this is a *new* run that starts where the checkpoint ends, unlike ``--resume``, which continues
a run exactly (same data stream, optimizer state, step count).

Loading goes straight to the target device, and under expert parallelism each rank reads only its experts::

    model = meta_model(config)                 shapes only, no memory
    model = strategy.prepare_model(model)      EP: each MoE layer cut to this rank's experts, still on meta
    materialize(model, device=device)          allocated once, on the device, uninitialised
    load_pretrained_weights(source, model)     every tensor read into place; experts: this rank's rows only

**MTP modules** are loaded when the files hold them. A Hugging Face directory often has none although its
config asks for them (transformers' ``save_pretrained`` drops them); such a module is initialised as the
DeepSeek-V3 report builds it: it shares the embedding and the output head with the main model (§2.2 — so those
are the pretrained ones), and its own parameters (``eh_proj``, the transformer block, its norms) start as every
parameter does in §4.2 — Normal(0, ``initializer_range``) for matrices, 1 for norms, 0 for biases and the router
bias. Each tensor (each expert, for stacked experts) is drawn from its own host generator seeded from
``(seed, name, expert)``, so the initial MTP weights are the same on any device and any EP layout. The run logs
which depths were initialised.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentmoe.checkpoint import TOKENIZER_FILE, CheckpointError, load_config, load_weights, resolve_checkpoint
from latentmoe.config import ModelConfig
from latentmoe.device import HOST
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.tokenizer import HFTokenizer
from latentmoe.model.moe import Experts, Router
from latentmoe.model.norm import RMSNorm

log = logging.getLogger("latentmoe")

LATENTMOE_SOURCE = "latentmoe"
HF_SOURCE = "hf"
SEED_BYTES = 8
SEED_MODULUS = 2**63


@dataclass(frozen=True)
class PretrainedSource:
    """A checkpoint to start from, described before any weight is read.

    path: our ``checkpoint-STEP`` directory (a run directory resolves to its newest) or the HF directory;
    kind: "latentmoe" or "hf"; config: the model to build (for an HF directory, with the MTP modules its
    config.json declares); tokenizer: its tokenizer with special tokens and chat template; mtp_in_files: how
    many MTP modules the files hold.
    """

    path: Path
    kind: str
    config: ModelConfig
    tokenizer: HFTokenizer
    mtp_in_files: int

    def describe(self) -> str:
        what = "Hugging Face checkpoint" if self.kind == HF_SOURCE else "latentmoe checkpoint"
        return f"{what} {self.path}"


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained_weights` did: ``initialised_mtp`` lists the MTP depths (1-based) that were not
    in the files and were initialised."""

    source: PretrainedSource
    initialised_mtp: tuple[int, ...]


def open_pretrained(path: str | os.PathLike) -> PretrainedSource:
    """Describe ``path`` (config, tokenizer, MTP modules in the files) without reading weights.

    Raises :class:`CheckpointError` / :class:`HFCheckpointError` (one line, naming the file) when it is neither
    kind of checkpoint, or has no tokenizer."""
    from latentmoe.hf import inspect_checkpoint, is_hf_checkpoint, load_tokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, run directory or Hugging Face directory")
    if is_hf_checkpoint(path):
        info = inspect_checkpoint(path)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise HFCheckpointError(f"{path}: no {TOKENIZER_FILE} (the tokenizer the model was trained with)")
        return PretrainedSource(path, HF_SOURCE, info.hf.config, tokenizer, info.mtp_layers)
    ckpt = resolve_checkpoint(path)
    config = load_config(ckpt)
    tokenizer_dir = next((d for d in (ckpt, ckpt.parent) if (d / TOKENIZER_FILE).is_file()), None)
    if tokenizer_dir is None:
        raise CheckpointError(f"no {TOKENIZER_FILE} in {ckpt} or {ckpt.parent}")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:  # pragma: no cover - the file exists
        raise CheckpointError(f"{tokenizer_dir / TOKENIZER_FILE}: unreadable")
    if not tokenizer.special_tokens:  # our runs save a bare tokenizer.json: its specials are the config's ids
        tokenizer.special_tokens = {
            key: text
            for key, token_id in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id))
            if token_id is not None and (text := tokenizer.tokenizer.id_to_token(token_id)) is not None
        }
    return PretrainedSource(ckpt, LATENTMOE_SOURCE, config, tokenizer, config.num_nextn_predict_layers)


def expert_parallel_rank(model: nn.Module) -> int:
    """The EP rank whose experts ``model`` holds (0 for a model with every expert)."""
    for module in model.modules():
        hook = getattr(module, "expert_parallel", None)
        if hook is not None:
            return int(getattr(hook, "ep_rank", 0))
    return 0


def load_pretrained_weights(
    source: PretrainedSource, model: nn.Module, *, seed: int, check_hashes: bool = True
) -> LoadReport:
    """Read ``source``'s weights into ``model`` (allocated for ``source.config``, possibly EP-sharded), in place;
    initialise the MTP modules the files lack (module docstring). ``check_hashes``: verify our checkpoint's
    sha256 (the caller may have done it already, once for all ranks)."""
    from latentmoe.hf import load_pretrained_into

    ep_rank = expert_parallel_rank(model)
    if source.kind == HF_SOURCE:
        info = load_pretrained_into(model, source.path, ep_rank=ep_rank)
        present = info.mtp_layers
    else:
        load_weights(source.path, model, ep_rank=ep_rank, check_hashes=check_hashes)
        present = source.config.num_nextn_predict_layers
    fresh = tuple(range(present + 1, len(model.mtp) + 1))
    std = source.config.initializer_range
    for depth in fresh:
        init_module_(model.mtp[depth - 1], std=std, seed=seed, prefix=f"mtp.{depth - 1}", ep_rank=ep_rank)
    if fresh:
        log.info(
            "%s holds no weights for MTP depth %s: initialised as in the DeepSeek-V3 report (embedding and output "
            "head shared with the main model; eh_proj, block and norms from N(0, %g), norms 1)",
            source.path, ", ".join(map(str, fresh)), std,
        )
    return LoadReport(source, fresh)


def _generator(seed: int, name: str, expert: int | None = None) -> torch.Generator:
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=SEED_BYTES).digest()
    return torch.Generator(device=HOST).manual_seed(int.from_bytes(digest, "little") % SEED_MODULUS)


def _normal_(p: torch.Tensor, std: float, generator: torch.Generator) -> None:
    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))


@torch.no_grad()
def init_module_(module: nn.Module, *, std: float, seed: int, prefix: str, ep_rank: int = 0) -> None:
    """Initialise every parameter of ``module`` as ``CausalLM.reset_parameters`` does (Normal(0, std) matrices,
    norms 1, biases and router biases 0), each tensor from a host generator keyed by ``(seed, name)`` — each
    routed expert by ``(seed, name, global expert index)``, so an EP rank holding experts ``[r·n, (r+1)·n)``
    draws exactly their values."""
    done: set[int] = set()
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
            done.add(id(sub.weight))
        elif isinstance(sub, nn.Linear):
            _normal_(sub.weight, std, _generator(seed, f"{name}.weight"))
            done.add(id(sub.weight))
            if sub.bias is not None:
                sub.bias.zero_()
                done.add(id(sub.bias))
        elif isinstance(sub, Router):
            _normal_(sub.weight, std, _generator(seed, f"{name}.weight"))
            done.add(id(sub.weight))
            if sub.e_score_correction_bias is not None:
                sub.e_score_correction_bias.zero_()
        elif isinstance(sub, Experts):
            first = ep_rank * sub.n_experts if sub.n_experts != _full_experts(module, sub) else 0
            for attr in ("gate_proj", "up_proj", "down_proj"):
                weight = getattr(sub, attr)
                for j in range(sub.n_experts):
                    _normal_(weight[j], std, _generator(seed, f"{name}.{attr}", first + j))
                done.add(id(weight))
    missing = [n for n, p in module.named_parameters(prefix=prefix) if id(p) not in done]
    if missing:
        raise RuntimeError(f"init_module_ does not know how to initialise {', '.join(missing)}; update it")


def _full_experts(module: nn.Module, experts: Experts) -> int:
    """How many routed experts the model has in all (the config of the MoE layer that holds ``experts``)."""
    for sub in module.modules():
        if getattr(sub, "experts", None) is experts:
            return int(sub.config.n_routed_experts)
    return experts.n_experts
