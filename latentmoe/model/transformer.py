"""Block, DeepseekModel and CausalLM: the DeepSeek-V3 stack (TR §2, Fig. 2–3).

    tokens → embed_tokens → [Block: x + MLA(RMSNorm x); x + FFN(RMSNorm x)] × L → norm → lm_head
                                                                      ↘ MTP modules (mtp.py) → lm_head

The FFN is a dense SwiGLU in the first ``first_k_dense_replace`` layers and DeepSeekMoE after that.
Parameter names follow the Hugging Face DeepSeek-V3 layout (``model.layers.N.self_attn.*``,
``model.layers.N.mlp.*``) except that routed experts are stacked per layer and MTP modules live in
``mtp.K`` rather than ``model.layers.{L+K}``; ``latentmoe.hf`` maps between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from latentmoe.config import ModelConfig
from latentmoe.model.mla import MLA, LatentCache
from latentmoe.model.moe import MLP, Experts, MoE, Router, update_bias
from latentmoe.model.mtp import MTPModule, shift_tokens_left
from latentmoe.model.norm import RMSNorm
from latentmoe.model.rope import RotaryEmbedding


@dataclass
class BlockOutput:
    hidden_BSD: torch.Tensor
    load_E: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense or MoE FFN, each with a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SR: torch.Tensor,
        sin_SR: torch.Tensor,
        *,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        attention: str = "materialised",
    ) -> BlockOutput:
        x_BSD = x_BSD + self.self_attn(
            self.input_layernorm(x_BSD), cos_SR, sin_SR, cache=cache, start_pos=start_pos, attention=attention
        )
        h_BSD = self.post_attention_layernorm(x_BSD)
        if self.is_moe:
            moe = self.mlp(h_BSD)
            return BlockOutput(x_BSD + moe.hidden_BSD, moe.load_E, moe.balance_loss)
        return BlockOutput(x_BSD + self.mlp(h_BSD))


class DeepseekModel(nn.Module):
    """Embedding, the L blocks and the final norm (HF ``model.*``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """Result of :meth:`CausalLM.forward` for input_ids ``[B, S]``.

    logits: ``[B, S, V]``, position i predicts token i+1.
    mtp_logits: one ``[B, S, V]`` per MTP depth k; position i predicts token i+k+1. The last k+1
        positions have no target in the sequence and hold values computed from padding (ignore them).
    expert_load: ``[n_moe_layers, n_routed_experts]`` fp32 assignment counts, main-model MoE layers first
        then MTP blocks' (the order of :meth:`CausalLM.moe_layers`); empty rows-dimension if no MoE.
    balance_loss: Σ over MoE layers of the unweighted sequence-wise balance loss (0 in eval mode).
    hidden: ``[B, S, D]`` final hidden state after the last norm (what the head reads; MTP depth 1 input).
    """

    logits: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    expert_load: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class CausalLM(nn.Module):
    """DeepSeek-V3-style causal LM with MTP heads. ``forward(input_ids_BS) -> CausalLMOutput``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = DeepseekModel(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPModule(config, Block(config, L + k)) for k in range(config.num_nextn_predict_layers)
        )
        self.reset_parameters()

    # ------------------------------------------------------------------ init and bookkeeping
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as torchtitan's DeepSeek-V3 does (``init_weights``), not with one std for everything.

        * input projections, routers and expert gate/up: Normal(0, ``initializer_range``);
        * projections *into the residual stream* (``o_proj``, ``down_proj`` of every FFN and expert):
          Normal(0, initializer_range / sqrt(2 (l + 1))) for layer l ("depth init"), so that the deeper blocks
          start closer to the identity;
        * ``embed_tokens``: Normal(0, 1) — the token's own embedding dominates the residual at first, so the
          head learns bigram statistics at once instead of plateauing near the unigram loss;
        * ``lm_head``: truncated Normal(0, D^-1/2) at ±3σ (logits of order 1 over a unit-RMS hidden state);
        * norms 1, biases and router biases 0.

        HF / DeepSeek's reference use Normal(0, 0.02) for all of them; with ``small`` that plateaus at the unigram
        loss for its first ~40 steps (docs/mtp.md "Training the small model")."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
            elif isinstance(module, Experts):
                for w in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(w, std=std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        blocks = list(self.model.layers) + [m.block for m in self.mtp]
        for block in blocks:
            depth_std = std / math.sqrt(2 * (block.layer_idx + 1))
            nn.init.normal_(block.self_attn.o_proj.weight, std=depth_std)
            ffn = block.mlp
            for mlp in (ffn.experts, ffn.shared_experts) if block.is_moe else (ffn,):
                if mlp is None:
                    continue
                nn.init.normal_(mlp.down_proj if isinstance(mlp, Experts) else mlp.down_proj.weight, std=depth_std)
        head_std = self.config.hidden_size**-0.5  # a tied embedding takes the head's init (logits stay of order 1)
        nn.init.trunc_normal_(self.lm_head.weight, std=head_std, a=-3 * head_std, b=3 * head_std)

    def moe_layers(self) -> list[MoE]:
        """MoE FFNs in ``expert_load`` row order: main-model layers, then MTP blocks."""
        blocks = list(self.model.layers) + [m.block for m in self.mtp]
        return [b.mlp for b in blocks if b.is_moe]

    @torch.no_grad()
    def update_router_biases(self, expert_load_LE: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing after an optimizer step: b −= γ·sign(load − mean), per MoE layer.

        The bias is a buffer, changed here outside autograd; it steers selection only.
        """
        for moe, load_E in zip(self.moe_layers(), expert_load_LE, strict=True):
            bias = moe.gate.e_score_correction_bias
            if bias is not None:
                bias.copy_(update_bias(bias, load_E, gamma))

    def num_parameters(self, *, include_mtp: bool = True, include_router_bias: bool = False) -> int:
        """Trainable parameters, shared tensors counted once.

        ``include_router_bias`` adds the routers' ``e_score_correction_bias`` buffers, which are stored
        in checkpoints but are not trained by the optimizer; the paper's 671,026,419,200 counts them.
        """
        seen: set[int] = set()
        total = 0
        tensors = list(self.named_parameters())
        if include_router_bias:
            tensors += [(n, b) for n, b in self.named_buffers() if n.endswith("e_score_correction_bias")]
        for name, p in tensors:
            if not include_mtp and name.startswith("mtp."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def new_cache(self, *, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A latent KV cache for the main model's layers (the MTP blocks are not cached here)."""
        p = self.lm_head.weight
        return LatentCache(
            self.config,
            batch_size=batch_size,
            max_length=max_length,
            num_layers=self.config.num_hidden_layers,
            dtype=dtype or p.dtype,
            device=p.device,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids_BS: torch.Tensor,
        *,
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        compute_mtp: bool = True,
        attention: str = "materialised",
    ) -> CausalLMOutput:
        """Logits for every position; with ``cache``, positions start at ``start_pos`` and the latent
        KV of these positions is written into it (then a :class:`LatentCache`'s ``length`` is advanced).

        ``start_pos`` may be a ``[B]`` tensor (one start per sequence; the inference engine's paged cache).
        ``attention``: "materialised" (reference), "absorbed" or "auto" (see ``latentmoe.model.mla``).
        """
        S = input_ids_BS.shape[1]
        cos_SR, sin_SR = self.rope_tables(start_pos, S, input_ids_BS.device)
        x_BSD = self.model.embed_tokens(input_ids_BS)
        loads: list[torch.Tensor] = []
        balance = x_BSD.new_zeros((), dtype=torch.float32)
        for block in self.model.layers:
            out = block(x_BSD, cos_SR, sin_SR, cache=cache, start_pos=start_pos, attention=attention)
            x_BSD = out.hidden_BSD
            if out.load_E is not None:
                loads.append(out.load_E)
                balance = balance + out.balance_loss
        hidden_BSD = self.model.norm(x_BSD)
        logits = self.lm_head(hidden_BSD)
        if isinstance(cache, LatentCache):
            cache.length = start_pos + S

        mtp_logits = []
        if compute_mtp and len(self.mtp) and cache is None:
            mtp_logits, balance = run_mtp(
                self.mtp, self.model.embed_tokens, self.lm_head, hidden_BSD, input_ids_BS, cos_SR, sin_SR,
                loads=loads, balance=balance,
            )

        expert_load = torch.stack(loads) if loads else torch.zeros(0, self.config.n_routed_experts)
        return CausalLMOutput(logits, mtp_logits, expert_load.detach(), balance, hidden_BSD)

    def rope_tables(
        self, start_pos: int | torch.Tensor, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions ``start_pos + [0, seq_len)``: ``[S, R/2]`` for an int start, ``[B, S, R/2]``
        for a ``[B]`` tensor of starts. Raises ValueError past ``max_position_embeddings``."""
        offsets_S = torch.arange(seq_len, device=device)
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.to(device)[:, None] + offsets_S[None, :]
            last = int(positions.max()) if positions.numel() else 0
        else:
            positions = start_pos + offsets_S
            last = start_pos + seq_len - 1
        if last >= self.config.max_position_embeddings:
            raise ValueError(f"position {last} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        cos, sin = self.rotary(positions.flatten())
        return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)

    def mtp_forward(
        self,
        depth: int,
        prev_hidden_BSD: torch.Tensor,
        future_ids_BS: torch.Tensor,
        *,
        cache,
        start_pos: int | torch.Tensor,
        attention: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module ``depth`` (1-based) on its own cache layer (layer index L + depth − 1), for drafting.

        ``prev_hidden_BSD`` is h^{depth-1} at these positions (``out.hidden`` of the main model for depth 1)
        and ``future_ids_BS`` the tokens t_{i+depth} (docs/mtp.md). Returns the module's block output
        ``[B, S, D]`` (h^depth, the next depth's input) and its logits ``[B, S, V]`` (predicting t_{i+depth+1}).
        """
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"depth must be in [1, {len(self.mtp)}], got {depth}")
        module = self.mtp[depth - 1]
        cos_SR, sin_SR = self.rope_tables(start_pos, future_ids_BS.shape[1], future_ids_BS.device)
        h_BSD = module.combine(prev_hidden_BSD, self.model.embed_tokens(future_ids_BS))
        out = module.block(h_BSD, cos_SR, sin_SR, cache=cache, start_pos=start_pos, attention=attention)
        return out.hidden_BSD, self.lm_head(module.shared_head.norm(out.hidden_BSD))


def run_mtp(
    modules: nn.ModuleList,
    embed_tokens: nn.Embedding,
    lm_head: nn.Linear,
    hidden_BSD: torch.Tensor,
    input_ids_BS: torch.Tensor,
    cos_SR: torch.Tensor,
    sin_SR: torch.Tensor,
    *,
    loads: list[torch.Tensor],
    balance: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The MTP modules in sequence over the main model's final hidden state (training forward, no cache).

    Depth k embeds t_{i+k} with the main model's ``embed_tokens`` and predicts with its ``lm_head`` (docs/mtp.md).
    Each MoE block's load is appended to ``loads``; returns the logits per depth and ``balance`` plus the blocks'
    balance losses. (``CausalLM.forward`` and the last pipeline stage both run it.)"""
    logits = []
    prev_BSD = hidden_BSD
    for k, module in enumerate(modules, 1):
        future_BSD = embed_tokens(shift_tokens_left(input_ids_BS, k))
        out = module.block(module.combine(prev_BSD, future_BSD), cos_SR, sin_SR)
        prev_BSD = out.hidden_BSD
        if out.load_E is not None:
            loads.append(out.load_E)
            balance = balance + out.balance_loss
        logits.append(lm_head(module.shared_head.norm(prev_BSD)))
    return logits, balance


def empty_model(
    config: ModelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> CausalLM:
    """A :class:`CausalLM` with uninitialised ``dtype`` storage on ``device`` (router biases fp32), for loading.

    Built on the meta device (no memory, no initialisation), then allocated once, straight on the target device:
    a checkpoint is read into it without a full copy on the host first. Tied weights stay tied and the computed
    (non-persistent) RoPE tables are rebuilt on the device."""
    return materialize(meta_model(config, dtype=dtype), device=device)


def meta_model(config: ModelConfig, *, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A :class:`CausalLM` on the meta device (shapes only) in ``dtype``, router biases fp32.

    What may be reshaped before any memory is spent (an expert-parallel run cuts each MoE layer to its own
    experts here); :func:`materialize` then allocates what is left, once, on the target device."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router) and module.e_score_correction_bias is not None:
            module.e_score_correction_bias = module.e_score_correction_bias.float()  # selection state stays fp32
    return model


def materialize(model: CausalLM, *, device: torch.device | str | None = None) -> CausalLM:
    """Allocate a :func:`meta_model` (uninitialised) on ``device`` (default the host), in place; returns it."""
    from latentmoe.device import HOST, resolve_device

    device = resolve_device(device) if device is not None else HOST
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for first, *others in (names for names in shared.values() if len(names) > 1):  # to_empty unties: re-tie
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    with device:
        model.rotary = RotaryEmbedding(model.config)  # computed (non-persistent) tables: rebuild rather than load
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set and module is not model.rotary:
            raise RuntimeError(f"materialize cannot rebuild the computed buffers of {name}; update it")
    return model
