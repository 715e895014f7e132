"""The inference engine: prefill and decode stages over a paged latent cache, continuous batching, sampling,
streaming, per-request statistics and MTP speculative decoding.

    engine = Engine(model, tokenizer)
    results = engine.generate(["ROMEO:", "JULIET:"], SamplingParams(max_tokens=64, temperature=0.0))
    for event in engine.stream("HAMLET:", SamplingParams(max_tokens=32)):
        print(event.new_text, end="")

One :meth:`Engine.step` does, in order:

1. **admit + prefill** — waiting requests join while there is room (``max_batch`` running sequences, and
   cache blocks for each request's worst case are reserved at admission, so a running sequence never runs
   out of blocks: requests that do not fit wait in the queue). Each joining prompt is run through the model
   once (``attention="auto"`` picks the materialised path for a long prompt), its latent KV written into
   its blocks, and its first token sampled. A speculative request also drafts here.
2. **decode** — every running plain request advances one token in one batched forward (the absorbed path
   reads only the latent cache); every speculative request verifies its drafts in one batched forward,
   keeps the accepted prefix, and drafts again.
3. finished requests (max_tokens, a stop token, a stop string) leave the batch and return their blocks.

The model is the same ``CausalLM`` used for training; the engine only supplies a paged cache view and
per-sequence start positions. Sampling is per request with the request's own generator, so a request's
tokens do not depend on which others share its batch (tests/infer/test_engine.py checks this).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from latentmoe.infer.paged_cache import PagedLatentCache, resolve_cache_dtype
from latentmoe.infer.sampling import (
    Acceptance,
    SamplingParams,
    greedy_accept,
    rejection_sample,
    sample_next,
    token_probs,
)
from latentmoe.infer.speculative import DraftPlan, SpeculativeConfig, draft_window_starts
from latentmoe.model.mla import ATTENTION_MODES
from latentmoe.model.transformer import CausalLM

DEFAULT_BLOCK_SIZE = 64  # tokens per cache block, as FlashMLA uses
DEFAULT_MAX_BATCH = 16
PAD_TOKEN_ID = 0  # fills draft-window positions past a sequence's end; their outputs are never used
REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


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
class RequestStats:
    """Per-request figures. Times are seconds from the request's arrival (``add_request``).

    ``tokens_per_s`` is generated tokens over the whole request time (queueing and prefill included);
    ``decode_tokens_per_s`` counts the tokens after the first over the time after the first.
    ``drafted_per_position[j]`` / ``accepted_per_position[j]``: how often a draft was proposed / accepted at
    draft position j+1 (an accepted draft at j implies all before it were accepted).
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


@dataclass
class GenerationResult:
    """One finished request. ``finish_reason``: "length" (max_tokens) or "stop" (stop token or string)."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    stats: RequestStats


@dataclass
class RequestOutput:
    """What one step produced for one request (a streaming event): the new tokens and text, and when the
    request finished, its :class:`GenerationResult`."""

    request_id: int
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    result: GenerationResult | None = None


@dataclass
class EngineStats:
    """Cumulative engine figures (seconds). Decode tokens are those emitted by decode steps (not the first
    token of each request, which prefill produces). ``prefill_tokens`` ran through the model;
    ``prefill_shared_tokens`` were copied from a common prefix with a prompt admitted in the same step."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    prefill_shared_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    draft_s: float = 0.0
    max_running: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s else None


@dataclass
class _PrefillOutput:
    """What a prefill leaves for prompts admitted after it in the same round: its prompt, the logits of
    the last position and the main model's hidden states ``[S, D]`` at every prompt position."""

    request_id: int
    prompt_ids: list[int]
    last_logits_1V: torch.Tensor
    hidden_SD: torch.Tensor


