"""One request's state inside the engine, shared by the three units that work on it.

The scheduler owns where a request is (waiting, running, its block reservation); the model runner owns
what is cached for it (``num_cached``, the hidden-state tail, pending drafts); the output processor owns
what it has produced (``output_ids``, its text, why it finished, its statistics). Each unit writes only
its own fields; they live on one object so that a step does not copy state between them.

A running request satisfies ``len(tokens) == num_cached + 1``: the newest token is sampled but not fed
yet — the next forward feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentmoe.infer.handoff import PrefillHandoff
from latentmoe.infer.logprobs import TokenLogprob
from latentmoe.infer.sampling import SamplingParams
from latentmoe.infer.speculative import DraftPlan


@dataclass
class RequestStats:
    """Per-request figures. Times are seconds from the request's arrival (``add_request`` / ``submit``).

    ``tokens_per_s`` is generated tokens over the whole request time (queueing and prefill included);
    ``decode_tokens_per_s`` counts the tokens after the first over the time after the first.
    ``drafted_per_position[j]`` / ``accepted_per_position[j]``: how often a draft was proposed / accepted at
    draft position j+1 (an accepted draft at j implies all before it were accepted). A request cancelled
    before its first token has ``time_to_first_token_s`` None.
    """

    prompt_tokens: int
    generated_tokens: int = 0
    time_to_first_token_s: float | None = None
    total_time_s: float | None = None
    tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position, strict=True)]


@dataclass(eq=False)
class Request:
    """A request from admission to its last token (identity comparison: two requests are never equal).

    Set at creation: ``request_id``, ``prompt_ids``, ``params``, ``plan`` (None: plain decoding), the
    request's own ``generator``, ``arrival`` (engine clock), ``reserved_blocks`` (its worst case) and, for a
    request prefilled by another engine, its ``handoff`` (handoff.py; the runner places it at admission).
    """

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    plan: DraftPlan | None
    generator: torch.Generator | None
    arrival: float
    reserved_blocks: int
    # output processor
    tokens: list[int] = field(default_factory=list)  # prompt + output
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    text: str = ""
    text_sent: int = 0
    finish_reason: str | None = None
    stats: RequestStats | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when asked for
    # model runner
    num_cached: int = 0
    hidden_tail_PD: torch.Tensor | None = None  # main-model hidden at positions [n - P, n)
    mtp_final: int = 0
    drafts: list[int] = field(default_factory=list)
    draft_probs_KV: torch.Tensor | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens sampled, not yet emitted
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first: None)
    handoff: PrefillHandoff | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        if self.stats is None:
            self.stats = RequestStats(prompt_tokens=len(self.prompt_ids))
            if self.plan is not None:
                self.stats.drafted_per_position = [0] * self.plan.num_draft_tokens
                self.stats.accepted_per_position = [0] * self.plan.num_draft_tokens

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
