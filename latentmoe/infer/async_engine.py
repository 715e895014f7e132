"""One loop owner for an :class:`~latentmoe.infer.engine.Engine`: any number of concurrent consumers.

``Engine.stream`` drives ``step()`` from whichever caller iterates. A server has many callers, so here one
background thread owns the engine and runs ``step()`` while there is work; callers never touch the engine.
Each request gets a :class:`RequestHandle` with its own queue of :class:`~latentmoe.infer.output.RequestOutput`
events, iterable from threads (``for out in handle``) and from asyncio tasks (``async for out in handle``):

    with AsyncEngine(Engine(model, tokenizer), max_waiting=64) as engine:
        handle = engine.submit("ROMEO:", SamplingParams(max_tokens=32))
        for out in handle:                        # or, in a coroutine: async for out in handle
            print(out.new_text, end="")
        handle.result().stats                     # TTFT, tokens/s, accepted drafts

How the two sides meet. ``submit`` validates on the caller's thread (a bad request raises ValueError
there, before anything is queued) and puts the request in an inbox; ``cancel`` puts an id in a cancel
list. Between two steps the loop moves the inbox into the engine's waiting queue and aborts the cancelled
requests (their blocks return to the pool then, before the next step runs); after each step it routes the
events to their handles and publishes the counters (``num_waiting``, ``num_running``, ``free_blocks``,
:meth:`AsyncEngine.snapshot`) that any thread may read without waiting for the engine. A consumer that
stops early — ``break`` out of the iteration, an asyncio task cancelled while it waits, leaving a
``with handle:`` block — cancels its request.

Failure and shutdown. If a step raises, the loop stops: every request still waiting or running gets
:class:`EngineDeadError` (its ``__cause__`` is the original exception) from its iterator, new submits
raise it too, nothing hangs. ``stop_accepting()`` refuses new requests (:class:`EngineClosedError`);
``drain(timeout)`` waits for the accepted ones to finish; ``close(abort=...)`` stops the loop, cancelling
whatever is left. ``max_waiting`` bounds the waiting queue (:class:`QueueFullError`), so that a server
can answer 429 instead of queueing without limit. Per-event ``time_s`` (engine clock) gives inter-token
latencies; each result's ``stats`` the time to first token and the speculative acceptance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from latentmoe.infer.cache_budget import CachePool
from latentmoe.infer.engine import Engine, EngineStats
from latentmoe.infer.handoff import PrefillHandoff
from latentmoe.infer.output import GenerationResult, RequestOutput
from latentmoe.infer.request import Request
from latentmoe.infer.sampling import SamplingParams
from latentmoe.infer.speculative import SpeculativeConfig

log = logging.getLogger(__name__)

LOOP_THREAD_NAME = "latentmoe-engine-loop"


class AsyncEngineError(RuntimeError):
    """Base of the errors an :class:`AsyncEngine` raises to its callers."""


class EngineClosedError(AsyncEngineError):
    """``submit`` after ``stop_accepting``, ``drain`` or ``close``."""


class QueueFullError(AsyncEngineError):
    """``submit`` while ``max_waiting`` requests wait for admission."""


class EngineDeadError(AsyncEngineError):
    """The loop stopped after an error (the ``__cause__``); the engine takes no more work."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at the end of the last step (and the inbox now), readable from any thread.

    ``num_waiting`` counts submitted requests not yet admitted; ``num_running`` those in the batch;
    ``free_blocks`` / ``used_blocks`` the pool's blocks (allocated as positions are written),
    ``reserved_blocks`` the worst case promised to running requests; ``stats`` the engine's cumulative
    figures (tokens, seconds, drafts, finished and aborted requests)."""

    num_waiting: int
    num_running: int
    num_blocks: int
    free_blocks: int
    reserved_blocks: int
    block_size: int
    max_batch: int
    accepting: bool
    alive: bool
    stats: EngineStats

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks


@dataclass(frozen=True)
class _Failure:
    """Queued to a handle in place of an event when the loop died."""

    error: BaseException


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RequestHandle:
    """One submitted request: its events, in order, for exactly one consumer.

    Iterate it (``for`` or ``async for``) to stream :class:`RequestOutput` events until the one with
    ``finished`` set; :meth:`result` / :meth:`aresult` wait for the final :class:`GenerationResult`.
    Stopping an iteration early, or leaving a ``with`` / ``async with`` block before the request finished,
    cancels it. Made by :meth:`AsyncEngine.submit`.
    """

    def __init__(self, request: Request, owner: AsyncEngine):
        self.request_id = request.request_id
        self.prompt_token_ids = list(request.prompt_ids)  # as the model sees it (BOS included)
        self._owner = owner
        self._cond = threading.Condition()
        self._items: deque[RequestOutput | _Failure] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._delivered_final = False  # the loop has queued the last item
        self._final: RequestOutput | None = None  # the last event, once consumed

    @property
    def finished(self) -> bool:
        """The request is over (finished, cancelled, or failed), whether or not its events were read."""
        with self._cond:
            return self._delivered_final

    def cancel(self) -> bool:
        """Cancel the request (see :meth:`AsyncEngine.cancel`)."""
        return self._owner.cancel(self.request_id)

    # ------------------------------------------------------------------ loop side
    def deliver(self, event: RequestOutput) -> None:
        """Queue an event for the consumer (for the loop owner: this AsyncEngine, or another one that drives
        requests elsewhere, such as the disaggregated server's front end)."""
        self._deliver(event)

    def fail(self, error: BaseException) -> None:
        """End the request with ``error``: the consumer's next read raises EngineClosedError for an
        EngineClosedError, else EngineDeadError caused by it (for the loop owner, as :meth:`deliver`)."""
        self._deliver(_Failure(error))

    def _deliver(self, item: RequestOutput | _Failure) -> None:
        with self._cond:
            self._items.append(item)
            if isinstance(item, _Failure) or item.finished:
                self._delivered_final = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    # ------------------------------------------------------------------ consumer side
    def _take(self) -> RequestOutput | None:
        """The next event (None when the final one was already consumed); raises for a failure. Call with
        an item available."""
        if not self._items:
            return None
        item = self._items.popleft()
        if isinstance(item, _Failure):
            self._items.appendleft(item)  # every later read fails the same way
            if isinstance(item.error, EngineClosedError):
                raise EngineClosedError(str(item.error))
            raise EngineDeadError(f"the engine loop stopped: {type(item.error).__name__}: {item.error}") \
                from item.error
        if item.finished:
            self._final = item
        return item

    def _ready(self) -> bool:
        return bool(self._items) or self._final is not None

    def next_output(self, timeout: float | None = None) -> RequestOutput | None:
        """The next event, waiting up to ``timeout`` seconds (None: as long as it takes; TimeoutError past
        it); None once the final event has been read."""
        with self._cond:
            if not self._cond.wait_for(self._ready, timeout):
                raise TimeoutError(f"request {self.request_id}: no output within {timeout} s")
            return self._take()

    async def anext_output(self) -> RequestOutput | None:
        """:meth:`next_output` for a coroutine: waits without blocking its event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._ready():
                    return self._take()
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def __iter__(self) -> Iterator[RequestOutput]:
        done = False
        try:
            while (out := self.next_output()) is not None:
                done = out.finished
                yield out
                if done:
                    return
            done = True
        finally:
            if not done:
                self.cancel()

    async def _aiter(self) -> AsyncIterator[RequestOutput]:
        done = False
        try:
            while (out := await self.anext_output()) is not None:
                done = out.finished
                yield out
                if done:
                    return
            done = True
        finally:
            if not done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._aiter()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to end (reading its remaining events) and return its result
        (``finish_reason`` "cancelled" for a cancelled one); TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._final is None:
            self.next_output(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._final.result

    async def aresult(self) -> GenerationResult:
        """:meth:`result` for a coroutine."""
        while self._final is None:
            await self.anext_output()
        return self._final.result

    def __enter__(self) -> RequestHandle:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.cancel()

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(self, *exc) -> None:
        self.__exit__(*exc)


class AsyncEngine:
    """Runs ``engine.step()`` in one background thread and serves any number of concurrent consumers.

    Args:
        engine: the engine to own; nothing else may call it while the AsyncEngine runs.
        max_waiting: most requests waiting for admission before ``submit`` raises QueueFullError (None: no
            bound). The count is the last step's waiting queue plus requests submitted since, so a request
            admitted in the step now running still counts until the step ends.

    The loop starts at construction and stops at :meth:`close` (also on leaving a ``with`` block).
    """

    def __init__(self, engine: Engine, *, max_waiting: int | None = None):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (or None), got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[int] = []
        self._handles: dict[int, RequestHandle] = {}
        self._accepting = True
        self._exit = False
        self._error: BaseException | None = None
        self._published = self._measure()
        self._thread = threading.Thread(target=self._run, name=LOOP_THREAD_NAME, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        speculative: bool | SpeculativeConfig = False,
        handoff: PrefillHandoff | None = None,
    ) -> RequestHandle:
        """Validate and queue one request; returns its handle at once. ValueError for a bad request (named
        field, or a limit it exceeds), QueueFullError / EngineClosedError / EngineDeadError when the engine
        cannot take it. ``handoff``: a prompt another engine prefilled (``Engine.new_request``)."""
        with self._cond:
            self._check_open()
        request = self.engine.new_request(prompt, params, speculative=speculative, handoff=handoff)  # on this thread
        with self._cond:
            self._check_open()
            handle = RequestHandle(request, self)
            self._handles[request.request_id] = handle
            self._inbox.append(request)
            self._cond.notify_all()
        return handle

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {type(self._error).__name__}: {self._error}") \
                from self._error
        if not self._accepting:
            raise EngineClosedError("the engine is not accepting requests (stopping)")
        if self.max_waiting is not None and self._num_waiting() >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests wait for admission)")

    def cancel(self, request_id: int) -> bool:
        """Cancel a request: before the next step it leaves the engine, its blocks return to the pool, and
        its handle gets a final event with ``finish_reason="cancelled"``. False when the request is not live
        (finished already, unknown, or the loop is dead). Never blocks on the engine."""
        with self._cond:
            if request_id not in self._handles or self._error is not None:
                return False
            self._cancels.append(request_id)
            self._cond.notify_all()
            return True

    # ------------------------------------------------------------------ state, readable from any thread
    def _num_waiting(self) -> int:
        return self._published.num_waiting + len(self._inbox)

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self._num_waiting()

    @property
    def num_running(self) -> int:
        with self._cond:
            return self._published.num_running

    @property
    def free_blocks(self) -> int:
        with self._cond:
            return self._published.free_blocks

    @property
    def pool(self) -> CachePool:
        """The cache pool's size (fixed at construction)."""
        return self.engine.pool

    @property
    def accepting(self) -> bool:
        with self._cond:
            return self._accepting and self._error is None

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the loop, or None."""
        with self._cond:
            return self._error

    def snapshot(self) -> EngineSnapshot:
        """Counters and cumulative statistics as of the last step boundary (see :class:`EngineSnapshot`)."""
        with self._cond:
            return dataclasses.replace(self._published, num_waiting=self._num_waiting(),
                                       accepting=self._accepting and self._error is None,
                                       alive=self._error is None and self._thread.is_alive())

    # ------------------------------------------------------------------ shutdown
    def stop_accepting(self) -> None:
        """Refuse new requests from now on (EngineClosedError); accepted ones carry on."""
        with self._cond:
            self._accepting = False

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting and wait up to ``timeout`` seconds (None: no limit) for every accepted request to
        end. True when none is left."""
        self.stop_accepting()
        with self._cond:
            return self._cond.wait_for(lambda: not self._handles, timeout)

    def close(self, *, abort: bool = False, timeout: float | None = None) -> None:
        """Stop the loop: first drain for up to ``timeout`` seconds (unless ``abort``), then cancel what is
        left and join the thread. Idempotent."""
        if not abort:
            self.drain(timeout)
        with self._cond:  # both at once: once ``accepting`` reads False here, the loop will stop
            self._accepting = False
            self._exit = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close(abort=exc[0] is not None)

    # ------------------------------------------------------------------ the loop (its own thread)
    def _measure(self) -> EngineSnapshot:
        engine = self.engine
        return EngineSnapshot(
            num_waiting=len(engine.waiting),
            num_running=len(engine.running),
            num_blocks=engine.cache.num_blocks,
            free_blocks=engine.cache.num_free_blocks,
            reserved_blocks=engine.scheduler.reserved_blocks,
            block_size=engine.cache.block_size,
            max_batch=engine.max_batch,
            accepting=True,
            alive=True,
            stats=dataclasses.replace(engine.stats),
        )

    def _has_work(self) -> bool:
        return bool(self._inbox or self._cancels or self._exit or self.engine.has_unfinished())

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                cancelled: list[RequestOutput] = []
                with self._cond:
                    self._cond.wait_for(self._has_work)
                    for request in self._inbox:
                        engine.enqueue(request)
                    self._inbox.clear()
                    aborts = list(self._handles) if self._exit else self._cancels
                    for request_id in aborts:
                        if (event := engine.abort(request_id)) is not None:
                            cancelled.append(event)
                    self._cancels = []
                    self._published = self._measure()
                self._dispatch(cancelled)
                if self._exit:
                    self._end_leftovers()
                    return
                if engine.has_unfinished():
                    events = engine.step()
                    with self._cond:
                        self._published = self._measure()
                    self._dispatch(events)
        except BaseException as exc:  # every consumer must hear of it, whatever it is
            log.exception("the engine loop stopped")
            self._fail(exc)

    def _dispatch(self, events: list[RequestOutput]) -> None:
        """Route events to their handles; a finished request's handle leaves the live set."""
        routed = []
        with self._cond:
            for event in events:
                handle = self._handles.get(event.request_id)
                if handle is None:
                    continue
                if event.finished:
                    del self._handles[event.request_id]
                routed.append((handle, event))
            self._cond.notify_all()  # drain() waits for the live set to empty
        for handle, event in routed:
            handle._deliver(event)

    def _end_leftovers(self) -> None:
        """At exit every live request was aborted above; a handle still live would wait forever, so it
        is told the engine closed."""
        with self._cond:
            leftovers = list(self._handles.values())
            self._handles.clear()
            self._cond.notify_all()
        for handle in leftovers:
            handle._deliver(_Failure(EngineClosedError("the engine closed before this request ended")))

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._accepting = False
            handles = list(self._handles.values())
            self._handles.clear()
            self._inbox.clear()
            self._cancels = []
            self._cond.notify_all()
        for handle in handles:
            handle._deliver(_Failure(error))
