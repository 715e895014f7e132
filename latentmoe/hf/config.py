"""config.json ⇄ :class:`ModelConfig`: the official DeepSeek dialect and the one transformers 5 writes.

Two dialects of the same file exist:

- DeepSeek's own (``deepseek-ai/DeepSeek-V3``): ``rope_theta`` + ``rope_scaling`` (``"type": "yarn"``),
  ``scoring_func``, ``topk_method``, and ``quantization_config`` for the FP8 release;
- transformers 5's ``save_pretrained``: ``rope_parameters`` (theta and scaling in one dict),
  ``rope_interleave``, derived ``qk_head_dim`` / ``head_dim``, and *no* ``scoring_func`` / ``topk_method``
  (the class implies them: DeepSeek-V3 is sigmoid + bias + group-limited top-k, DeepSeek-V2 softmax).

:func:`config_from_hf` reads either into a :class:`ModelConfig` plus the facts that matter only for the
weights (rope layout, FP8 block size); :func:`config_to_hf` writes both dialects at once (``rope_theta`` /
``rope_scaling`` for DeepSeek's code and llama.cpp, ``rope_parameters`` for transformers) and spells the
routing keys out, because llama.cpp's converter silently assumes softmax without ``scoring_func``.
Anything we cannot run faithfully is an :class:`HFCheckpointError` naming the key and its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from latentmoe.config import EXTRA_KEY, ConfigError, ModelConfig
from latentmoe.hf.errors import HFCheckpointError

ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
# What each model class implies when a config.json leaves the key out (transformers' class defaults).
IMPLIED: dict[str, dict[str, Any]] = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    "deepseek_v2": {
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
    },
}
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# Derived from the model on save, never copied through from a loaded config.json.
REWRITTEN = ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version",
             "rope_parameters", "rope_interleave", "qk_head_dim", "head_dim", "num_mtp_layers")
FP8_FORMATS = ("e4m3",)
UNSUPPORTED_TRUE = ("mlp_bias",)  # DeepSeek-V2 option for biases in the FFN projections: none in our MLP
FP8_METHOD = "fp8"


@dataclass(frozen=True)
class FP8Quantization:
    """``quantization_config`` of a block-quantised FP8 checkpoint: weights stored as float8_e4m3fn, one fp32
    ``weight_scale_inv`` multiplier per ``block`` = (rows, cols) tile (DeepSeek-V3: 128 × 128)."""

    block: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class HFConfig:
    """A config.json, read: the model config and what the weights need beyond it.

    rope_interleave: False when the q/k RoPE channels are stored as two halves (transformers' rotate_half
        layout) instead of interleaved pairs; the loader then permutes those rows into our interleaved order.
    fp8: the block quantisation, or None for a full-precision checkpoint.
    """

    config: ModelConfig
    rope_interleave: bool = True
    fp8: FP8Quantization | None = None


def config_from_hf(data: dict[str, Any], *, source: str = "config.json") -> HFConfig:
    """Read a DeepSeek-V3/V2 config.json dict (either dialect). ``source`` names the file in errors."""
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{source}: not a JSON object")
    data = dict(data)
    model_type = data.get("model_type")
    if model_type not in IMPLIED:
        raise HFCheckpointError(
            f"{source}: model_type {model_type!r} is not supported (expected one of {', '.join(IMPLIED)})"
        )
    for key, value in IMPLIED[model_type].items():
        data.setdefault(key, value)
    for key in ("n_group", "topk_group"):
        if data.get(key) is None:  # transformers' DeepSeek-V2 writes null for "no groups"
            data[key] = 1
    if data.get("num_nextn_predict_layers") is None:
        data["num_nextn_predict_layers"] = data.get("num_mtp_layers") or 0
    if isinstance(data.get("eos_token_id"), list):  # generation stops at the first one listed
        data["eos_token_id"] = data["eos_token_id"][0] if data["eos_token_id"] else None
    data["rope_theta"], data["rope_scaling"] = _rope_from_hf(data, source)
    rope_interleave = data.get("rope_interleave", True)
    if not isinstance(rope_interleave, bool):
        raise HFCheckpointError(f"{source}: rope_interleave must be true or false, got {rope_interleave!r}")
    fp8 = _fp8_from_hf(data.get("quantization_config"), source)
    for key in UNSUPPORTED_TRUE:
        if data.get(key):
            raise HFCheckpointError(f"{source}: {key} {data[key]!r} is not supported (only false)")
    derived = {key: data.get(key) for key in ("qk_head_dim", "head_dim")}
    for key in REWRITTEN:
        data.pop(key, None)
    try:
        config = ModelConfig.from_dict(data, source=source)
    except ConfigError as exc:
        raise HFCheckpointError(str(exc)) from None
    expected = {"qk_head_dim": config.qk_head_dim, "head_dim": config.qk_rope_head_dim}
    for key, value in derived.items():
        if value is not None and value != expected[key]:
            raise HFCheckpointError(f"{source}: {key} {value!r} is not supported (this layout implies {expected[key]})")
    return HFConfig(config=config, rope_interleave=rope_interleave, fp8=fp8)


def config_to_hf(config: ModelConfig, *, dtype: str, num_mtp_layers: int) -> dict[str, Any]:
    """The config.json dict for a model saved in the Hugging Face layout (both rope dialects, routing explicit).

    ``dtype``: the weights' dtype name ("bfloat16", "float32"); ``num_mtp_layers``: MTP modules in the files.
    """
    out = {k: v for k, v in config.to_dict().items() if k not in REWRITTEN}
    out.update(out.pop(EXTRA_KEY, {}))  # an HF config.json keeps every key at the top level
    out["architectures"] = [ARCHITECTURES.get(config.model_type, ARCHITECTURES["deepseek_v3"])]
    out["num_nextn_predict_layers"] = num_mtp_layers
    out["q_lora_rank"] = config.q_lora_rank or None
    out["qk_head_dim"] = config.qk_head_dim
    out["head_dim"] = config.qk_rope_head_dim
    out["rope_interleave"] = True
    parameters: dict[str, Any] = {"rope_theta": float(config.rope_theta), "rope_type": "default"}
    if config.yarn is not None:
        yarn = {k: config.yarn[k] for k in YARN_KEYS if config.yarn.get(k) is not None}
        out["rope_scaling"] = {**yarn, "type": "yarn"}
        parameters.update(yarn, rope_type="yarn")
    else:
        out["rope_scaling"] = None
    out["rope_parameters"] = parameters
    out["torch_dtype"] = out["dtype"] = dtype
    return dict(sorted(out.items()))


def _rope_from_hf(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either dialect; both present must agree."""
    legacy = _rope_settings(data.get("rope_theta"), data.get("rope_scaling"), "rope_scaling", source)
    parameters = data.get("rope_parameters")
    if parameters is None:
        return legacy if legacy[0] is not None else (ModelConfig.rope_theta, legacy[1])
    if not isinstance(parameters, dict):
        raise HFCheckpointError(f"{source}: rope_parameters must be an object, got {parameters!r}")
    new = _rope_settings(parameters.get("rope_theta"), parameters, "rope_parameters", source)
    has_legacy = data.get("rope_theta") is not None or data.get("rope_scaling") is not None
    if has_legacy and (legacy[0] is not None and legacy[0] != new[0] or legacy[1] != new[1]):
        raise HFCheckpointError(f"{source}: rope_parameters {parameters!r} and rope_theta/rope_scaling disagree")
    return (new[0] if new[0] is not None else ModelConfig.rope_theta), new[1]


