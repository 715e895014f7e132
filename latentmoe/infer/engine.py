"""The inference engine: a scheduler, a model runner and an output processor over one paged latent cache,
composed into continuous batching with streaming, per-request statistics and MTP speculative decoding.

    engine = Engine(model, tokenizer)                     # pool sized from a memory budget
    results = engine.generate(["ROMEO:", "JULIET:"], SamplingParams(max_tokens=64, temperature=0.0))
    for event in engine.stream("HAMLET:", SamplingParams(max_tokens=32)):
        print(event.new_text, end="")

Who does what:

* ``scheduler.py`` — waiting/running queues, admission under ``max_batch`` and the block reservation
  (each request's worst case is promised at admission, so a running request never runs out of blocks),
  abort, the preemption hook.
* ``runner.py`` — the forwards: prefill, batched decode (the seam for a compiled decode step), verify and
  draft for speculative requests; sampling with each request's own generator.
* ``output.py`` — stop conditions, detokenised and streamable text, events, results, statistics.
* this module — :class:`Engine`: sizes and allocates the cache (``cache_budget.py``), validates requests
  and runs one :meth:`Engine.step` at a time:

  1. **admit + prefill** — waiting requests join while there is room; each prompt runs through the model
     once and gets its first token (a speculative request also drafts).
  2. **decode** — every running plain request advances one token in one batched forward; every
     speculative request verifies its drafts in one batched forward, keeps the accepted prefix, and drafts
     again.
  3. finished requests (max_tokens, a stop token, a stop string) leave the batch and return their blocks.

An ``Engine`` has one driver at a time: its methods take a lock, so two threads calling ``stream`` or
``generate`` take turns stepping it (correct, but each caller's thread does engine work). A server wants
one loop owner: ``AsyncEngine`` (async_engine.py) runs ``step()`` in one background thread and hands
each request its own queue.

The model is the same ``CausalLM`` used for training; the engine only supplies a paged cache view and
per-sequence start positions. Sampling is per request with the request's own generator, so a request's
tokens do not depend on which others share its batch (tests/infer/test_engine.py checks this).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from latentmoe.device import available_memory_bytes, resolve_device
from latentmoe.hf.tokenizer import encode_prompt
from latentmoe.infer.cache_budget import CachePool, default_cache_budget, size_cache_pool
from latentmoe.infer.handoff import PrefillHandoff
from latentmoe.infer.output import (
    REPLACEMENT_CHAR,
    GenerationResult,
    OutputProcessor,
    RequestOutput,
    find_stop,
    streamable_length,
)
from latentmoe.infer.paged_cache import PagedLatentCache, latent_bytes_per_token, resolve_cache_dtype
from latentmoe.infer.request import Request, RequestStats
from latentmoe.infer.runner import DEFAULT_PREFILL_CHUNK, PAD_TOKEN_ID, ModelRunner, PrefillRound
from latentmoe.infer.sampling import SamplingParams
from latentmoe.infer.scheduler import Scheduler
from latentmoe.infer.speculative import DraftPlan, SpeculativeConfig
from latentmoe.model.mla import ATTENTION_MODES
from latentmoe.model.transformer import CausalLM

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_BATCH",
    "PAD_TOKEN_ID",
    "REPLACEMENT_CHAR",
    "Engine",
    "EngineStats",
    "GenerationResult",
    "RequestOutput",
    "RequestStats",
    "find_stop",
    "streamable_length",
]

DEFAULT_BLOCK_SIZE = 64  # tokens per cache block, as FlashMLA uses
DEFAULT_MAX_BATCH = 16


@dataclass
class EngineStats:
    """Cumulative engine figures (seconds). Decode tokens are those emitted by decode steps (not the first
    token of each request, which prefill produces). ``prefill_tokens`` ran through the model;
    ``prefill_shared_tokens`` were copied from a common prefix with a prompt admitted in the same step.
    ``placed_tokens`` were prefilled by another engine and placed here (handoff.py).
    ``draft_tokens`` / ``accepted_draft_tokens``: speculative drafts verified / accepted, all requests.
    ``draft_s`` is the part of ``decode_s`` spent drafting (a request's first draft, right after its prefill,
    counts in ``prefill_s``).
    ``finished_requests`` ended by themselves (length or stop), ``aborted_requests`` by :meth:`Engine.abort`."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    prefill_shared_tokens: int = 0
    placed_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    draft_s: float = 0.0
    max_running: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None


