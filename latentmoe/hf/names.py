"""Tensor names: ours ⇄ the Hugging Face DeepSeek-V3 layout — one table, used both ways.

Most names are already the same (``model.layers.N.self_attn.kv_a_proj_with_mqa.weight``, ...). Three things
differ, and :func:`build_name_table` handles all three in one place:

=============================================  =====================================================
ours                                           Hugging Face / DeepSeek files
=============================================  =====================================================
``model.layers.N.mlp.experts.gate_proj``       ``model.layers.N.mlp.experts.{e}.gate_proj.weight``
[E, I, D] (also ``up_proj``; ``down_proj``     for e = 0 … E−1: one [I, D] (or [D, I]) tensor per
[E, D, I]) — stacked per layer                 expert, stacked along dim 0 in expert order
``mtp.K.block.X``                              ``model.layers.{L+K}.X`` (the MTP block's attention,
                                               FFN and norms; L = num_hidden_layers)
``mtp.K.{enorm,hnorm,eh_proj,                  ``model.layers.{L+K}.{enorm,hnorm,eh_proj,
shared_head.norm}.weight``                     shared_head.norm}.weight``
(shared with the main model)                   ``model.layers.{L+K}.shared_head.head.weight`` = a copy
                                               of ``lm_head.weight``; ``model.layers.{L+K}.embed_tokens
                                               .weight`` (official files) = a copy of the embedding
=============================================  =====================================================

The table is built from our model's state-dict names and shapes, so save writes exactly what load reads.
FP8 files add ``<weight>_scale_inv`` next to each quantised ``<weight>``; :func:`scale_name` spells it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from latentmoe.config import ModelConfig
from latentmoe.model.moe import EXPERT_PARAMETERS

EXPERT_PROJS = EXPERT_PARAMETERS
SCALE_SUFFIX = "_scale_inv"
_MTP_RE = re.compile(r"^mtp\.(?P<k>\d+)\.(?:block\.)?(?P<rest>.+)$")
_STACKED_RE = re.compile(rf"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>{'|'.join(EXPERT_PARAMETERS)})$")
_LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")
# Rows of these HF tensors hold per-head [nope | rope] query channels or [latent | rope] key channels.
_QUERY_PROJ_RE = re.compile(r"\.self_attn\.(?:q_b_proj|q_proj)\.weight$")
_KV_A_PROJ_RE = re.compile(r"\.self_attn\.kv_a_proj_with_mqa\.(?:weight|bias)$")


@dataclass(frozen=True)
class TensorMap:
    """One of our tensors and the HF tensors that hold it.

    ours: our state-dict key; shape: its shape; hf: the HF keys — one, or (``stacked``) one per expert, whose
    [I, D]-style tensors are stacked along a new dim 0 in expert order to make ours.
    """

    ours: str
    shape: tuple[int, ...]
    hf: tuple[str, ...]
    stacked: bool = False

    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor."""
        return self.shape[1:] if self.stacked else self.shape


@dataclass(frozen=True)
class NameTable:
    """Every tensor of one model, ours ⇄ HF. ``copies``: HF keys that only repeat one of our tensors (the MTP
    layers' ``shared_head.head`` and ``embed_tokens``), mapped to the our-key they must equal."""

    maps: tuple[TensorMap, ...]
    copies: dict[str, str] = field(default_factory=dict)

    def by_hf(self) -> dict[str, tuple[TensorMap, int | None]]:
        """HF key → (its map, expert index or None)."""
        out: dict[str, tuple[TensorMap, int | None]] = {}
        for m in self.maps:
            for e, key in enumerate(m.hf):
                out[key] = (m, e if m.stacked else None)
        return out

    def by_ours(self) -> dict[str, TensorMap]:
        return {m.ours: m for m in self.maps}


def hf_name(ours: str, *, num_hidden_layers: int) -> str:
    """The HF key of one of our (unstacked) tensor names (pure; no expert expansion)."""
    match = _MTP_RE.match(ours)
    if match:
        return f"model.layers.{num_hidden_layers + int(match['k'])}.{match['rest']}"
    return ours


def expert_names(ours: str, n_experts: int, *, num_hidden_layers: int) -> tuple[str, ...] | None:
    """The per-expert HF keys of a stacked expert tensor (``...mlp.experts.gate_proj``), or None if not one."""
    match = _STACKED_RE.match(ours)
    if not match:
        return None
    prefix = hf_name(match["prefix"], num_hidden_layers=num_hidden_layers)
    return tuple(f"{prefix}.{e}.{match['proj']}.weight" for e in range(n_experts))


def build_name_table(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> NameTable:
    """The table for a model whose state dict has these ``shapes`` (names → shapes), in state-dict order.

    With ``tie_word_embeddings`` the head *is* the embedding, so ``lm_head.weight`` is not a separate tensor.
    """
    L = config.num_hidden_layers
    maps = []
    for ours, shape in shapes.items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        experts = expert_names(ours, shape[0], num_hidden_layers=L)
        if experts is not None:
            maps.append(TensorMap(ours, tuple(shape), experts, stacked=True))
        else:
            maps.append(TensorMap(ours, tuple(shape), (hf_name(ours, num_hidden_layers=L),)))
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    mtp_layers = sorted({int(m["k"]) for m in (_MTP_RE.match(name) for name in shapes) if m})
    copies = {}
    for k in mtp_layers:
        copies[f"model.layers.{L + k}.shared_head.head.weight"] = head
        copies[f"model.layers.{L + k}.embed_tokens.weight"] = "model.embed_tokens.weight"
    return NameTable(tuple(maps), copies)


def scale_name(hf_weight: str) -> str:
    """``X.weight`` → ``X.weight_scale_inv`` (the FP8 block scales stored next to a quantised weight)."""
    return hf_weight + SCALE_SUFFIX


def layer_of(hf_key: str) -> int | None:
    """The N of ``model.layers.N.…``, or None for tensors outside the layers."""
    match = _LAYER_RE.match(hf_key)
    return int(match["layer"]) if match else None


def rope_rows_permutation(hf_key: str, config: ModelConfig) -> list[int] | None:
    """Row order turning this tensor's RoPE rows from two halves into interleaved pairs, or None if it has none.

    transformers' ``rope_interleave: false`` layout rotates channel j with channel j + R/2 (``rotate_half``);
    ours (and DeepSeek's) rotates 2i with 2i+1. Pair i is (j, j + R/2) with j = i, so new row 2i takes old row
    i and new row 2i+1 takes old row i + R/2. Only the rope slice of each head (queries) or of the shared key
    (``kv_a_proj_with_mqa``) moves; attention scores are unchanged because q and k move alike.
    """
    R = config.qk_rope_head_dim
    interleave = [i // 2 + (i % 2) * (R // 2) for i in range(R)]
    if _QUERY_PROJ_RE.search(hf_key):
        head, nope = config.qk_head_dim, config.qk_nope_head_dim
        return [
            h * head + (c if c < nope else nope + interleave[c - nope])
            for h in range(config.num_attention_heads)
            for c in range(head)
        ]
    if _KV_A_PROJ_RE.search(hf_key):
        C = config.kv_lora_rank
        return list(range(C)) + [C + r for r in interleave]
    return None
