"""ArchSpec: the planner's light, torch-free description of a decoder-only transformer.

``latentmoe.config.ModelConfig`` models one family (DeepSeek MLA + DeepSeekMoE). The planner must also size
dense Llama / Qwen / Mistral models (multi-head, grouped-query or multi-query attention) and Mixtral- or
Qwen-MoE-style mixtures, so it reads any Hugging Face ``config.json`` into this smaller description:

* the attention kind: ``"mla"`` (DeepSeek-V2/V3 latent attention) or ``"gqa"`` (MHA is GQA with as many KV
  heads as query heads, MQA is GQA with one);
* the widths that size every weight matrix (hidden, heads, head dims, LoRA ranks of MLA);
* one :class:`FFNSpec` per layer (dense SwiGLU, or a mixture of SwiGLU experts with optional shared experts);
* the vocabulary, whether the output head is tied to the embedding, biases, and the number of MTP modules.

Everything the cost model computes (parameters, KV cache, FLOPs, memory) is a pure function of an ArchSpec.

Loading rules (:func:`load_arch`): a name is looked up first among the planner's own presets
(``latentmoe/plan/models/NAME.json``, HF format), then among ``ModelConfig`` presets
(``latentmoe/presets``); anything with a path separator, a ``.json`` suffix, or naming a directory is read
as a config.json file. A config missing a field the architecture needs raises :class:`PlanError` naming it;
optional fields take the Hugging Face class defaults, which are written out below where they are used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from latentmoe.plan.errors import PlanError

PLAN_PACKAGE = "latentmoe.plan"
MODEL_PRESET_DIR = "models"

ATTENTION_MLA = "mla"
ATTENTION_GQA = "gqa"
FFN_DENSE = "dense"
FFN_MOE = "moe"

# model_type values of config.json, grouped by how their weights are laid out.
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3")
DENSE_GQA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_GQA_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SUPPORTED_MODEL_TYPES = DEEPSEEK_TYPES + DENSE_GQA_TYPES + MOE_GQA_TYPES
# Qwen2 / Qwen2-MoE hard-code bias=True on the q, k and v projections (transformers modeling_qwen2.py).
QKV_BIAS_TYPES = ("qwen2", "qwen2_moe")
# Qwen3 adds an RMSNorm over each query and key head (q_norm, k_norm; transformers modeling_qwen3.py).
QK_NORM_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class FFNSpec:
    """One layer's feed-forward block; every FFN here is SwiGLU (gate, up, down: 3 matrices hidden x width).

    ``kind`` is ``"dense"`` (one FFN of ``intermediate_size``) or ``"moe"``: ``n_routed_experts`` experts of
    ``intermediate_size`` each, ``top_k`` of them active per token, plus ``n_shared_experts`` always-active
    experts whose widths add up to ``shared_intermediate_size``. ``router_bias`` is DeepSeek-V3's
    ``e_score_correction_bias`` (aux-loss-free balancing, one fp32 value per expert);
    ``shared_expert_gate`` is Qwen-MoE's sigmoid gate (a hidden x 1 matrix) on the shared expert.
    """

    kind: str
    intermediate_size: int
    n_routed_experts: int = 0
    top_k: int = 0
    n_shared_experts: int = 0
    shared_intermediate_size: int = 0
    router_bias: bool = False
    shared_expert_gate: bool = False
    bias: bool = False

    @property
    def is_moe(self) -> bool:
        return self.kind == FFN_MOE

    @property
    def fanout(self) -> int:
        """Experts a token is sent to in expert parallelism: top-k routed + the shared ones (ISCA §2.3.2)."""
        return self.top_k + self.n_shared_experts if self.is_moe else 0


@dataclass(frozen=True)
class ArchSpec:
    """Shapes of a decoder-only transformer, enough to count weights, KV cache and FLOPs.

    GQA fields: ``num_heads`` query heads, ``num_kv_heads`` key/value heads of ``head_dim`` each.
    MLA fields (DeepSeek-V2 §2.1): queries pass through a rank-``q_lora_rank`` bottleneck (0: no bottleneck),
    keys and values through a shared latent of ``kv_lora_rank``; each head has ``qk_nope_head_dim`` +
    ``qk_rope_head_dim`` query/key channels and ``v_head_dim`` value channels; the decoupled RoPE key of
    ``qk_rope_head_dim`` is shared by all heads.
    """

    name: str
    model_type: str
    attention: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    ffn: tuple[FFNSpec, ...]
    head_dim: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    mtp_layers: int = 0

    @property
    def is_mla(self) -> bool:
        return self.attention == ATTENTION_MLA

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width (MLA: non-positional + RoPE part)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head value width."""
        return self.v_head_dim if self.is_mla else self.head_dim

    @property
    def attention_label(self) -> str:
        """MLA, MHA, GQA or MQA, as the papers name them."""
        if self.is_mla:
            return "MLA"
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def is_moe(self) -> bool:
        return any(f.is_moe for f in self.ffn)

    @property
    def moe_ffn(self) -> FFNSpec | None:
        """The FFN of the MoE layers (the first one found), or None for a dense model."""
        return next((f for f in self.ffn if f.is_moe), None)

    @property
    def fanout(self) -> int:
        """Expert-parallel fan-out per token (top-k + shared), 0 for a dense model."""
        moe = self.moe_ffn
        return moe.fanout if moe is not None else 0

    @property
    def label(self) -> str:
        """Short architecture label for tables, e.g. ``MLA+MoE`` or ``GQA dense``."""
        return f"{self.attention_label}+MoE" if self.is_moe else f"{self.attention_label} dense"