class Engine:
    """Batched generation with a paged latent cache; see the module docstring.

    Args:
        model: a ``CausalLM`` (put in eval mode; its dtype is the compute dtype).
        tokenizer: a ``tokenizers.Tokenizer`` (or anything with ``encode(text).ids`` and ``decode(ids)``);
            needed for string prompts, ``.text`` and stop strings.
        cache_dtype: "fp32", "bf16", "fp8" (E4M3 + per-token scale) or a torch dtype; default: the model's.
        block_size: tokens per cache block. max_batch: most sequences decoded together.
        num_blocks: cache pool size in blocks, taken as given.
        cache_memory_bytes: cache pool budget in bytes (``cache_budget.parse_memory_size("2GiB")``); the pool
            is as many whole blocks as fit, capped at what ``max_batch`` sequences of ``max_model_len`` can
            use. Default (neither given): ``DEFAULT_CACHE_MEMORY_FRACTION`` of the memory available on
            ``device`` now. ``pool`` reports the choice (blocks, bytes, tokens).
        max_model_len: longest prompt + max_tokens a request may have; default the model's
            ``max_position_embeddings``.
        attention: "auto" (absorbed for decode, whichever is cheaper for prefill), "absorbed" or "materialised".
        mtp_cache: give the MTP modules cache layers (needed for speculative decoding).
        device: where the engine computes and keeps its cache ("auto", "cpu", "cuda[:N]" or a torch.device);
            default the model's device. A model elsewhere is moved there (in place, as ``Module.to``).
        runner_cls: the model runner; a subclass replacing ``decode`` (a compiled step) plugs in here.
        compile: run decode and verification through the compiled static-shape step
            (compiled_runner.py; falls back to the eager runner, saying why, where compiling is unavailable).
            Ignored when ``runner_cls`` is given.
        prefill_chunk: prompt tokens per prefill forward (chunked prefill; runner.py).
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
        cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        attention: str = "auto",
        mtp_cache: bool = True,
        device: str | torch.device | None = None,
        runner_cls: type[ModelRunner] | None = None,
        compile: bool = False,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if num_blocks is not None and cache_memory_bytes is not None:
            raise ValueError("cache_memory_bytes / num_blocks: give one of them, not both")
        if cache_memory_bytes is not None and cache_memory_bytes < 1:
            raise ValueError(f"cache_memory_bytes must be >= 1, got {cache_memory_bytes}")
        self.config = model.config
        limit = self.config.max_position_embeddings
        self.max_model_len = limit if max_model_len is None else max_model_len
        if not 1 <= self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, max_position_embeddings={limit}], got {max_model_len}")
        self.device = self._place(model, device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.dtype = model.lm_head.weight.dtype
        self.attention = attention
        self.max_batch = max_batch
        self.clock = clock
        self.num_mtp_layers = len(model.mtp) if mtp_cache else 0
        num_layers = self.config.num_hidden_layers + self.num_mtp_layers
        dtype = resolve_cache_dtype(cache_dtype) if cache_dtype is not None else self.dtype
        if num_blocks is None and cache_memory_bytes is None:
            cache_memory_bytes = default_cache_budget(available_memory_bytes(self.device))
        self.pool: CachePool = size_cache_pool(
            bytes_per_block=block_size * latent_bytes_per_token(self.config, num_layers=num_layers, dtype=dtype),
            block_size=block_size,
            max_batch=max_batch,
            max_model_len=self.max_model_len,
            budget_bytes=cache_memory_bytes,
            num_blocks=num_blocks,
        )
        self.cache = PagedLatentCache(
            self.config,
            num_layers=num_layers,
            num_blocks=self.pool.num_blocks,
            block_size=block_size,
            dtype=dtype,
            compute_dtype=self.dtype,
            device=self.device,
        )
        self.scheduler = Scheduler(self.cache, max_batch=max_batch)
        if runner_cls is None and compile:
            from latentmoe.infer.compiled_runner import CompiledRunner

            self.runner: ModelRunner = CompiledRunner(self.model, self.cache, device=self.device, attention=attention,
                                                      prefill_chunk=prefill_chunk, max_batch=max_batch)
        else:
            self.runner = (runner_cls or ModelRunner)(self.model, self.cache, device=self.device, attention=attention,
                                                      prefill_chunk=prefill_chunk)
        self.output = OutputProcessor(tokenizer, clock)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._outboxes: dict[int, deque[RequestOutput]] = {}
        self._lock = threading.RLock()  # one driver at a time (see the module docstring)

    @staticmethod
    def _place(model: CausalLM, device: str | torch.device | None) -> torch.device:
        """The engine's device; the model is moved there when it is elsewhere."""
        weight = model.lm_head.weight
        if device is None:
            return weight.device
        target = resolve_device(device)
        if weight.device != target:
            if weight.is_meta:
                raise ValueError(f"device: the model is on the meta device (no weights); it cannot run on {target}")
            model.to(target)
        return target

    # ------------------------------------------------------------------ state
    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def _reserved_blocks(self) -> int:
        return self.scheduler.reserved_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.cache.num_free_blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def cache_bytes_per_token(self, *, include_mtp: bool = False) -> int:
        """Latent cache bytes per token of one sequence, measured from the allocated pool: the main model's
        layers × (kv_lora_rank + qk_rope_head_dim) × element size (+ 4 scale bytes per layer for FP8)."""
        layers = self.config.num_hidden_layers + (self.num_mtp_layers if include_mtp else 0)
        return self.cache.bytes_per_token(num_layers=layers)

    # ------------------------------------------------------------------ requests
    def new_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
        handoff: PrefillHandoff | None = None,
    ) -> Request:
        """Validate a request and build its state without queueing it (ValueError naming the bad field or
        the limit it exceeds). Touches no queue, so any thread may call it; :meth:`enqueue` queues it.

        ``handoff``: the prompt was prefilled by another engine (:meth:`prefill_handoff`, handoff.py); when
        admitted, its latent rows are placed into the cache instead of running the prompt."""
        params, prompt_ids, plan = self._validate(prompt, params, speculative)
        reserved = self.scheduler.reserve_for(len(prompt_ids) + params.max_tokens + (plan.cache_slack if plan else 0))
        generator = params.make_generator(self.device)
        if handoff is not None:
            if handoff.prompt_ids != prompt_ids:
                raise ValueError("handoff: it was prefilled for a different prompt")
            handoff.check(num_layers=self.config.num_hidden_layers, width=self.cache.width, dtype=self.cache.dtype,
                          hidden_size=self.config.hidden_size, needs_hidden=plan is not None)
            if generator is not None and handoff.generator_state is not None:
                generator.set_state(handoff.generator_state)
        return Request(
            request_id=next(self._ids),
            prompt_ids=prompt_ids,
            params=params,
            plan=plan,
            generator=generator,
            arrival=self.clock(),
            reserved_blocks=reserved,
            handoff=handoff,
        )

    def _validate(
        self, prompt: str | Sequence[int], params: SamplingParams | None, speculative: bool | SpeculativeConfig
    ) -> tuple[SamplingParams, list[int], DraftPlan | None]:
        """The checks every request passes: its ids, the length limit, stop strings, the draft plan."""
        params = params or SamplingParams()
        prompt_ids = self._encode(prompt)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            name = ("max_position_embeddings" if self.max_model_len == self.config.max_position_embeddings
                    else "max_model_len")
            raise ValueError(
                f"max_tokens: the prompt's {len(prompt_ids)} tokens + max_tokens={params.max_tokens} exceed "
                f"{name}={self.max_model_len}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        return params, prompt_ids, self._plan(speculative)

    def prefill_handoff(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
    ) -> PrefillHandoff:
        """Prefill one prompt for another engine to decode (a *prefill* engine; handoff.py): the same prefill
        and first-token sampling as :meth:`step`, then the prompt's latent rows are copied out and its blocks
        freed. The request is validated as :meth:`new_request` does, except that only the prompt has to fit
        this engine's pool (decoding happens elsewhere). Runs on the caller's thread, between steps."""
        params, prompt_ids, plan = self._validate(prompt, params, speculative)
        with self._lock:
            if self.cache.blocks_for(len(prompt_ids)) > self.cache.num_free_blocks:
                raise ValueError(f"prompt: {len(prompt_ids)} tokens do not fit the {self.cache.num_free_blocks} "
                                 f"free blocks of this prefill engine's pool")
            request = Request(request_id=next(self._ids), prompt_ids=prompt_ids, params=params, plan=plan,
                              generator=params.make_generator(self.device), arrival=self.clock(),
                              reserved_blocks=self.cache.blocks_for(len(prompt_ids)))
            t0 = self.clock()
            try:
                result = self.runner.prefill(request, {})
                kv_LnX, scale_Ln = self.cache.export_rows(request.request_id, len(prompt_ids),
                                                          num_layers=self.config.num_hidden_layers)
            finally:
                if request.request_id in self.cache.block_tables:
                    self.cache.free(request.request_id)
            self.stats.prefill_tokens += result.computed_tokens
            self.stats.prefill_s += self.clock() - t0
        return PrefillHandoff(
            prompt_ids=prompt_ids,
            first_token=result.token,
            kv_LnX=kv_LnX,
            scale_Ln=scale_Ln,
            hidden_nD=request.hidden_tail_PD if plan is not None else None,
            generator_state=request.generator.get_state() if request.generator is not None else None,
            first_logprob=request.pending_logprobs[0] if request.pending_logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
        )

    def enqueue(self, request: Request, *, stream: bool = False) -> None:
        """Queue a request from :meth:`new_request`; it starts at the next :meth:`step`. ``stream``: keep its
        events for :meth:`stream`."""
        with self._lock:
            if stream:
                self._outboxes[request.request_id] = deque()
            self.scheduler.add(request)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
        stream: bool = False,
    ) -> int:
        """Validate and queue one request; returns its id. It starts at the next :meth:`step`."""
        request = self.new_request(prompt, params, speculative=speculative)
        self.enqueue(request, stream=stream)
        return request.request_id

    def abort(self, request_id: int) -> RequestOutput | None:
        """Drop a waiting or running request: its blocks return to the pool at once. Returns its final
        event (``finish_reason="cancelled"``, the tokens so far), or None when it is not queued or running."""
        with self._lock:
            request = self.scheduler.abort(request_id)
            if request is None:
                return None
            self.stats.aborted_requests += 1
            event = self.output.cancelled(request)
            if request_id in self._outboxes:
                self._outboxes[request_id].append(event)
            return event

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: the prompt is empty")
            if self.tokenizer is None:
                raise ValueError("prompt: a string prompt needs a tokenizer (or pass token ids)")
            return encode_prompt(self.tokenizer, prompt, bos_token_id=self.config.bos_token_id)
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

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Admit and prefill what fits, then one decode (or verify + draft) step for every running request.
        Returns the events it produced (those of streamed requests also go to their :meth:`stream`)."""
        with self._lock:
            events: list[RequestOutput] = []
            shared: PrefillRound = {}  # prompts admitted together share common prefixes
            while (request := self.scheduler.admit_next()) is not None:
                self._prefill(request, events, shared)
            self.stats.max_running = max(self.stats.max_running, self.scheduler.num_running)
            batches = self.scheduler.decode_batches()
            if batches:
                t0 = self.clock()
                batch = batches.requests
                before = sum(len(r.output_ids) for r in batch)
                if batches.plain:
                    for r, token in zip(batches.plain, self.runner.decode(batches.plain), strict=True):
                        self._emit(r, [token], events)
                for plan, group in batches.speculative.items():
                    self._speculate(group, plan, events)
                self.stats.decode_s += self.clock() - t0
                self.stats.decode_steps += 1
                self.stats.decode_tokens += sum(len(r.output_ids) for r in batch) - before
            for e in events:
                if e.request_id in self._outboxes:
                    self._outboxes[e.request_id].append(e)
            return events

    def _prefill(self, request: Request, events: list[RequestOutput], shared: PrefillRound) -> None:
        t0 = self.clock()
        if request.handoff is not None:
            self.stats.placed_tokens += len(request.prompt_ids)
            result = self.runner.place(request)
        else:
            result = self.runner.prefill(request, shared)
        self.stats.prefill_tokens += result.computed_tokens
        self.stats.prefill_shared_tokens += result.shared_tokens
        self._emit(request, [result.token], events)
        if request.plan is not None and not request.finished:
            self.runner.draft([request], request.plan)
        self.stats.prefill_s += self.clock() - t0

    def _speculate(self, group: list[Request], plan: DraftPlan, events: list[RequestOutput]) -> None:
        for r, v in zip(group, self.runner.verify(group, plan), strict=True):
            self.output.record_verification(r, num_drafted=v.num_drafted, num_accepted=v.num_accepted)
            self.stats.draft_tokens += v.num_drafted
            self.stats.accepted_draft_tokens += v.num_accepted
            self._emit(r, v.tokens, events)
        live = [r for r in group if not r.finished]
        if live:
            t0 = self.clock()
            self.runner.draft(live, plan)
            self.stats.draft_s += self.clock() - t0

    def _emit(self, request: Request, tokens: list[int], events: list[RequestOutput]) -> None:
        """Hand emitted tokens to the output processor; a request that finished leaves at once."""
        event = self.output.append(request, tokens)
        if event.finished:
            self.scheduler.release(request)
            self.stats.finished_requests += 1
        events.append(event)

    # ------------------------------------------------------------------ drivers
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
        requests = [self.new_request(p, sp, speculative=speculative) for p, sp in zip(batch, per_prompt, strict=True)]
        for request in requests:
            self.enqueue(request)
        ids = [r.request_id for r in requests]
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
        ``finished`` set). Several streams may be consumed interleaved; each drives the shared engine.
        Closing the iterator early aborts the request."""
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
