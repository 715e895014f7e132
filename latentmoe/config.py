"""ModelConfig: the one configuration dataclass, with Hugging Face DeepSeek-V3 field names.

A real DeepSeek-V3 / V2 ``config.json`` loads unchanged with :meth:`ModelConfig.from_json`; keys we do
not model are kept in ``extra`` and written back by :meth:`ModelConfig.to_json`, so a round trip loses
nothing. Presets live in ``latentmoe/presets/NAME.json`` (same format) and load with
:meth:`ModelConfig.from_preset`.

**A config file a person wrote is read strictly** (``strict=True``, what ``--preset path/config.json`` does):
the shape fields in :data:`REQUIRED_FIELDS` must be present (a missing ``hidden_size`` must not silently become
DeepSeek-V3's 7168), and a key that is neither a field nor one of the Hugging Face keys we knowingly pass
through (:data:`PASSTHROUGH_KEYS`: ``architectures``, ``torch_dtype``, ...) is an error naming the closest known
field — a typo like ``hiden_size`` is caught. To carry keys of your own, put them in an ``"extra": {...}``
object; they are kept and written back there. Files written by Hugging Face tools or by us (checkpoints) are
read with ``strict=False``: unknown keys are kept in ``extra``.

All value checks happen in :meth:`ModelConfig.validate`, which raises :class:`ConfigError` naming the
offending field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PRESET_PACKAGE = "latentmoe.presets"

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
# The shape of the model: a config without them describes nothing in particular, so they have no silent default.
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
)
REQUIRED_FOR_MOE = ("moe_intermediate_size", "num_experts_per_tok")
EXTRA_KEY = "extra"
# Hugging Face / DeepSeek config.json keys we read past without modelling them (kept in ``extra``, written back
# at the top level). Anything else unknown is an error when a file is read strictly.
PASSTHROUGH_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "aux_loss_alpha", "chunk_size_feed_forward", "dtype", "ep_size",
    "head_dim", "id2label", "is_encoder_decoder", "label2id", "mlp_bias", "num_mtp_layers", "output_attentions",
    "output_hidden_states", "output_router_logits", "pad_token_id", "pretraining_tp", "problem_type",
    "qk_head_dim", "quantization_config", "return_dict", "rope_interleave", "rope_parameters", "seq_aux",
    "tokenizer_class", "torch_dtype", "transformers_version", "use_cache",
})


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V3-style model (field names as in HF ``config.json``).

    ``q_lora_rank`` 0 or None means queries are projected directly (``q_proj``), as in DeepSeek-V2-Lite.
    ``rope_scaling`` is None or a dict with ``type``/``rope_type`` "yarn" and the YaRN fields
    (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    model_type: str = "deepseek_v3"
    # Keys of a config.json that this dataclass does not model; kept so to_json round-trips.
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the non-positional part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` (0-based) has a DeepSeekMoE FFN instead of a dense SwiGLU."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN settings, or None when rope_scaling is absent / default."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("rope_type", rs.get("type", "default"))
        return None if kind == "default" else rs

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (TR eq. 10; REPO MLA.__init__)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn is not None:
            mscale_all_dim = yarn.get("mscale_all_dim", 0) or 0
            if mscale_all_dim:
                m = yarn_mscale(float(yarn["factor"]), float(mscale_all_dim))
                scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> ModelConfig:
        """Check every constraint in one place; raise ConfigError naming the field. Returns self."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "moe_layer_freq",
        ):
            positive(name)
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            non_negative(name)
        if self.q_lora_rank is not None:
            non_negative("q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method {self.topk_method!r} is not one of {TOPK_METHODS}")
        if self.n_routed_experts > 0:
            for name in ("moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
                positive(name)
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
                )
            if self.topk_method == "greedy":  # groups are ignored: every expert is reachable
                reachable, where = self.n_routed_experts, "routed experts"
            else:
                reachable = self.topk_group * (self.n_routed_experts // self.n_group)
                where = f"experts in the topk_group={self.topk_group} chosen groups"
            if self.num_experts_per_tok > reachable:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {reachable} {where}")
            if not self.routed_scaling_factor > 0:
                raise ConfigError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.yarn is not None:
            kind = self.yarn.get("rope_type", self.yarn.get("type"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {kind!r} is not one of {SUPPORTED_ROPE_TYPES}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.yarn:
                    raise ConfigError(f"rope_scaling.{key} is required for YaRN")
            if not float(self.yarn["factor"]) >= 1.0:
                raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.yarn['factor']}")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False, source: str = "config") -> ModelConfig:
        """Build from a config.json dict and validate. ``strict`` (a file a person wrote): required fields must be
        present and unknown keys are an error naming the closest field (see the module docstring); otherwise
        unknown keys go to ``extra``. ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {EXTRA_KEY}
        nested = data.get(EXTRA_KEY, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{source}: {EXTRA_KEY} must be a JSON object of your own keys, got {nested!r}")
        unknown = [k for k in data if k not in known and k != EXTRA_KEY]
        if strict:
            missing = [k for k in REQUIRED_FIELDS if k not in data]
            if not missing and data.get("n_routed_experts"):
                missing = [k for k in REQUIRED_FOR_MOE if k not in data]
            if missing:
                raise ConfigError(f"{source}: required field {missing[0]} is missing")
            for key in unknown:
                if key not in PASSTHROUGH_KEYS:
                    close = difflib.get_close_matches(key, sorted(known), n=1)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    raise ConfigError(
                        f"{source}: unknown field {key!r}{hint} (put keys of your own under \"{EXTRA_KEY}\")"
                    )
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: data[k] for k in unknown}
        extra.update(nested)
        if kwargs.get("q_lora_rank") == 0:
            kwargs["q_lora_rank"] = None
        try:
            config = cls(**kwargs, extra=extra)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {exc}") from None
        try:
            return config.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict with HF key names: pass-through HF keys at the top level, keys of your own under
        ``extra`` (so a strict read of the written file accepts it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != EXTRA_KEY}
        own = {k: v for k, v in self.extra.items() if k not in PASSTHROUGH_KEYS}
        out.update({k: v for k, v in self.extra.items() if k in PASSTHROUGH_KEYS})
        if own:
            out[EXTRA_KEY] = own
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike, *, strict: bool = True) -> ModelConfig:
        """Read a config.json (or the config.json inside a directory); see :meth:`from_dict` for ``strict``."""
        from latentmoe.io import read_json

        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path, error=ConfigError, what="config"), strict=strict, source=str(path))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (temp file + rename)."""
        from latentmoe.io import write_json_atomic

        write_json_atomic(Path(path), self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        """Load ``latentmoe/presets/NAME.json``."""
        names = preset_names()
        if name not in names:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(names)}")
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name}.json").read_text()
        return cls.from_dict(json.loads(text), strict=True, source=f"preset {name}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes).validate()


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str) -> ModelConfig:
    """A preset name, a config.json path, or a directory holding config.json."""
    if os.path.sep in name_or_path or name_or_path.endswith(".json") or Path(name_or_path).is_dir():
        return ModelConfig.from_json(name_or_path)
    return ModelConfig.from_preset(name_or_path)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