# ---------------------------------------------------------------------------------------------- parsing
def _field(config: Mapping[str, Any], key: str, name: str) -> Any:
    if key not in config:
        raise PlanError(f"model {name!r}: config is missing required field {key!r}")
    return config[key]


def _int(
    config: Mapping[str, Any], key: str, name: str, *, default: int | None = None, minimum: int = 1
) -> int:
    """An integer field >= ``minimum``; required when ``default`` is None."""
    if default is None:
        value = _field(config, key, name)
    else:
        value = config.get(key)
        value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PlanError(f"model {name!r}: field {key!r} must be {bound}, got {value!r}")
    return value


def _bool(config: Mapping[str, Any], key: str, default: bool) -> bool:
    return bool(config.get(key, default))


def _deepseek_ffns(config: Mapping[str, Any], name: str, hidden_layers: int) -> tuple[FFNSpec, ...]:
    dense = FFNSpec(kind=FFN_DENSE, intermediate_size=_int(config, "intermediate_size", name))
    n_routed = config.get("n_routed_experts") or 0
    if not n_routed:
        return (dense,) * hidden_layers
    n_routed = _int(config, "n_routed_experts", name)
    moe_width = _int(config, "moe_intermediate_size", name)
    n_shared = _int(config, "n_shared_experts", name, minimum=0) if "n_shared_experts" in config else 0
    moe = FFNSpec(
        kind=FFN_MOE,
        intermediate_size=moe_width,
        n_routed_experts=n_routed,
        top_k=_int(config, "num_experts_per_tok", name),
        n_shared_experts=n_shared,
        shared_intermediate_size=n_shared * moe_width,
        # noaux_tc = aux-loss-free balancing with a per-expert bias (TR eq. 16); V2's greedy methods: none.
        router_bias=config.get("topk_method") == "noaux_tc",
    )
    first_dense = _int(config, "first_k_dense_replace", name, default=0, minimum=0)
    freq = _int(config, "moe_layer_freq", name, default=1)
    return tuple(moe if (i >= first_dense and i % freq == 0) else dense for i in range(hidden_layers))


def _arch_deepseek(config: Mapping[str, Any], name: str, model_type: str) -> ArchSpec:
    layers = _int(config, "num_hidden_layers", name)
    heads = _int(config, "num_attention_heads", name)
    q_lora = _field(config, "q_lora_rank", name)
    if q_lora is not None and (not isinstance(q_lora, int) or isinstance(q_lora, bool) or q_lora < 0):
        raise PlanError(
            f"model {name!r}: field 'q_lora_rank' must be null or an integer >= 0, got {q_lora!r}"
        )
    return ArchSpec(
        name=name,
        model_type=model_type,
        attention=ATTENTION_MLA,
        hidden_size=_int(config, "hidden_size", name),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        vocab_size=_int(config, "vocab_size", name),
        ffn=_deepseek_ffns(config, name, layers),
        q_lora_rank=q_lora or 0,
        kv_lora_rank=_int(config, "kv_lora_rank", name),
        qk_nope_head_dim=_int(config, "qk_nope_head_dim", name),
        qk_rope_head_dim=_int(config, "qk_rope_head_dim", name),
        v_head_dim=_int(config, "v_head_dim", name),
        tie_word_embeddings=_bool(config, "tie_word_embeddings", False),
        qkv_bias=_bool(config, "attention_bias", False),
        o_bias=_bool(config, "attention_bias", False),
        # HF DeepseekV3Config defaults num_nextn_predict_layers to 1, but V2 configs have no MTP and omit it.
        mtp_layers=_int(config, "num_nextn_predict_layers", name, default=0, minimum=0),
    )


