"""Sampling: parameters, logit filters, and the acceptance rules of speculative decoding — pure functions.

Every function here is deterministic given its inputs and, where it draws, the ``torch.Generator`` it is
handed; none keeps state. The engine calls them once per request and step with that request's own
generator, so a request's random stream does not depend on which other requests share its batch.

Speculative acceptance (Leviathan et al. 2023; Chen et al. 2023), for drafts d_1..d_k proposed from
distributions q_1..q_k and the target's distributions p_1..p_{k+1} from one verification pass:
accept d_j with probability min(1, p_j(d_j) / q_j(d_j)) while every earlier draft was accepted; at the
first rejection emit a token from the residual norm(max(0, p_j − q_j)); if all k are accepted emit a bonus
token from p_{k+1}. Each emitted token is then distributed exactly as p, so sampled speculative decoding
keeps the target distribution. With temperature 0 (one-hot p and q) this reduces to "accept while the
draft equals the target's argmax", which is :func:`greedy_accept`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from latentmoe.infer.logprobs import MAX_LOGPROBS
from latentmoe.limits import bounds, check_fields

MAX_TOKENS = 2**31 - 1
MAX_TEMPERATURE = 100.0  # beyond this every distribution is uniform to float precision
MAX_SEED = 2**63 - 1


@dataclass
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy; top_k 0 and top_p 1.0 disable
    those filters; ``seed`` gives the request its own random stream; generation stops after
    ``max_tokens``, after a token in ``stop_token_ids`` (kept in the output) or when the text contains one
    of the ``stop`` strings (the text is cut before it; needs a tokenizer).

    ``logprobs`` / ``prompt_logprobs``: report the log-probability of each generated / prompt token and of
    that many most likely alternatives (0: the token alone; None: nothing) — see ``logprobs.py``."""

    max_tokens: int = field(default=64, metadata=bounds(1, MAX_TOKENS, integer=True))
    temperature: float = field(default=1.0, metadata=bounds(0, MAX_TEMPERATURE))
    top_k: int = field(default=0, metadata=bounds(0, MAX_TOKENS, integer=True))
    top_p: float = field(default=1.0, metadata=bounds(0, 1, low_open=True))
    seed: int | None = field(default=None, metadata=bounds(0, MAX_SEED, integer=True, optional=True))
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop: Sequence[str] = field(default_factory=tuple)
    logprobs: int | None = field(default=None, metadata=bounds(0, MAX_LOGPROBS, integer=True, optional=True))
    prompt_logprobs: int | None = field(default=None, metadata=bounds(0, MAX_LOGPROBS, integer=True, optional=True))

    def __post_init__(self) -> None:
        check_fields(self, ValueError)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device | str | None = None) -> torch.Generator | None:
        """A generator on ``device`` (default: torch's default device) seeded with ``seed``; None without a
        seed (draws then come from torch's global generator)."""
        if self.seed is None:
            return None
        generator = torch.Generator() if device is None else torch.Generator(device=device)
        return generator.manual_seed(self.seed)


def filter_logits(logits_BV: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest nucleus with mass ≥ top_p to −inf.

    The most likely token always survives. Pure function; returns a new fp32 tensor.
    """
    logits_BV = logits_BV.float().clone()
    if top_k and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def token_probs(logits_NV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``[N, V]`` (fp32) that ``params`` samples from: one-hot on the argmax when greedy,
    else softmax(filter(logits / temperature))."""
    if params.greedy:
        return torch.zeros_like(logits_NV, dtype=torch.float32).scatter_(-1, logits_NV.argmax(-1, keepdim=True), 1.0)
    filtered = filter_logits(logits_NV / params.temperature, top_k=params.top_k, top_p=params.top_p)
    return filtered.softmax(dim=-1)


def sample_next(
    logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids ``[B]`` from the last-position logits."""
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    return torch.multinomial(token_probs(logits_BV, params), 1, generator=generator)[:, 0]


@dataclass
class Acceptance:
    """Outcome of verifying k drafts: the first ``num_accepted`` drafts stand, then ``next_token`` (the
    correction at the first rejected position, or the bonus token when all k were accepted)."""

    num_accepted: int
    next_token: int

    def emitted(self, draft_tokens: Sequence[int]) -> list[int]:
        return [*draft_tokens[: self.num_accepted], self.next_token]


def greedy_accept(target_tokens_K1: Sequence[int], draft_tokens_K: Sequence[int]) -> Acceptance:
    """Greedy verification: accept drafts while each equals the target's argmax at its position.

    ``target_tokens_K1``: the target's argmax at the k+1 verified positions (the last one is the bonus).
    """
    if len(target_tokens_K1) != len(draft_tokens_K) + 1:
        raise ValueError(f"target_tokens needs k+1 = {len(draft_tokens_K) + 1} entries, got {len(target_tokens_K1)}")
    accepted = 0
    while accepted < len(draft_tokens_K) and int(draft_tokens_K[accepted]) == int(target_tokens_K1[accepted]):
        accepted += 1
    return Acceptance(accepted, int(target_tokens_K1[accepted]))


def rejection_sample(
    target_probs_BK1V: torch.Tensor,
    draft_probs_BKV: torch.Tensor,
    draft_tokens_BK: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling for B independent draft chains (see the module docstring).

    target_probs_BK1V: p_1..p_{k+1} (fp32 rows summing to 1); draft_probs_BKV: q_1..q_k; draft_tokens_BK: int64
    d_1..d_k with q_j(d_j) > 0. Returns ``(num_accepted_B, next_token_B)``: how many drafts stand and the
    token that follows them. Draws B·k uniforms, then one token per chain, from ``generator``.
    """
    B, K, V = draft_probs_BKV.shape
    if target_probs_BK1V.shape != (B, K + 1, V) or draft_tokens_BK.shape != (B, K):
        raise ValueError(
            f"target_probs must be [B, k+1, V] = {[B, K + 1, V]} and draft_tokens [B, k] = {[B, K]}; got "
            f"{list(target_probs_BK1V.shape)} and {list(draft_tokens_BK.shape)}"
        )
    p_BK = target_probs_BK1V[:, :K].gather(-1, draft_tokens_BK[..., None])[..., 0]
    q_BK = draft_probs_BKV.gather(-1, draft_tokens_BK[..., None])[..., 0]
    uniform_BK = torch.rand(B, K, generator=generator, dtype=torch.float64, device=p_BK.device)
    accept_BK = uniform_BK * q_BK.double() < p_BK.double()  # u < p/q without dividing by a tiny q
    num_accepted_B = accept_BK.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(B, device=p_BK.device)
    p_next_BV = target_probs_BK1V[rows, num_accepted_B]
    q_next_BV = torch.cat([draft_probs_BKV, torch.zeros_like(draft_probs_BKV[:, :1])], dim=1)[rows, num_accepted_B]
    residual_BV = (p_next_BV - q_next_BV).clamp(min=0)  # for the bonus position q is 0, so this is p itself
    mass_B1 = residual_BV.sum(-1, keepdim=True)
    residual_BV = torch.where(mass_B1 > 0, residual_BV, p_next_BV)  # p == q up to rounding: sample p
    next_token_B = torch.multinomial(residual_BV, 1, generator=generator)[:, 0]
    return num_accepted_B, next_token_B
