"""Save a :class:`CausalLM` in the Hugging Face DeepSeek-V3 layout, MTP modules included.

The directory holds ``config.json`` (both rope dialects, routing keys explicit), ``generation_config.json``,
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, and the
tokenizer files when a tokenizer is given. Routed experts are written one tensor per expert and the MTP
modules as ``model.layers.{L+k}.*`` with a copy of the head as ``shared_head.head`` (the name table in
names.py), so transformers, DeepSeek's reference code and llama.cpp's converter all read it.

Like our own checkpoints, the directory is written under a temporary name beside the destination and renamed
into place, and it carries latentmoe's marker (``.latentmoe.json``, ignored by transformers and llama.cpp) so a
later save may replace it. A destination holding files we did not write is refused unless ``overwrite=True``, and
even then those files are kept (latentmoe.io, docs/safety.md).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from latentmoe.hf.config import config_to_hf
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.files import CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, write_shards
from latentmoe.hf.names import build_name_table
from latentmoe.hf.tokenizer import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, HFTokenizer, save_tokenizer
from latentmoe.io import DestinationError, check_destination, parse_size, publish_directory, temp_dir
from latentmoe.model.transformer import CausalLM

DEFAULT_MAX_SHARD_SIZE = "5GB"
HF_EXPORT_KIND = "hf-export"


@dataclass(frozen=True)
class SaveResult:
    """What :func:`save_pretrained` wrote: the directory, its files, the tensor count and their bytes."""

    path: Path
    files: list[Path]
    num_tensors: int
    total_bytes: int


def hf_tensors(model: CausalLM, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names (experts as per-expert views, the MTP head copy included).

    ``dtype`` converts floating tensors (router biases stay fp32); None keeps each tensor's own dtype.
    """
    config = model.config
    state = model.state_dict()
    table = build_name_table({k: tuple(v.shape) for k, v in state.items()}, config)
    out: dict[str, torch.Tensor] = {}
    for m in table.maps:
        tensor = state[m.ours]
        if dtype is not None and tensor.is_floating_point() and not m.ours.endswith("e_score_correction_bias"):
            tensor = tensor.to(dtype)
        for e, key in enumerate(m.hf):
            out[key] = tensor[e] if m.stacked else tensor
    for key, ours in table.copies.items():
        if key.endswith("shared_head.head.weight"):
            out[key] = out[table.by_ours()[ours].hf[0]]
    return out


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    tokenizer: HFTokenizer | Tokenizer | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> SaveResult:
    """Write ``model`` (and ``tokenizer``) to ``path`` in the Hugging Face layout; see the module docstring.

    max_shard_size: bytes or "5GB"-style; above it the weights are split into shards with an index.
    dtype: save the weights in this dtype (e.g. torch.bfloat16); None keeps the model's.
    ``path`` must be new, empty, or an export of ours; with ``overwrite`` it may also hold other files, which are
    kept (one named like a file we write is still refused). Raises HFCheckpointError naming the path otherwise.
    """
    path = Path(path)
    max_bytes = parse_size(max_shard_size, what="max_shard_size")
    try:
        destination = check_destination(path, kinds=(HF_EXPORT_KIND,), overwrite=overwrite,
                                        writes=(CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME,
                                                TOKENIZER_NAME, TOKENIZER_CONFIG_NAME))
    except DestinationError as exc:
        raise HFCheckpointError(str(exc)) from None
    tensors = hf_tensors(model, dtype=dtype)
    stored = dtype or model.lm_head.weight.dtype
    config = config_to_hf(model.config, dtype=str(stored).removeprefix("torch."), num_mtp_layers=len(model.mtp))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, path.name)
    try:
        files = write_shards(tmp, tensors, max_shard_bytes=max_bytes)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        generation = {"_from_model_config": True, "bos_token_id": config.get("bos_token_id"),
                      "eos_token_id": config.get("eos_token_id")}
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
        files += [tmp / CONFIG_NAME, tmp / GENERATION_CONFIG_NAME]
        if tokenizer is not None:
            files += save_tokenizer(tokenizer, tmp, config=model.config)
        try:
            publish_directory(tmp, destination, kind=HF_EXPORT_KIND)
        except DestinationError as exc:
            raise HFCheckpointError(str(exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our temporary directory: only our files are in it
        raise
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return SaveResult(path, [path / f.name for f in files], len(tensors), total)
