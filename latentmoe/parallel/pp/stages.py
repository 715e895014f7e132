"""Pipeline stages: a ``CausalLM`` cut by layer ranges into the modules ``torch.distributed.pipelining`` runs.

A run with ``--pp Q`` has ``N`` *virtual stages* (chunks): ``N = Q`` for 1F1B and ZB1P, ``N = 2Q`` for the
interleaved and V-shaped schedules (every rank holds two). Stage ``s`` holds decoder layers
``[c_0 + … + c_{s−1}, c_0 + … + c_s)`` for the per-stage layer counts ``c`` (``--pp-layers``; default
:func:`latentmoe.plan.pipeline.balanced_split` of the planner's per-layer forward FLOPs). Pinned to the ends::

    stage 0        embed_tokens → its layers
    stage s        its layers
    stage N − 1    its layers → norm → lm_head → MTP modules (each: embed t_{i+k}, combine, block, head)
                   → the training loss of the micro-batch (the trainer's loss function)

**What crosses a stage boundary**: the residual stream ``hidden [b, S, D]`` and the running sum of the
sequence-wise balance losses of the MoE layers so far (``balance [1]``, so the last stage's α·balance term
back-propagates into every stage's routers). The token ids reach every stage as a keyword argument of the
schedule (torch passes kwargs to all stages): the last stage needs them for the targets and for MTP's future
tokens, and every stage for its RoPE positions.

**The shared embedding** (TR §2.2: MTP shares the embedding and the output head with the main model). The
last stage needs ``embed_tokens`` for MTP (and ``lm_head`` is ``embed_tokens`` itself with
``tie_word_embeddings``). Under the V-shaped schedules (DualPipeV, ZBV) stage 0 and stage N − 1 sit on the same
rank, so it is one tensor and nothing needs keeping in sync. Under 1F1B / interleaved / ZB1P they sit on pipeline
ranks 0 and ``(N−1) mod Q``: the last stage holds a replica, and after backward the two ranks sum their embedding
gradients (Megatron's tied word embeddings); both replicas then take the same AdamW step from the same state and
stay equal bit for bit. The gradient norm counts the tensor once (on the first stage).

**Expert load and losses** do not travel through the pipeline: each chunk adds its MoE layers' loads into its
:class:`StageModel`'s step accumulator (global MoE row order, ``CausalLM.moe_layers``), and the last chunk records
the micro-batch's loss parts; the strategy all-reduces both after the schedule ran.

:class:`StageModel` is what the trainer holds on a rank: only this rank's modules, under the full model's
parameter names (``model.layers.3.*`` stays ``model.layers.3.*``), so optimizers, checkpoints and the
expert-parallel hooks work on it as on a ``CausalLM``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentmoe.config import ConfigError, ModelConfig
from latentmoe.model.moe import MoE, update_bias
from latentmoe.model.transformer import CausalLM, CausalLMOutput, run_mtp
from latentmoe.plan.arch import arch_from_model_config
from latentmoe.plan.pipeline import balanced_split, layer_costs

EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class StageSpec:
    """Virtual stage ``index`` of ``n_stages``: its decoder ``layers`` (consecutive indices, possibly none)."""

    index: int
    n_stages: int
    layers: tuple[int, ...]

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


def layer_split(config: ModelConfig, n_stages: int, layers: Sequence[int] | None, *, seq_len: int) -> list[int]:
    """Decoder layers per virtual stage: ``layers`` checked, or the planner's FLOP-balanced split."""
    L = config.num_hidden_layers
    if layers is None:
        return balanced_split(layer_costs(arch_from_model_config(config, "model"), seq_len=seq_len), n_stages)
    layers = list(layers)
    if len(layers) != n_stages:
        raise ConfigError(f"--pp-layers gives {len(layers)} stages, the schedule has {n_stages} virtual stages")
    if any(c < 0 for c in layers) or sum(layers) != L:
        raise ConfigError(f"--pp-layers {','.join(map(str, layers))} must be >= 0 each and sum to the {L} layers")
    return layers