def longest_shared_prefix(
    prompt_ids: list[int], candidates, live: Collection[object]
) -> tuple[_PrefillOutput | None, int]:
    """The candidate (still holding its blocks: its id in ``live``) sharing the longest prefix with
    ``prompt_ids``, and that prefix's length (0 and None when nothing is shared)."""
    best, best_len = None, 0
    for cand in candidates:
        if cand.request_id not in live:
            continue
        length = 0
        for a, b in zip(prompt_ids, cand.prompt_ids, strict=False):
            if a != b:
                break
            length += 1
        if length > best_len:
            best, best_len = cand, length
    return best, best_len


@dataclass(eq=False)
class _Sequence:
    """A request's mutable state inside the engine. ``tokens`` = prompt + output; ``num_cached`` = n, the
    positions whose latent KV (and hidden state) are in the cache; while running, ``len(tokens) == n + 1``
    (the newest token is fed by the next step)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    plan: DraftPlan | None
    generator: torch.Generator | None
    arrival: float
    reserved_blocks: int
    stream: bool
    tokens: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    hidden_tail_PD: torch.Tensor | None = None  # main-model hidden at positions [n - P, n)
    mtp_final: int = 0
    drafts: list[int] = field(default_factory=list)
    draft_probs_KV: torch.Tensor | None = None
    first_token_time: float | None = None
    text: str = ""
    text_sent: int = 0
    finish_reason: str | None = None
    stats: RequestStats | None = None

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)


class Engine:
    """Batched generation with a paged latent cache; see the module docstring.

    Args:
        model: a ``CausalLM`` (put in eval mode; its dtype and device are the compute dtype and device).
        tokenizer: a ``tokenizers.Tokenizer`` (or anything with ``encode(text).ids`` and ``decode(ids)``);
            needed for string prompts, ``.text`` and stop strings.
        cache_dtype: "fp32", "bf16", "fp8" (E4M3 + per-token scale) or a torch dtype; default: the model's.
        block_size: tokens per cache block. max_batch: most sequences decoded together.
        num_blocks: cache pool size; default room for ``max_batch`` sequences of the model's full length.
        attention: "auto" (absorbed for decode, whichever is cheaper for prefill), "absorbed" or "materialised".
        mtp_cache: give the MTP modules cache layers (needed for speculative decoding).
        clock: time source for statistics.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        *,
        cache_dtype: str | torch.dtype | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_batch: int = DEFAULT_MAX_BATCH,
        num_blocks: int | None = None,
        attention: str = "auto",
        mtp_cache: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.attention = attention
        self.max_batch = max_batch
        self.clock = clock
        self.num_mtp_layers = len(model.mtp) if mtp_cache else 0
        if num_blocks is None:
            num_blocks = max_batch * (math.ceil(self.config.max_position_embeddings / block_size) + 1)
        self.cache = PagedLatentCache(
            self.config,
            num_layers=self.config.num_hidden_layers + self.num_mtp_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=resolve_cache_dtype(cache_dtype) if cache_dtype is not None else self.dtype,
            compute_dtype=self.dtype,
            device=self.device,
        )
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.stats = EngineStats()
        self._reserved_blocks = 0
        self._next_id = 0
        self._outboxes: dict[int, deque[RequestOutput]] = {}

    # ------------------------------------------------------------------ public API
    def cache_bytes_per_token(self, *, include_mtp: bool = False) -> int:
        """Latent cache bytes per token of one sequence, measured from the allocated pool: the main model's
        layers × (kv_lora_rank + qk_rope_head_dim) × element size (+ 4 scale bytes per layer for FP8)."""
        layers = self.config.num_hidden_layers + (self.num_mtp_layers if include_mtp else 0)
        return self.cache.bytes_per_token(num_layers=layers)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
        stream: bool = False,
    ) -> int:
        """Validate and queue one request; returns its id. It starts at the next :meth:`step`."""
        params = params or SamplingParams()
        prompt_ids = self._encode(prompt)
        limit = self.config.max_position_embeddings
        if len(prompt_ids) + params.max_tokens > limit:
            raise ValueError(
                f"max_tokens: the prompt's {len(prompt_ids)} tokens + max_tokens={params.max_tokens} exceed "
                f"max_position_embeddings={limit}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        plan = self._plan(speculative)
        slack = plan.cache_slack if plan else 0
        reserved = self.cache.blocks_for(len(prompt_ids) + params.max_tokens + slack)
        if reserved > self.cache.num_blocks:
            raise ValueError(
                f"max_tokens: the request needs {reserved} cache blocks; the pool has {self.cache.num_blocks} "
                "(raise num_blocks)"
            )
        request_id = self._next_id
        self._next_id += 1
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            plan=plan,
            generator=params.make_generator(self.device),
            arrival=self.clock(),
            reserved_blocks=reserved,
            stream=stream,
            tokens=list(prompt_ids),
            stats=RequestStats(prompt_tokens=len(prompt_ids)),
        )
        if plan is not None:
            seq.stats.drafted_per_position = [0] * plan.num_draft_tokens
            seq.stats.accepted_per_position = [0] * plan.num_draft_tokens
        if stream:
            self._outboxes[request_id] = deque()
        self.waiting.append(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: int) -> None:
        """Drop a waiting or running request (its blocks return to the pool)."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._outboxes.pop(request_id, None)
                return
        for seq in self.running:
            if seq.request_id == request_id:
                self._release(seq)
                self._outboxes.pop(request_id, None)
                return

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit and prefill what fits, then one decode (or verify + draft) step for every running request."""
        events: list[RequestOutput] = []
        self._admit(events)
        plain = [s for s in self.running if s.plan is None]
        groups: dict[DraftPlan, list[_Sequence]] = {}
        for s in self.running:
            if s.plan is not None and s.output_ids:
                groups.setdefault(s.plan, []).append(s)
        if plain or groups:
            t0 = self.clock()
            before = sum(len(s.output_ids) for s in self.running)
            batch = plain + [s for g in groups.values() for s in g]
            if plain:
                self._decode(plain, events)
            for plan, seqs in groups.items():
                self._speculate(seqs, plan, events)
            self.stats.decode_s += self.clock() - t0
            self.stats.decode_steps += 1
            self.stats.decode_tokens += sum(len(s.output_ids) for s in batch) - before
        for e in events:
            if e.request_id in self._outboxes:
                self._outboxes[e.request_id].append(e)
        return events

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
    ) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings or token-id lists; one prompt alone is a batch of one);
        ``params`` is one SamplingParams for all or one per prompt. Returns results in prompt order."""
        batch = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
        if not batch:
            raise ValueError("prompts: no prompts given")
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(batch)
        if len(per_prompt) != len(batch):
            raise ValueError(f"params: {len(per_prompt)} SamplingParams for {len(batch)} prompts")
        ids = [self.add_request(p, sp, speculative=speculative) for p, sp in zip(batch, per_prompt, strict=True)]
        results: dict[int, GenerationResult] = {}
        wanted = set(ids)
        while wanted - results.keys():
            for event in self.step():
                if event.finished and event.request_id in wanted:
                    results[event.request_id] = event.result
        return [results[i] for i in ids]

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
    ) -> Iterator[RequestOutput]:
        """Queue one request and yield its :class:`RequestOutput` events as steps produce them (the last has
        ``finished`` set). Several streams may be consumed interleaved; each drives the shared engine."""
        request_id = self.add_request(prompt, params, speculative=speculative, stream=True)
        outbox = self._outboxes[request_id]
        try:
            while True:
                while not outbox:
                    self.step()
                event = outbox.popleft()
                yield event
                if event.finished:
                    return
        finally:
            self._outboxes.pop(request_id, None)
            self.abort(request_id)

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: the prompt is empty")
            if self.tokenizer is None:
                raise ValueError("prompt: a string prompt needs a tokenizer (or pass token ids)")
            ids = list(self.tokenizer.encode(prompt).ids)
            bos = self.config.bos_token_id
            return [bos, *ids] if bos is not None else ids
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: the prompt is empty")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _plan(self, speculative: bool | SpeculativeConfig) -> DraftPlan | None:
        if speculative is False or speculative is None:
            return None
        config = SpeculativeConfig() if speculative is True else speculative
        if not isinstance(config, SpeculativeConfig):
            raise ValueError(f"speculative must be a bool or a SpeculativeConfig, got {speculative!r}")
        if self.num_mtp_layers == 0 and len(self.model.mtp):
            raise ValueError("speculative: this engine was built with mtp_cache=False")
        return config.resolve(self.num_mtp_layers)

    def _admit(self, events: list[RequestOutput]) -> None:
        shared: dict[tuple[int, ...], _PrefillOutput] = {}  # prompts admitted together share common prefixes
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self._reserved_blocks + seq.reserved_blocks > self.cache.num_blocks:
                break  # first come, first served: it waits for running requests to return blocks
            self.waiting.popleft()
            self._reserved_blocks += seq.reserved_blocks
            self._prefill(seq, events, shared)
        self.stats.max_running = max(self.stats.max_running, len(self.running))

    def _release(self, seq: _Sequence) -> None:
        self.cache.free(seq.request_id)
        self._reserved_blocks -= seq.reserved_blocks
        self.running.remove(seq)

    # ------------------------------------------------------------------ stages
    def _forward(self, seqs: list[_Sequence], ids_BS: list[list[int]], start_B: list[int]):
        start_pos_B = torch.tensor(start_B, dtype=torch.long, device=self.device)
        input_ids = torch.tensor(ids_BS, dtype=torch.long, device=self.device)
        view = self.cache.view([s.request_id for s in seqs], start_pos_B, input_ids.shape[1])
        return self.model(input_ids, cache=view, start_pos=start_pos_B, compute_mtp=False, attention=self.attention)

    def _prefill(self, seq: _Sequence, events: list[RequestOutput], shared: dict[tuple[int, ...], _PrefillOutput]):
        """Prefill stage: the prompt in one forward, its latent KV into the sequence's blocks.

        Prompts admitted in the same round share work: the main-model cache rows of the longest prefix this
        prompt has in common with an earlier one are copied (causal attention makes them identical), and only
        the rest of the prompt runs through the model, over that cached prefix. An identical prompt (parallel
        samples) also reuses the last logits and runs nothing.
        """
        t0 = self.clock()
        n = len(seq.prompt_ids)
        self.cache.add_sequence(seq.request_id)
        source, common = longest_shared_prefix(seq.prompt_ids, shared.values(), self.cache.block_tables)
        if common == n and len(source.prompt_ids) != n:
            common -= 1  # a strict prefix of a longer prompt: its last position's logits still need a forward
        if common:
            self.cache.copy_prefix(source.request_id, seq.request_id, common, num_layers=self.config.num_hidden_layers)
            self.stats.prefill_shared_tokens += common
        if common == n:
            prefill = _PrefillOutput(seq.request_id, seq.prompt_ids, source.last_logits_1V, source.hidden_SD)
        else:
            self.cache.ensure(seq.request_id, n)
            out = self._forward([seq], [seq.prompt_ids[common:]], [common])
            hidden_SD = torch.cat([source.hidden_SD[:common], out.hidden[0]]) if common else out.hidden[0]
            prefill = _PrefillOutput(seq.request_id, seq.prompt_ids, out.logits[0, -1:], hidden_SD)
            self.stats.prefill_tokens += n - common
        shared[tuple(seq.prompt_ids)] = prefill
        seq.num_cached = n
        seq.hidden_tail_PD = prefill.hidden_SD
        self.running.append(seq)
        token = int(sample_next(prefill.last_logits_1V, seq.params, seq.generator)[0])
        self._append(seq, [token], events)
        if seq.plan is not None and seq.finish_reason is None:
            self._draft([seq], seq.plan)
        self.stats.prefill_s += self.clock() - t0

    def _decode(self, seqs: list[_Sequence], events: list[RequestOutput]) -> None:
        """Decode stage: one new token for each sequence, one batched forward over the paged cache."""
        for s in seqs:
            self.cache.ensure(s.request_id, s.num_cached + 1)
        out = self._forward(seqs, [[s.tokens[-1]] for s in seqs], [s.num_cached for s in seqs])
        for b, s in enumerate(seqs):
            s.num_cached += 1
            token = int(sample_next(out.logits[b, -1:], s.params, s.generator)[0])
            self._append(s, [token], events)

    def _speculate(self, seqs: list[_Sequence], plan: DraftPlan, events: list[RequestOutput]) -> None:
        """Verify every sequence's drafts in one forward, keep the accepted prefixes, then draft again."""
        k = min(len(s.drafts) for s in seqs)
        for s in seqs:
            self.cache.ensure(s.request_id, s.num_cached + k + 1)
        out = self._forward(seqs, [[s.tokens[-1], *s.drafts[:k]] for s in seqs], [s.num_cached for s in seqs])
        for b, s in enumerate(seqs):
            drafts = s.drafts[:k]
            if k == 0:  # a request one token from its end: no drafts this step
                acceptance = Acceptance(0, int(sample_next(out.logits[b, :1], s.params, s.generator)[0]))
            elif s.params.greedy:
                acceptance = greedy_accept(out.logits[b].argmax(-1).tolist(), drafts)
            else:
                p_K1V = token_probs(out.logits[b], s.params)
                accepted, nxt = rejection_sample(
                    p_K1V[None], s.draft_probs_KV[None, :k], torch.tensor([drafts], device=self.device), s.generator
                )
                acceptance = Acceptance(int(accepted[0]), int(nxt[0]))
            a = acceptance.num_accepted
            for j in range(k):
                s.stats.drafted_per_position[j] += 1
                s.stats.accepted_per_position[j] += int(j < a)
            s.stats.draft_tokens += k
            s.stats.accepted_draft_tokens += a
            s.hidden_tail_PD = torch.cat([s.hidden_tail_PD, out.hidden[b, : a + 1]])[-plan.hidden_tail :]
            s.num_cached += a + 1
            self.cache.truncate(s.request_id, s.num_cached)  # rejected positions are dropped
            s.drafts, s.draft_probs_KV = [], None
            self._append(s, acceptance.emitted(drafts), events)
        live = [s for s in seqs if s.finish_reason is None]
        if live:
            self._draft(live, plan)

    def _draft(self, seqs: list[_Sequence], plan: DraftPlan) -> None:
        """Draft up to ``plan.num_draft_tokens`` tokens per sequence with the MTP modules (see speculative.py)."""
        t0 = self.clock()
        lengths = [s.num_cached for s in seqs]
        starts, width = draft_window_starts(lengths, [s.mtp_final for s in seqs])
        # never draft past max_tokens: the last token of a request is always the target's own
        keep = max(0, min(plan.num_draft_tokens, *(s.remaining - 1 for s in seqs)))
        for s, start in zip(seqs, starts, strict=True):
            self.cache.ensure(s.request_id, max(start + width, s.num_cached + keep))
        hidden_BWD = torch.zeros(len(seqs), width, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for b, (s, start) in enumerate(zip(seqs, starts, strict=True)):
            tail = s.hidden_tail_PD
            first = s.num_cached - tail.shape[0]  # position of tail row 0
            real = min(width, s.num_cached - start)
            if start < first:
                raise RuntimeError(f"draft window starts at {start} but hidden states are kept from {first}")
            hidden_BWD[b, :real] = tail[start - first : start - first + real]
        start_pos_B = torch.tensor(starts, dtype=torch.long, device=self.device)
        view = self.cache.view([s.request_id for s in seqs], start_pos_B, width)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        last = [n - 1 - start for n, start in zip(lengths, starts, strict=True)]  # window index of position n-1
        prev_BWD = hidden_BWD
        for depth in range(1, plan.chain_modules + 1):
            ids = []
            for s, start, d in zip(seqs, starts, drafts, strict=True):
                ext = s.tokens + d  # t_0..t_n, then this step's drafts d_1..d_{depth-1}
                ids.append([ext[p + depth] if p + depth < len(ext) else PAD_TOKEN_ID
                            for p in range(start, start + width)])
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            prev_BWD, logits_BWV = self.model.mtp_forward(
                depth, prev_BWD, input_ids, cache=view, start_pos=start_pos_B, attention=self.attention
            )
            for b, s in enumerate(seqs):
                self._propose(s, logits_BWV[b, last[b] : last[b] + 1], drafts[b], probs[b])
        if plan.recursive:
            g_B1D = torch.stack([prev_BWD[b, last[b]] for b in range(len(seqs))])[:, None]
            for j in range(2, keep + 1):
                start_B = torch.tensor([n + j - 2 for n in lengths], dtype=torch.long, device=self.device)
                step_view = self.cache.view([s.request_id for s in seqs], start_B, 1)
                input_ids = torch.tensor([[d[-1]] for d in drafts], dtype=torch.long, device=self.device)
                g_B1D, logits_B1V = self.model.mtp_forward(
                    1, g_B1D, input_ids, cache=step_view, start_pos=start_B, attention=self.attention
                )
                for b, s in enumerate(seqs):
                    self._propose(s, logits_B1V[b], drafts[b], probs[b])
        for b, s in enumerate(seqs):
            s.drafts = drafts[b][:keep]
            s.draft_probs_KV = torch.cat(probs[b])[:keep] if probs[b] else None
            s.mtp_final = max(0, s.num_cached - plan.chain_modules + 1)
            s.hidden_tail_PD = s.hidden_tail_PD[-plan.hidden_tail :]
        self.stats.draft_s += self.clock() - t0

    @staticmethod
    def _propose(seq: _Sequence, logits_1V: torch.Tensor, drafts: list[int], probs: list[torch.Tensor]) -> None:
        """Pick one draft token from a module's logits: the argmax when greedy, else a sample from q."""
        if seq.params.greedy:
            drafts.append(int(logits_1V.argmax()))
            return
        q_1V = token_probs(logits_1V, seq.params)
        drafts.append(int(torch.multinomial(q_1V, 1, generator=seq.generator)[0, 0]))
        probs.append(q_1V)

    # ------------------------------------------------------------------ output
    def _append(self, seq: _Sequence, tokens: list[int], events: list[RequestOutput]) -> None:
        """Add emitted tokens one by one, stopping at max_tokens, a stop token or a stop string."""
        now = self.clock()
        new: list[int] = []
        params = seq.params
        cut_text: str | None = None
        for token in tokens:
            seq.output_ids.append(token)
            seq.tokens.append(token)
            new.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if params.stop:
                full = self.tokenizer.decode(seq.output_ids)
                cut = find_stop(full, params.stop)
                if cut is not None:
                    seq.finish_reason, cut_text = "stop", full[:cut]
                    break
            if token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= params.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                break
        finished = seq.finish_reason is not None
        new_text = ""
        if self.tokenizer is not None:
            seq.text = cut_text if cut_text is not None else self.tokenizer.decode(seq.output_ids)
            visible = len(seq.text) if finished else streamable_length(seq.text, params.stop)
            new_text, seq.text_sent = seq.text[seq.text_sent : visible], max(seq.text_sent, visible)
        event = RequestOutput(seq.request_id, new, new_text)
        if finished:
            event.finished, event.finish_reason = True, seq.finish_reason
            event.result = self._finish(seq, now)
        events.append(event)

    def _finish(self, seq: _Sequence, now: float) -> GenerationResult:
        self._release(seq)
        st = seq.stats
        st.generated_tokens = len(seq.output_ids)
        st.total_time_s = now - seq.arrival
        st.time_to_first_token_s = seq.first_token_time - seq.arrival
        st.tokens_per_s = st.generated_tokens / st.total_time_s if st.total_time_s > 0 else None
        after_first = now - seq.first_token_time
        st.decode_tokens_per_s = (st.generated_tokens - 1) / after_first if after_first > 0 else None
        return GenerationResult(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.output_ids),
            text=seq.text if self.tokenizer is not None else None,
            finish_reason=seq.finish_reason,
            stats=st,
        )
