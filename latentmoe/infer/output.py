"""Output processing: from sampled token ids to what a caller sees — stop conditions, detokenised and
streamable text, the streaming events (:class:`RequestOutput`), the final :class:`GenerationResult` and
each request's :class:`RequestStats`.

The model runner hands over the tokens a step emitted for a request (one when decoding, the accepted drafts
plus one when speculating); :meth:`OutputProcessor.append` adds them one at a time and stops at the first
of: ``max_tokens``, a token in ``stop_token_ids`` (kept), or a ``stop`` string in the text (the text is cut
before it, and the tokens after the one that completed it are dropped).

Streaming text is held back while it could still change: a trailing U+FFFD (a byte-level tokenizer decodes
half a UTF-8 character to it until the other bytes arrive) and a suffix that could still grow into a stop
string (:func:`streamable_length`). So the ``new_text`` pieces of a request's events add up exactly to its
final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from latentmoe.infer.logprobs import TokenLogprob
from latentmoe.infer.request import Request, RequestStats

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_STOP = "stop"  # a stop token or stop string
FINISH_CANCELLED = "cancelled"  # aborted by the caller (cancel, a closed stream, shutdown)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None (pure)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """How much of an unfinished request's text may be streamed: all but a trailing half character (a
    byte-level tokenizer decodes it to U+FFFD until its other bytes arrive) and all but a suffix that could
    still grow into a stop string (pure)."""
    visible = len(text)
    while visible and text[visible - 1] == REPLACEMENT_CHAR:
        visible -= 1
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, visible), 0, -1):
            if text.endswith(stop[:n], 0, visible):
                hold = max(hold, n)
                break
    return visible - hold


@dataclass
class GenerationResult:
    """One finished request. ``finish_reason``: "length" (max_tokens), "stop" (stop token or string) or
    "cancelled" (the tokens up to the cancellation). ``logprobs``: one per token of ``token_ids`` and
    ``prompt_logprobs`` one per prompt token (None for the first), when the request asked for them."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming event): the new tokens and text, the engine-clock
    time it was produced (``time_s``; differences between a request's events are its inter-token
    latencies), and when the request finished, its :class:`GenerationResult`. ``new_logprobs``: one per new
    token when the request asked for log-probabilities (else None); ``prompt_logprobs``: on the event that
    carries the first token, when the request asked for them (a stream can echo the prompt at once)."""

    request_id: int
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    result: GenerationResult | None = None
    time_s: float | None = None
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a request's first event, when asked for


class OutputProcessor:
    """Turns emitted tokens into events for the requests it is handed (it keeps no state of its own).

    Args:
        tokenizer: anything with ``decode(ids) -> str`` (None: no text, no stop strings).
        clock: the engine's time source, for the statistics.
    """

    def __init__(self, tokenizer, clock: Callable[[], float]):
        self.tokenizer = tokenizer
        self.clock = clock

    def append(self, request: Request, tokens: list[int]) -> RequestOutput:
        """Add ``tokens`` to ``request`` one by one, stopping at max_tokens, a stop token or a stop string;
        the event says what is new and, when the request finished, carries its result."""
        now = self.clock()
        new: list[int] = []
        params = request.params
        cut_text: str | None = None
        for token in tokens:
            request.output_ids.append(token)
            request.tokens.append(token)
            new.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            if params.stop:
                full = self.tokenizer.decode(request.output_ids)
                cut = find_stop(full, params.stop)
                if cut is not None:
                    request.finish_reason, cut_text = FINISH_STOP, full[:cut]
                    break
            if token in params.stop_token_ids:
                request.finish_reason = FINISH_STOP
            elif len(request.output_ids) >= params.max_tokens:
                request.finish_reason = FINISH_LENGTH
            if request.finish_reason is not None:
                break
        pending, request.pending_logprobs = request.pending_logprobs, []  # tokens past a stop string are dropped
        request.output_logprobs.extend(pending[: len(new)])
        new_text = ""
        if self.tokenizer is not None:
            request.text = cut_text if cut_text is not None else self.tokenizer.decode(request.output_ids)
            visible = len(request.text) if request.finished else streamable_length(request.text, params.stop)
            new_text, request.text_sent = request.text[request.text_sent : visible], max(request.text_sent, visible)
        event = self._event(request, new, new_text, now)
        if params.logprobs is not None:
            event.new_logprobs = pending[: len(new)]
        if new and len(request.output_ids) == len(new):
            event.prompt_logprobs = request.prompt_logprobs
        return event

    def cancelled(self, request: Request) -> RequestOutput:
        """The final event of a request aborted before it finished: whatever text was held back, and a
        result with the tokens it produced so far."""
        request.finish_reason = FINISH_CANCELLED
        new_text = ""
        if self.tokenizer is not None:
            new_text, request.text_sent = request.text[request.text_sent :], len(request.text)
        return self._event(request, [], new_text, self.clock())

    @staticmethod
    def record_verification(request: Request, *, num_drafted: int, num_accepted: int) -> None:
        """Count one verification of ``num_drafted`` drafts of which the first ``num_accepted`` stood."""
        st = request.stats
        for j in range(num_drafted):
            st.drafted_per_position[j] += 1
            st.accepted_per_position[j] += int(j < num_accepted)
        st.draft_tokens += num_drafted
        st.accepted_draft_tokens += num_accepted

    def _event(self, request: Request, new: list[int], new_text: str, now: float) -> RequestOutput:
        event = RequestOutput(request.request_id, new, new_text, time_s=now)
        if request.finished:
            event.finished, event.finish_reason = True, request.finish_reason
            event.result = self._result(request, now)
        return event

    def _result(self, request: Request, now: float) -> GenerationResult:
        st = request.stats
        st.generated_tokens = len(request.output_ids)
        st.total_time_s = now - request.arrival
        st.tokens_per_s = st.generated_tokens / st.total_time_s if st.total_time_s > 0 else None
        if request.first_token_time is not None:
            st.time_to_first_token_s = request.first_token_time - request.arrival
            after_first = now - request.first_token_time
            st.decode_tokens_per_s = (st.generated_tokens - 1) / after_first if after_first > 0 else None
        return GenerationResult(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_ids,
            token_ids=list(request.output_ids),
            text=request.text if self.tokenizer is not None else None,
            finish_reason=request.finish_reason,
            stats=st,
            logprobs=list(request.output_logprobs) if request.params.logprobs is not None else None,
            prompt_logprobs=request.prompt_logprobs,
        )