def _gqa_ffns(config: Mapping[str, Any], name: str, model_type: str, layers: int) -> tuple[FFNSpec, ...]:
    mlp_bias = _bool(config, "mlp_bias", False)
    if model_type in DENSE_GQA_TYPES:
        return (
            FFNSpec(kind=FFN_DENSE, intermediate_size=_int(config, "intermediate_size", name), bias=mlp_bias),
        ) * layers
    if model_type == "mixtral":
        moe = FFNSpec(
            kind=FFN_MOE,
            intermediate_size=_int(config, "intermediate_size", name),
            n_routed_experts=_int(config, "num_local_experts", name),
            top_k=_int(config, "num_experts_per_tok", name),
        )
        return (moe,) * layers
    # qwen2_moe / qwen3_moe: MoE every decoder_sparse_step layers except those listed in mlp_only_layers.
    shared_width = (
        _int(config, "shared_expert_intermediate_size", name, minimum=0) if model_type == "qwen2_moe" else 0
    )
    moe = FFNSpec(
        kind=FFN_MOE,
        intermediate_size=_int(config, "moe_intermediate_size", name),
        n_routed_experts=_int(config, "num_experts", name),
        top_k=_int(config, "num_experts_per_tok", name),
        n_shared_experts=1 if shared_width else 0,
        shared_intermediate_size=shared_width,
        shared_expert_gate=bool(shared_width),
    )
    step = _int(config, "decoder_sparse_step", name, default=1)
    mlp_only = set(config.get("mlp_only_layers") or ())
    dense = None
    ffns = []
    for i in range(layers):
        if i not in mlp_only and (i + 1) % step == 0:
            ffns.append(moe)
        else:
            dense = dense or FFNSpec(
                kind=FFN_DENSE, intermediate_size=_int(config, "intermediate_size", name)
            )
            ffns.append(dense)
    return tuple(ffns)


def _arch_gqa(config: Mapping[str, Any], name: str, model_type: str) -> ArchSpec:
    hidden = _int(config, "hidden_size", name)
    layers = _int(config, "num_hidden_layers", name)
    heads = _int(config, "num_attention_heads", name)
    # HF: num_key_value_heads None/absent means MHA; head_dim absent means hidden // heads.
    kv_heads = _int(config, "num_key_value_heads", name, default=heads)
    if heads % kv_heads:
        raise PlanError(
            f"model {name!r}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    if config.get("head_dim") is None and hidden % heads:
        raise PlanError(
            f"model {name!r}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})"
        )
    head_dim = _int(config, "head_dim", name, default=hidden // heads)
    attention_bias = _bool(config, "attention_bias", False)
    return ArchSpec(
        name=name,
        model_type=model_type,
        attention=ATTENTION_GQA,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(config, "vocab_size", name),
        ffn=_gqa_ffns(config, name, model_type, layers),
        tie_word_embeddings=_bool(config, "tie_word_embeddings", False),
        qkv_bias=attention_bias or model_type in QKV_BIAS_TYPES,
        o_bias=attention_bias,
        qk_norm=model_type in QK_NORM_TYPES,
    )


def arch_from_hf_dict(config: Mapping[str, Any], name: str) -> ArchSpec:
    """Read a Hugging Face ``config.json`` dict (any supported ``model_type``) into an ArchSpec."""
    if not isinstance(config, Mapping):
        raise PlanError(f"model {name!r}: a config must be a JSON object, got {type(config).__name__}")
    model_type = _field(config, "model_type", name)
    if model_type in DEEPSEEK_TYPES:
        return _arch_deepseek(config, name, model_type)
    if model_type in DENSE_GQA_TYPES + MOE_GQA_TYPES:
        return _arch_gqa(config, name, model_type)
    raise PlanError(
        f"model {name!r}: model_type {model_type!r} is not supported; "
        f"choose one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def arch_from_model_config(config: Any, name: str) -> ArchSpec:
    """An ArchSpec from a ``latentmoe.config.ModelConfig`` (read through its HF-named ``to_dict``)."""
    return arch_from_hf_dict(config.to_dict(), name)


# ---------------------------------------------------------------------------------------------- presets
def planner_model_names() -> list[str]:
    """Names of the planner's own presets (``latentmoe/plan/models/*.json``)."""
    root = resources.files(PLAN_PACKAGE).joinpath(MODEL_PRESET_DIR)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def model_names() -> list[str]:
    """Every name ``--model`` accepts: planner presets and ModelConfig presets."""
    from latentmoe.config import preset_names

    return sorted(set(planner_model_names()) | set(preset_names()))


def _looks_like_path(name_or_path: str) -> bool:
    return os.path.sep in name_or_path or name_or_path.endswith(".json") or Path(name_or_path).is_dir()


def _read_json(path: Path) -> Any:
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read model config {str(path)!r}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(
            f"model config {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None


def load_arch(name_or_path: str) -> ArchSpec:
    """A planner preset, a ModelConfig preset, or a config.json path (or a directory holding one)."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        name = path.parent.name if path.name == "config.json" else path.stem
        return arch_from_hf_dict(_read_json(path), name or str(path))
    if name_or_path in planner_model_names():
        text = (
            resources.files(PLAN_PACKAGE)
            .joinpath(MODEL_PRESET_DIR)
            .joinpath(f"{name_or_path}.json")
            .read_text()
        )
        return arch_from_hf_dict(json.loads(text), name_or_path)
    from latentmoe.config import ConfigError, ModelConfig, preset_names

    if name_or_path in preset_names():
        try:
            return arch_from_model_config(ModelConfig.from_preset(name_or_path), name_or_path)
        except ConfigError as exc:  # pragma: no cover - shipped presets validate
            raise PlanError(f"model {name_or_path!r}: {exc}") from None
    raise PlanError(
        f"unknown model preset {name_or_path!r}; choose one of {', '.join(model_names())} or a config.json"
    )