def _rope_settings(theta: Any, scaling: Any, key: str, source: str) -> tuple[float | None, dict[str, Any] | None]:
    """Normalise one rope description to ``(theta, yarn dict or None)``."""
    if theta is not None and not isinstance(theta, int | float):
        raise HFCheckpointError(f"{source}: rope_theta must be a number, got {theta!r}")
    if scaling is None:
        return (None if theta is None else float(theta)), None
    if not isinstance(scaling, dict):
        raise HFCheckpointError(f"{source}: {key} must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return (None if theta is None else float(theta)), None
    if kind != "yarn":
        raise HFCheckpointError(f"{source}: {key}.rope_type {kind!r} is not supported (only 'default' and 'yarn')")
    if scaling.get("truncate", True) is not True:
        raise HFCheckpointError(f"{source}: {key}.truncate {scaling['truncate']!r} is not supported (only true)")
    if scaling.get("attention_factor") is not None:
        raise HFCheckpointError(
            f"{source}: {key}.attention_factor {scaling['attention_factor']!r} is not supported (derived from mscale)"
        )
    yarn = {k: scaling[k] for k in YARN_KEYS if scaling.get(k) is not None}
    if "original_max_position_embeddings" not in yarn:
        raise HFCheckpointError(f"{source}: {key}.original_max_position_embeddings is required for YaRN")
    return (None if theta is None else float(theta)), {**yarn, "type": "yarn"}


def _fp8_from_hf(quant: Any, source: str) -> FP8Quantization | None:
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise HFCheckpointError(f"{source}: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != FP8_METHOD:
        raise HFCheckpointError(f"{source}: quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    fmt = quant.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise HFCheckpointError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    block = quant.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise HFCheckpointError(
            f"{source}: quantization_config.weight_block_size {block!r} is not supported (two positive integers)"
        )
    return FP8Quantization(block=(block[0], block[1]))
