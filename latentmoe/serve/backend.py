"""What the HTTP layer talks to: a backend that takes validated token-id requests and streams their events.

Two backends keep one interface:

* :class:`LocalBackend` — colocated serving: one :class:`~latentmoe.infer.AsyncEngine` in this process (its
  loop thread owns the engine; the HTTP event loop only submits, iterates handles and cancels);
* :class:`~latentmoe.serve.disaggregated.DisaggregatedBackend` — prefill and decode in worker processes.

``submit(prompt_ids, params)`` returns a handle at once: ``async for event in handle`` yields
:class:`~latentmoe.infer.RequestOutput` events, ``handle.cancel()`` ends the request and frees its blocks.
``submit`` raises ValueError for a request that can never run (the HTTP layer's 400),
:class:`~latentmoe.infer.QueueFullError` when the waiting queue is full (429),
:class:`~latentmoe.infer.EngineClosedError` while draining and :class:`~latentmoe.infer.EngineDeadError` when
the engine (or a worker) is gone (503); a handle's iteration raises the last two as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from latentmoe.infer import AsyncEngine, Engine, SamplingParams
from latentmoe.infer.cache_budget import CachePool

MODE_COLOCATED = "colocated"
MODE_DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about the model it serves (``/v1/models``, start-up line, validation)."""

    name: str
    max_model_len: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pool: CachePool
    cache_bytes_per_token: int
    speculative: bool
    mode: str
    tokenizer: Any

    def describe(self) -> str:
        return (f"model {self.name} (max_model_len {self.max_model_len}), cache {self.pool.describe()}, "
                f"{self.mode}, speculative decoding {'on' if self.speculative else 'off'}")


@dataclass(frozen=True)
class BackendSnapshot:
    """The state ``/metrics`` and ``/health`` report, as of the engine's last step boundary.

    ``alive`` False means the engine or a worker died (``problem`` says which); ``accepting`` False that the
    server is draining. Token and draft counts are cumulative; ``transfer_*`` count what prefill workers
    sent to the decode worker (0 when colocated)."""

    alive: bool
    accepting: bool
    num_waiting: int
    num_running: int
    num_blocks: int
    free_blocks: int
    prefill_tokens: int = 0
    decode_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    transfer_kv_bytes: int = 0
    transfer_hidden_bytes: int = 0
    transfer_tokens: int = 0
    problem: str | None = None

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks


class Backend(Protocol):
    info: ModelInfo

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams): ...
    def snapshot(self) -> BackendSnapshot: ...
    def stop_accepting(self) -> None: ...
    def drain(self, timeout: float | None) -> bool: ...
    def close(self, *, abort: bool = False, timeout: float | None = None) -> None: ...


def model_info(engine: Engine, *, name: str, speculative: bool, mode: str) -> ModelInfo:
    config = engine.config
    return ModelInfo(name=name, max_model_len=engine.max_model_len, vocab_size=config.vocab_size,
                     bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pool=engine.pool,
                     cache_bytes_per_token=engine.cache_bytes_per_token(), speculative=speculative, mode=mode,
                     tokenizer=engine.tokenizer)


class LocalBackend:
    """Colocated serving on one engine (see the module docstring).

    Args:
        engine: the engine to serve; the backend's AsyncEngine owns it from now on.
        name: the model name clients send. max_queued: the waiting queue's bound (None: unbounded).
        speculative: MTP speculative decoding for every request (needs MTP modules).
    """

    def __init__(self, engine: Engine, *, name: str, max_queued: int | None = None, speculative: bool = False):
        if speculative and not len(engine.model.mtp):
            raise ValueError("speculative: the model has no MTP modules (num_nextn_predict_layers is 0)")
        self.engine = engine
        self.info = model_info(engine, name=name, speculative=speculative, mode=MODE_COLOCATED)
        self.async_engine = AsyncEngine(engine, max_waiting=max_queued)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams):
        return self.async_engine.submit(list(prompt_ids), params, speculative=self.info.speculative)

    def snapshot(self) -> BackendSnapshot:
        s = self.async_engine.snapshot()
        error = self.async_engine.error
        return BackendSnapshot(
            alive=s.alive, accepting=s.accepting, num_waiting=s.num_waiting, num_running=s.num_running,
            num_blocks=s.num_blocks, free_blocks=s.free_blocks, prefill_tokens=s.stats.prefill_tokens,
            decode_tokens=s.stats.decode_tokens, draft_tokens=s.stats.draft_tokens,
            accepted_draft_tokens=s.stats.accepted_draft_tokens,
            problem=None if error is None else f"the engine loop stopped: {type(error).__name__}: {error}")

    def stop_accepting(self) -> None:
        self.async_engine.stop_accepting()

    def drain(self, timeout: float | None) -> bool:
        return self.async_engine.drain(timeout)

    def close(self, *, abort: bool = False, timeout: float | None = None) -> None:
        self.async_engine.close(abort=abort, timeout=timeout)
