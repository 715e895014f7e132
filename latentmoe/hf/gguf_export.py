"""GGUF export: a :class:`CausalLM` as llama.cpp's ``deepseek2`` architecture, written with the ``gguf`` library.

What llama.cpp's own converter (``convert_hf_to_gguf.py``, class ``DeepseekV2Model``) writes for a DeepSeek-V2/V3
checkpoint, and what its loader (``src/models/deepseek2.cpp``) reads, is what we write:

- **Tensor names** come from ``gguf``'s own table (``gguf.get_tensor_name_map(MODEL_ARCH.DEEPSEEK2, L)``) applied
  to our (= Hugging Face) names; nothing is named by hand here. Routed experts are already stacked in our model
  (``[E, I, D]``), which is the "merged" tensor llama.cpp expects (``blk.N.ffn_{gate,up,down}_exps``).
- **MLA.** ``kv_b_proj`` ``[H·(d_nope + d_v), r]`` is split per head into ``attn_k_b`` ``[H, r, d_nope]``
  (W^UK, transposed) and ``attn_v_b`` ``[H, d_v, r]`` (W^UV): llama.cpp runs the absorbed form and treats the
  latent as one shared KV head (``head_count_kv = 1``, ``key_length = r + d_rope``, ``value_length = r``; the
  per-head sizes go to ``key_length_mla`` / ``value_length_mla``). RoPE pairs are interleaved in both (no
  permutation).
- **Routing.** The router bias (``e_score_correction_bias``) becomes ``blk.N.exp_probs_b.bias`` (fp32);
  ``expert_gating_func`` is written explicitly (llama.cpp assumes softmax without it); group-limited routing
  (``noaux_tc``) writes ``expert_group_count`` / ``expert_group_used_count`` — llama.cpp scores a group by the sum
  of its two best biased scores, as DeepSeek-V3 and our router do. DeepSeek-V2's ``group_limited_greedy`` (a
  group's *max*) has no llama.cpp equivalent and is refused when groups are actually limited.
- **Tokenizer** (``tokenizer.ggml.*``): a byte-level BPE (``tokenizers``' ``ByteLevel`` pre-tokenizer with the GPT-2
  regex, which our trained tokenizers are) is llama.cpp's ``gpt2`` model with the ``gpt-2`` pre-tokenizer; the
  vocabulary is padded to ``vocab_size`` with ``[PADi]`` (unused) entries as llama.cpp's converter does; special
  ids, ``add_bos_token`` / ``add_eos_token`` (the tokenizer's own prompt-encoding rule) and the chat template go
  with it.
- **Dtypes.** ``f32`` / ``f16`` / ``bf16`` for the matrices; 1-D tensors (norms, router bias) and the router
  weight ``ffn_gate_inp`` stay f32, as in llama.cpp's converter.
- **Not written:** MTP modules (llama.cpp's DeepSeek-V2/V3 converter drops them too; it has no DeepSeek MTP).

The file carries ``latentmoe.export`` in its metadata (llama.cpp ignores unknown keys); that is how a later export
knows an existing file is ours and may be replaced. Any other existing file is refused unless ``overwrite``.
The file is written to a temporary sibling and renamed into place (latentmoe.io).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from latentmoe.config import ModelConfig
from latentmoe.data.tokenizer import PAD_TOKEN
from latentmoe.hf.errors import HFCheckpointError
from latentmoe.hf.tokenizer import HFTokenizer, as_hf_tokenizer, chat_template_of
from latentmoe.io import DestinationError, atomic_path, check_file_destination, one_line
from latentmoe.model.transformer import CausalLM

GGUF_ARCH = "deepseek2"
OWNER_KEY = "latentmoe.export"
OWNER_VALUE = "gguf"
GGUF_SUFFIX = ".gguf"
# llama.cpp's tokenizer model for byte-level BPE, and the pre-tokenizer whose regex is the GPT-2 one that
# tokenizers' ByteLevel(use_regex=True) applies.
TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "gpt-2"
TOPK_GREEDY = "greedy"
TOPK_GROUP_MAX = "group_limited_greedy"


@dataclass(frozen=True)
class GGUFVocab:
    """``tokenizer.ggml.*``: ``tokens`` / ``token_types`` indexed by id (``vocab_size`` long), ``merges`` as
    ``"a b"`` strings, the special ids (None when absent), and the prompt-encoding flags."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


@dataclass(frozen=True)
class GGUFResult:
    """What :func:`save_gguf` wrote: the file, its tensor count and size, and the weights' GGUF type name."""

    path: Path
    num_tensors: int
    total_bytes: int
    dtype: str


