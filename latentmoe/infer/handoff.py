"""Prefill on one engine, decode on another: what a prefilled request carries between them (the
prefill/decode disaggregation DeepSeek-V3 deploys, TR §3.4; docs/disaggregation.md has the server's side).

A *prefill* engine runs a prompt (:meth:`Engine.prefill_handoff <latentmoe.infer.engine.Engine.prefill_handoff>`:
the same ``ModelRunner.prefill`` as colocated serving — materialised MLA for a long prompt — and the same
first-token sampling), copies the prompt's latent cache rows out of its blocks and frees them at once. A
*decode* engine takes the result with ``Engine.new_request(prompt_ids, params, handoff=...)``: when its
scheduler admits the request, the runner writes the rows into the request's own blocks instead of running
the prompt, emits the first token, and decoding (absorbed MLA, MTP drafting) continues exactly as if the
decode engine had prefilled the prompt itself.

What travels, for n prompt tokens, L main-model layers and X = kv_lora_rank + qk_rope_head_dim:

    kv_LnX           [L, n, X]  latent cache rows in the cache's storage dtype (FP8: the raw E4M3 values)
    scale_Ln         [L, n]     fp32 per-token scales (FP8 cache only)
                                -> together n x cache_bytes_per_token bytes: the planner's formula
    first_token                 sampled from the prompt's last logits (+ its log-probability if asked for)
    prompt_logprobs             one per prompt token, if asked for
    hidden_nD        [n, D]     the main model's final hidden states — speculative requests only: the MTP
                                modules' input for the first draft, which the decode engine runs (the MTP
                                modules' own cache layers are filled there, not sent)
    generator_state             the request's sampling generator after the first draw (seeded requests),
                                so a sampled request continues the same random stream

Both engines must hold the same model with the same cache dtype; :meth:`PrefillHandoff.check` says what
differs when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentmoe.infer.logprobs import TokenLogprob
from latentmoe.infer.paged_cache import FP8_DTYPE


@dataclass
class PrefillHandoff:
    """A prefilled prompt, ready to be placed into a decode engine's cache (see the module docstring)."""

    prompt_ids: list[int]
    first_token: int
    kv_LnX: torch.Tensor
    scale_Ln: torch.Tensor | None = None
    hidden_nD: torch.Tensor | None = None
    generator_state: torch.Tensor | None = None
    first_logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def kv_bytes(self) -> int:
        """Bytes of latent cache carried: ``num_tokens`` × the cache's bytes per token (main-model layers)."""
        scale = self.scale_Ln.numel() * self.scale_Ln.element_size() if self.scale_Ln is not None else 0
        return self.kv_LnX.numel() * self.kv_LnX.element_size() + scale

    def check(self, *, num_layers: int, width: int, dtype: torch.dtype, hidden_size: int, needs_hidden: bool) -> None:
        """ValueError naming what does not fit a decode engine with these dimensions."""
        n = self.num_tokens
        if tuple(self.kv_LnX.shape) != (num_layers, n, width) or self.kv_LnX.dtype != dtype:
            raise ValueError(f"handoff: latent rows {list(self.kv_LnX.shape)} {self.kv_LnX.dtype} do not fit a "
                             f"cache of [{num_layers}, {n}, {width}] {dtype}")
        if (self.scale_Ln is None) != (dtype != FP8_DTYPE) or (
                self.scale_Ln is not None and tuple(self.scale_Ln.shape) != (num_layers, n)):
            raise ValueError("handoff: FP8 scales missing, unexpected or of the wrong shape")
        if needs_hidden and (self.hidden_nD is None or tuple(self.hidden_nD.shape) != (n, hidden_size)):
            raise ValueError(f"handoff: a speculative request needs the prompt's hidden states [{n}, {hidden_size}]")
