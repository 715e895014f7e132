"""MTP speculative decoding: settings and the window arithmetic of drafting (docs/mtp.md has the alignment).

A step for a sequence whose main cache holds positions ``[0, n)`` and whose newest token t_n is not fed yet:

1. **draft** — MTP module 1 reads [h^0_i ; Emb(t_{i+1})] and predicts t_{i+2}; at i = n−1 that is a
   draft d_1 of t_{n+1}. ``chain`` mode runs module k on module k−1's output to draft d_k (how the modules
   were trained; needs k MTP modules). ``recursive`` mode re-applies module 1 at positions n, n+1, … with
   its own output standing in for the main model's hidden state (EAGLE-style), for drafts beyond the
   modules a checkpoint has.
2. **verify** — the main model runs [t_n, d_1..d_k] at positions n..n+k in one pass over the paged cache;
   drafts are accepted by :func:`~latentmoe.infer.sampling.greedy_accept` or
   :func:`~latentmoe.infer.sampling.rejection_sample`; the cache keeps positions ``[0, n + a + 1)``.

The MTP blocks have their own cache layers (after the main model's) with the same block table. Module k's
entry at position i depends on tokens up to t_{i+k}; it is *final* once those are all real tokens (not
drafts). After drafting at main length n with m chain modules, positions ``< n − m + 1`` are final in
every module; the next draft re-runs all m modules from there (re-running a final position rewrites the
same entry), so provisional entries computed from drafts are always overwritten before they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

SPECULATIVE_MODES = ("chain", "recursive")


@dataclass(frozen=True)
class SpeculativeConfig:
    """``num_draft_tokens`` drafts per step (None: one per MTP module in chain mode, 1 in recursive mode);
    ``mode``: "chain" (module k drafts token k) or "recursive" (module 1 applied k times)."""

    num_draft_tokens: int | None = None
    mode: str = "chain"

    def __post_init__(self) -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise ValueError(f"speculative mode must be one of {SPECULATIVE_MODES}, got {self.mode!r}")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")

    def resolve(self, num_mtp_modules: int) -> DraftPlan:
        """The concrete plan for a model with ``num_mtp_modules`` MTP modules (ValueError if impossible)."""
        if num_mtp_modules < 1:
            raise ValueError("speculative: the model has no MTP modules (num_nextn_predict_layers is 0)")
        if self.mode == "chain":
            k = self.num_draft_tokens or num_mtp_modules
            if k > num_mtp_modules:
                raise ValueError(
                    f"num_draft_tokens={k} needs {k} MTP modules in chain mode; the model has {num_mtp_modules} "
                    "(use mode='recursive' for longer drafts)"
                )
            return DraftPlan(num_draft_tokens=k, chain_modules=k, recursive=False)
        return DraftPlan(num_draft_tokens=self.num_draft_tokens or 1, chain_modules=1, recursive=True)


@dataclass(frozen=True)
class DraftPlan:
    """What one draft does: run MTP modules 1..chain_modules over the window (each drafting one token),
    then, if ``recursive``, module 1 again at the following positions until ``num_draft_tokens`` drafts."""

    num_draft_tokens: int
    chain_modules: int
    recursive: bool

    @property
    def hidden_tail(self) -> int:
        """Main-model hidden states a sequence must keep: the longest draft window, k + 1 new positions
        plus the m − 1 positions that are re-run because they were provisional."""
        return self.num_draft_tokens + self.chain_modules

    @property
    def cache_slack(self) -> int:
        """Positions past the final length a request may touch (verification and draft windows)."""
        return self.num_draft_tokens + self.chain_modules + 1


def draft_window_starts(lengths_B: list[int], final_B: list[int]) -> tuple[list[int], int]:
    """Per-sequence start and the common width W of one batched draft window (pure).

    Sequence b must (re)run positions ``[final_B[b], lengths_B[b])``; W is the longest such range. A window
    starts at ``max(0, length − W)``: it ends at the sequence's last position, re-running some final
    positions when its own range is shorter (same entries again); a sequence shorter than W starts at 0
    and its positions ``>= length`` are padding whose entries are provisional.
    """
    if len(lengths_B) != len(final_B):
        raise ValueError("lengths and final positions need one entry per sequence")
    width = max(n - f for n, f in zip(lengths_B, final_B, strict=True))
    return [max(0, n - width) for n in lengths_B], width