def gguf_types():
    """``{torch dtype: (GGMLQuantizationType, LlamaFileType)}`` for the dtypes we write (imports gguf lazily)."""
    import gguf

    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {torch.float32: (Q.F32, F.ALL_F32), torch.float16: (Q.F16, F.MOSTLY_F16),
            torch.bfloat16: (Q.BF16, F.MOSTLY_BF16)}


def check_exportable(config: ModelConfig) -> None:
    """HFCheckpointError naming the field when llama.cpp's deepseek2 graph would compute another function."""
    if config.n_routed_experts and config.moe_layer_freq != 1:
        raise HFCheckpointError(f"moe_layer_freq {config.moe_layer_freq} cannot be exported to GGUF: llama.cpp's "
                                "deepseek2 makes every layer after first_k_dense_replace an MoE layer")
    if config.topk_method == TOPK_GROUP_MAX and config.topk_group < config.n_group:
        raise HFCheckpointError(
            f"topk_method {config.topk_method!r} with n_group {config.n_group} / topk_group {config.topk_group} "
            "cannot be exported to GGUF: llama.cpp scores an expert group by its top-2 sum, not its max"
        )


def gguf_tensors(model: CausalLM, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The main model's tensors under GGUF names, in torch layout (GGUF's dims are these shapes reversed).

    ``dtype``: of the matrices (None: the model's); 1-D tensors and the router weight are fp32. MTP modules are
    left out. Raises HFCheckpointError naming a tensor that has no deepseek2 name (nothing is dropped silently).
    """
    import gguf

    config = model.config
    check_exportable(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, config.num_hidden_layers)
    router = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].rsplit(".", 1)[-1]  # "ffn_gate_inp"
    H, N, V, R = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp."):
            continue
        tensor = tensor.detach()
        if name.endswith("kv_b_proj.weight"):  # W^UK / W^UV per head, as llama.cpp's absorbed MLA reads them
            w_HXR = tensor.view(H, N + V, R)
            parts = {name.replace("kv_b_proj", "k_b_proj"): w_HXR[:, :N].transpose(1, 2),
                     name.replace("kv_b_proj", "v_b_proj"): w_HXR[:, N:]}
        elif name.endswith("e_score_correction_bias"):
            parts = {name.replace("e_score_correction_bias", "e_score_correction.bias"): tensor}
        elif "mlp.experts." in name and not name.endswith(".weight"):  # our stacked [E, ...] experts
            parts = {f"{name}.weight": tensor}
        else:
            parts = {name: tensor}
        for hf_name, value in parts.items():
            key = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if key is None:
                raise HFCheckpointError(f"{name}: no GGUF deepseek2 tensor corresponds to it; cannot export")
            keep_fp32 = value.dim() <= 1 or key.split(".")[2:3] == [router]
            out[key] = value.to(torch.float32 if keep_fp32 else dtype or value.dtype).contiguous()
    return out


def gguf_vocab(tokenizer: HFTokenizer | Tokenizer, config: ModelConfig) -> GGUFVocab:
    """The ``tokenizer.ggml.*`` content of a byte-level BPE tokenizer for a model of ``config``.

    HFCheckpointError when the tokenizer is not one llama.cpp's ``gpt2`` model reproduces (another model type or
    pre-tokenizer), or holds more ids than the model's vocabulary.
    """
    import gguf

    tok = as_hf_tokenizer(tokenizer, config=config)
    spec = json.loads(tok.tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise HFCheckpointError(f"tokenizer model {model.get('type')!r} cannot be exported to GGUF (only BPE)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        raise HFCheckpointError(
            f"pre-tokenizer {pre.get('type')!r} cannot be exported to GGUF: only the byte-level BPE with the GPT-2 "
            "split (tokenizers' ByteLevel, use_regex true, add_prefix_space false) maps to a llama.cpp tokenizer"
        )
    tokens: list[str | None] = [None] * config.vocab_size
    types = [int(gguf.TokenType.UNUSED)] * config.vocab_size
    for text, token_id in model.get("vocab", {}).items():
        _place(tokens, types, token_id, text, int(gguf.TokenType.NORMAL), config)
    for token_id, added in tok.tokenizer.get_added_tokens_decoder().items():
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        _place(tokens, types, token_id, added.content, int(kind), config)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(key: str) -> int | None:
        text = tok.special_tokens.get(key)
        return tok.tokenizer.token_to_id(text) if text is not None else None

    pad = special("pad_token")
    if pad is None:
        pad = tok.tokenizer.token_to_id(PAD_TOKEN)
    return GGUFVocab(
        tokens=[t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)],
        token_types=types,
        merges=merges,
        bos_token_id=special("bos_token") if "bos_token" in tok.special_tokens else config.bos_token_id,
        eos_token_id=special("eos_token") if "eos_token" in tok.special_tokens else config.eos_token_id,
        pad_token_id=pad,
        add_bos_token=tok.adds_bos,
        add_eos_token=tok.adds_eos,
        chat_template=chat_template_of(tok)[0],
    )


def _place(tokens: list, types: list, token_id: int, text: str, kind: int, config: ModelConfig) -> None:
    if not 0 <= token_id < config.vocab_size:
        raise HFCheckpointError(f"tokenizer token {text!r} has id {token_id}, outside the model's vocab_size "
                                f"{config.vocab_size}; cannot export to GGUF")
    tokens[token_id], types[token_id] = text, kind


def is_our_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF file latentmoe exported (its metadata holds our marker)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).get_field(OWNER_KEY)
        return field is not None and field.contents() == OWNER_VALUE
    except Exception:  # not a GGUF file at all (gguf raises ValueError, struct.error, ...)
        return False


def save_gguf(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    tokenizer: HFTokenizer | Tokenizer,
    dtype: torch.dtype | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFResult:
    """Write ``model`` + ``tokenizer`` to the GGUF file ``path`` (llama.cpp ``deepseek2``); see the module docstring.

    dtype: torch.float32 / float16 / bfloat16 for the matrices (None: the model's, which must be one of those).
    ``path`` must be new or a GGUF file we exported; with ``overwrite`` any other file there is replaced.
    """
    import gguf

    path = Path(path)
    try:
        check_file_destination(path, ours=is_our_gguf, overwrite=overwrite)
    except DestinationError as exc:
        raise HFCheckpointError(str(exc)) from None
    config = model.config
    types = gguf_types()
    stored = dtype or model.lm_head.weight.dtype
    if stored not in types:
        raise HFCheckpointError(f"dtype {stored} cannot be written to GGUF (f32, f16 or bf16)")
    tensors = gguf_tensors(model, dtype=stored)
    vocab = gguf_vocab(tokenizer, config)
    try:
        with atomic_path(path) as tmp:
            writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
            _write_metadata(writer, config, vocab, file_type=types[stored][1], name=name or path.stem)
            for key, tensor in tensors.items():
                if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hand over the raw 16-bit words
                    writer.add_tensor(key, tensor.view(torch.int16).numpy(), raw_dtype=types[torch.bfloat16][0])
                else:
                    writer.add_tensor(key, tensor.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as exc:
        raise HFCheckpointError(f"{path}: cannot write ({one_line(exc)})") from None
    return GGUFResult(path=path, num_tensors=len(tensors), total_bytes=path.stat().st_size,
                      dtype=types[stored][0].name)


def _write_metadata(writer, config: ModelConfig, vocab: GGUFVocab, *, file_type: int, name: str) -> None:
    """The ``general.*``, ``deepseek2.*`` and ``tokenizer.ggml.*`` keys llama.cpp's deepseek2 loader reads."""
    import gguf

    c = config
    writer.add_string(OWNER_KEY, OWNER_VALUE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(1)  # the latent is one KV head shared by all heads (absorbed MLA)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(c.rope_theta))
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_q_lora_rank(c.q_lora_rank or 0)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    moe = c.n_routed_experts > 0
    writer.add_leading_dense_block_count(c.first_k_dense_replace if moe else c.num_hidden_layers)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_shared_count(c.n_shared_experts)
    if moe:
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_weights_scale(float(c.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(c.norm_topk_prob))
        gating = gguf.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
        writer.add_expert_gating_func(gating)
        if c.topk_method != TOPK_GREEDY and c.n_group > 1:
            writer.add_expert_group_count(c.n_group)
            writer.add_expert_group_used_count(c.topk_group)
    yarn = c.yarn
    if yarn is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(yarn["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(yarn["original_max_position_embeddings"]))
        # llama.cpp's deepseek2 reads this key divided by 0.1 (its converter writes 0.1 · mscale_all_dim)
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(yarn.get("mscale_all_dim") or 0.0))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if yarn.get(key) is not None:
                add(float(yarn[key]))
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos_token_id, writer.add_bos_token_id), (vocab.eos_token_id, writer.add_eos_token_id),
                       (vocab.pad_token_id, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos_token)
    writer.add_add_eos_token(vocab.add_eos_token)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