def stage_specs(counts: Sequence[int]) -> list[StageSpec]:
    """The :class:`StageSpec` of every virtual stage of a split."""
    specs, start = [], 0
    for s, c in enumerate(counts):
        specs.append(StageSpec(s, len(counts), tuple(range(start, start + c))))
        start += c
    return specs


def moe_rows(config: ModelConfig) -> dict[str, int]:
    """Row of each MoE layer in ``expert_load`` (``CausalLM.moe_layers`` order): ``"layer i"`` / ``"MTP k"``."""
    names = [f"layer {i}" for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    L = config.num_hidden_layers
    names += [f"MTP {k}" for k in range(1, config.num_nextn_predict_layers + 1) if config.is_moe_layer(L + k - 1)]
    return {name: row for row, name in enumerate(names)}


class StageModel(nn.Module):
    """This rank's virtual stages of a ``CausalLM``, under the full model's names (see the module docstring).

    model: the full model (identical on every rank; this rank keeps references to its own modules only);
    specs: this rank's virtual stages; replicate_embedding: hold ``embed_tokens`` on the last stage although the
    first stage lives elsewhere (non-V schedules with MTP or tied embeddings).
    """

    def __init__(self, model: CausalLM, specs: Sequence[StageSpec], *, replicate_embedding: bool) -> None:
        super().__init__()
        self.config: ModelConfig = model.config
        self.specs = list(specs)
        self.holds_first = any(s.first for s in specs)
        self.holds_last = any(s.last for s in specs)
        self.model = nn.Module()
        if self.holds_first or (self.holds_last and replicate_embedding):
            self.model.embed_tokens = model.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for s in specs for i in s.layers})
        if self.holds_last:
            self.model.norm = model.model.norm
            self.lm_head = model.lm_head
            self.mtp = model.mtp
        self.rotary = model.rotary
        self._rows = moe_rows(self.config)
        self.n_moe_rows = len(self._rows)
        # Set by the strategy around each schedule step; read by the chunks.
        self.loss_fn: Callable[[Any, torch.Tensor], Any] | None = None
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.compute_mtp = True  # validation measures the main head only
        self.reset_step()
        # The chunks reference this model's modules; kept out of the module tree so names stay the model's.
        object.__setattr__(self, "chunks", [StageChunk(self, s) for s in specs])

    # ------------------------------------------------------------------ what the trainer calls
    def _owned_moe(self) -> list[tuple[str, MoE]]:
        out = [(f"layer {i}", self.model.layers[str(i)].mlp) for i in sorted(map(int, self.model.layers))
               if self.model.layers[str(i)].is_moe]
        if self.holds_last:
            out += [(f"MTP {k}", m.block.mlp) for k, m in enumerate(self.mtp, 1) if m.block.is_moe]
        return out

    def moe_layers(self) -> list[MoE]:
        """This rank's MoE FFNs, in global ``expert_load`` row order."""
        return [moe for _, moe in self._owned_moe()]

    def moe_layer_labels(self) -> list[str]:
        """Labels of every row of the (global) expert load, as ``trainer.moe_layer_labels`` names them."""
        return list(self._rows)

    @torch.no_grad()
    def update_router_biases(self, expert_load_LE: torch.Tensor, gamma: float) -> None:
        """The aux-loss-free bias update of this rank's MoE layers from the *global* load (all rows)."""
        if expert_load_LE.shape[0] != self.n_moe_rows:
            raise ValueError(f"expert load has {expert_load_LE.shape[0]} rows, the model {self.n_moe_rows} MoE layers")
        for name, moe in self._owned_moe():
            bias = moe.gate.e_score_correction_bias
            if bias is not None:
                bias.copy_(update_bias(bias, expert_load_LE[self._rows[name]], gamma))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a pipeline stage runs under its schedule (PipelineStrategy), not as a whole model")

    # ------------------------------------------------------------------ step accumulators
    def reset_step(self) -> None:
        self.step_load = torch.zeros(self.n_moe_rows, self.config.n_routed_experts)
        self.step_losses: list[list[torch.Tensor]] = []

    def record_load(self, name: str, load_E: torch.Tensor) -> None:
        self.step_load[self._rows[name]] += load_E.detach().to(self.step_load.device, torch.float32)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[S, R/2]`` of positions 0..S−1 (training windows start at 0)."""
        return self.rotary(torch.arange(seq_len, device=device))


class StageChunk(nn.Module):
    """One virtual stage's forward, as :class:`~torch.distributed.pipelining.PipelineStage` runs it.

    ``forward(ids_bS, *, ids_bS)`` on the first stage, ``forward(hidden_bSD, balance_1, *, ids_bS)`` on the others;
    returns ``(hidden_bSD, balance_1)``, or on the last stage the micro-batch's total loss (0-d).
    """

    def __init__(self, owner: StageModel, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        object.__setattr__(self, "owner", owner)  # not a submodule: parameters live in the owner's tree
        for i in spec.layers:
            self.add_module(f"layer{i}", owner.model.layers[str(i)])
        if spec.first:
            self.embed_tokens = owner.model.embed_tokens
        if spec.last:
            self.norm, self.lm_head, self.mtp = owner.model.norm, owner.lm_head, owner.mtp
            if hasattr(owner.model, "embed_tokens"):
                self.mtp_embed = owner.model.embed_tokens

    def forward(self, *acts: torch.Tensor, ids_bS: torch.Tensor) -> Any:
        owner, spec = self.owner, self.spec
        cos_SR, sin_SR = owner.rope(ids_bS.shape[1], ids_bS.device)
        with owner.forward_context():
            if spec.first:
                x_bSD = self.embed_tokens(acts[0])
                balance_1 = x_bSD.new_zeros(1, dtype=torch.float32)
            else:
                x_bSD, balance_1 = acts
            for i in spec.layers:
                out = getattr(self, f"layer{i}")(x_bSD, cos_SR, sin_SR)
                x_bSD = out.hidden_BSD
                if out.load_E is not None:
                    owner.record_load(f"layer {i}", out.load_E)
                    balance_1 = balance_1 + out.balance_loss
            if not spec.last:
                return x_bSD, balance_1
            return self._head_and_loss(x_bSD, balance_1, ids_bS, cos_SR, sin_SR)

    def _head_and_loss(self, x_bSD, balance_1, ids_bS, cos_SR, sin_SR) -> torch.Tensor:
        owner = self.owner
        hidden_bSD = self.norm(x_bSD)
        logits = self.lm_head(hidden_bSD)
        loads: list[torch.Tensor] = []
        mtp_logits: list[torch.Tensor] = []
        balance = balance_1.reshape(())
        if len(self.mtp) and owner.compute_mtp:
            mtp_logits, balance = run_mtp(
                self.mtp, self.mtp_embed, self.lm_head, hidden_bSD, ids_bS, cos_SR, sin_SR,
                loads=loads, balance=balance,
            )
        mtp_rows = [f"MTP {k}" for k, m in enumerate(self.mtp, 1) if m.block.is_moe][: len(loads)]
        for name, load_E in zip(mtp_rows, loads, strict=True):
            owner.record_load(name, load_E)
        out = CausalLMOutput(logits, mtp_logits, None, balance, hidden_bSD)
        loss = owner.loss_fn(out, ids_bS, None)  # loss masks (SFT) are refused under --pp: strategy.py
        balance_part = loss.balance if loss.balance is not None else torch.zeros(())
        owner.step_losses.append([t.detach().float().reshape(()) for t in (loss.total, loss.main, *loss.mtp)]
                                 + [balance_part.detach().float().reshape(())])
        return loss.total
