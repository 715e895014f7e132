"""AsyncEngine, the single loop owner: concurrent consumers on threads and asyncio tasks get exactly what
each request gets alone, cancellation frees every block, an error in a forward reaches every consumer,
and the queue bound, stop/drain/close behave as documented.

Where a test needs the loop to be at a known point (all requests queued before the first step, a request
still running when it is cancelled), the engine's decode is wrapped to pause at a chosen call until the
test releases it: the order of events is then fixed, whatever the machine's load. ``HANG_GUARD_S`` only
keeps a broken test from hanging the suite; nothing asserts on time.
"""

import asyncio
import threading
import time

import pytest

from latentmoe.infer import (
    AsyncEngine,
    Engine,
    EngineClosedError,
    EngineDeadError,
    QueueFullError,
    SamplingParams,
)
from tests.infer.test_engine import CharTokenizer

HANG_GUARD_S = 60
PROMPTS = ["to be", "or not", "that is", "the q", "uestion", "whether", "tis nob", "ler in"]


class PausingDecode:
    """Wraps ``engine.runner.decode`` (or another runner method) so that call number n (1-based) waits for
    ``release(n)``; ``reached(n)`` waits until that call has started; call ``fail_at`` raises ``error``."""

    def __init__(self, engine: Engine, pause_at=(), fail_at=None, error=None, method="decode"):
        self.calls = 0
        self._resume = {n: threading.Event() for n in pause_at}
        self._reached = {n: threading.Event() for n in pause_at}
        self.fail_at, self.error = fail_at, error
        real = getattr(engine.runner, method)

        def wrapped(*args):
            self.calls += 1
            n = self.calls
            if n in self._resume:
                self._reached[n].set()
                assert self._resume[n].wait(HANG_GUARD_S), f"{method} call {n} was never released"
            if n == self.fail_at:
                raise self.error
            return real(*args)

        setattr(engine.runner, method, wrapped)

    def release(self, n):
        self._resume[n].set()

    def reached(self, n):
        assert self._reached[n].wait(HANG_GUARD_S), f"decode call {n} never started"


def make_engine(model, max_batch=4):
    return Engine(model, CharTokenizer(), block_size=4, max_batch=max_batch)


def alone(model, prompt, params, speculative):
    return make_engine(model, max_batch=1).generate([prompt], params, speculative=speculative)[0]


def workload(model):
    """Eight greedy requests of different lengths, every other one speculative, and what each gives alone."""
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (9, 4, 12, 7, 10, 5, 8, 11)]
    speculative = [i % 2 == 1 for i in range(len(PROMPTS))]
    expected = [alone(model, p, sp, s) for p, sp, s in zip(PROMPTS, params, speculative, strict=True)]
    return params, speculative, expected


def assert_pool_empty(engine_async: AsyncEngine, engine: Engine):
    snap = engine_async.snapshot()
    assert (snap.num_waiting, snap.num_running, snap.reserved_blocks) == (0, 0, 0)
    assert snap.free_blocks == snap.num_blocks == engine.cache.num_blocks
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.cache.block_tables


def test_eight_consumers_on_threads_get_what_each_request_gets_alone(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    params, speculative, expected = workload(model)
    engine = make_engine(model)
    gate = PausingDecode(engine, pause_at=[1])  # every request is submitted before the first decode ends
    got = [None] * len(PROMPTS)
    errors = []
    submitted = threading.Barrier(len(PROMPTS) + 1)

    with AsyncEngine(engine) as engine_async:
        def consume(i):
            try:
                handle = engine_async.submit(PROMPTS[i], params[i], speculative=speculative[i])
                submitted.wait(HANG_GUARD_S)
                tokens, text, events = [], "", []
                for out in handle:
                    tokens += out.new_token_ids
                    text += out.new_text
                    events.append(out)
                got[i] = (tokens, text, events)
            except BaseException as exc:  # reported below; a thread's exception would otherwise vanish
                errors.append(exc)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        submitted.wait(HANG_GUARD_S)
        gate.release(1)
        for t in threads:
            t.join(HANG_GUARD_S)
        assert not errors and not any(t.is_alive() for t in threads)
        assert engine_async.snapshot().stats.max_running == 4  # they really shared the batch
        assert_pool_empty(engine_async, engine)
    for (tokens, text, events), want in zip(got, expected, strict=True):
        assert tokens == want.token_ids and text == want.text
        assert events[-1].finished and events[-1].result.token_ids == want.token_ids
        assert not any(e.finished for e in events[:-1])


def test_eight_asyncio_tasks_get_what_each_request_gets_alone(trained_tiny_mtp2):
    model = trained_tiny_mtp2
    params, speculative, expected = workload(model)
    engine = make_engine(model)
    gate = PausingDecode(engine, pause_at=[1])

    async def consume(handle):
        tokens, text = [], ""
        async for out in handle:
            tokens += out.new_token_ids
            text += out.new_text
        return tokens, text, await handle.aresult()

    async def main(engine_async):
        handles = [engine_async.submit(p, sp, speculative=s) for p, sp, s in zip(PROMPTS, params, speculative,
                                                                                   strict=True)]
        tasks = [asyncio.create_task(consume(h)) for h in handles]
        await asyncio.sleep(0)  # every task is waiting on its queue before the engine produces anything
        gate.release(1)
        return await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)

    with AsyncEngine(engine) as engine_async:
        got = asyncio.run(main(engine_async))
        assert engine_async.snapshot().stats.max_running == 4
        assert_pool_empty(engine_async, engine)
    for (tokens, text, result), want in zip(got, expected, strict=True):
        assert tokens == want.token_ids == result.token_ids and text == want.text == result.text


@pytest.mark.parametrize("how", ["cancel", "break", "task", "async-break"])
def test_cancelling_mid_stream_frees_every_block_at_once(trained_tiny_mtp2, how):
    """Request A is cancelled after three events, while the step making its fourth runs (an explicit
    cancel, a consumer that stops iterating on a thread or in a coroutine, or an asyncio task cancelled
    while it waits); B runs on. When A's final event arrives only B's blocks are reserved; B still gets
    exactly its tokens alone, and afterwards the pool is whole again."""
    model = trained_tiny_mtp2
    params = SamplingParams(max_tokens=40, temperature=0.0)
    want_a, want_b = alone(model, PROMPTS[0], params, False), alone(model, PROMPTS[1], params, False)
    engine = make_engine(model)
    # decode 3 waits until A is cancelled; decode 4 (the step after the cancel) waits until we have looked
    gate = PausingDecode(engine, pause_at=[1, 3, 4])
    with AsyncEngine(engine) as engine_async:
        a = engine_async.submit(PROMPTS[0], params)
        b = engine_async.submit(PROMPTS[1], params)
        gate.release(1)
        seen = []
        if how == "task":
            async def consume():
                async for out in a:
                    seen.append(out)

            async def main():
                task = asyncio.create_task(consume())
                while len(seen) < 3:
                    await asyncio.sleep(0.001)
                gate.reached(3)  # A's consumer is now waiting for its fourth event
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

            asyncio.run(main())
        elif how == "async-break":
            async def consume():
                async for out in a:
                    seen.append(out)
                    if len(seen) == 3:
                        gate.reached(3)
                        break  # the abandoned async iterator is closed by asyncio, which cancels

            asyncio.run(consume())
        elif how == "break":
            for out in a:
                seen.append(out)
                if len(seen) == 3:
                    gate.reached(3)
                    break  # closing the iterator cancels
        else:
            events = iter(a)
            seen = [next(events) for _ in range(3)]
            gate.reached(3)
            assert a.cancel()
            gate.release(3)
            seen += list(events)  # the step under way still delivers its token, then the cancellation
            assert [e.finished for e in seen] == [False] * 4 + [True] and seen[-1].finish_reason == "cancelled"
        gate.release(3)
        result_a = a.result(HANG_GUARD_S)
        assert result_a.finish_reason == "cancelled" and a.finished
        assert result_a.token_ids == want_a.token_ids[: len(result_a.token_ids)] and len(result_a.token_ids) == 4
        snap = engine_async.snapshot()  # at A's final event, before B's next decode
        b_reserved = engine.cache.blocks_for(len(want_b.prompt_token_ids) + params.max_tokens)
        assert snap.reserved_blocks == b_reserved and snap.num_running == 1 and not b.finished
        assert snap.free_blocks >= snap.num_blocks - b_reserved
        gate.release(4)
        assert b.result(HANG_GUARD_S).token_ids == want_b.token_ids
        assert not a.cancel()  # over already
        assert engine_async.snapshot().stats.aborted_requests == 1
        assert_pool_empty(engine_async, engine)


def test_cancelling_waiting_and_speculative_requests_frees_their_blocks(trained_tiny_mtp2):
    engine = make_engine(trained_tiny_mtp2, max_batch=1)
    gate = PausingDecode(engine, pause_at=[1, 2])
    verify_gate = PausingDecode(engine, pause_at=[2], method="verify")  # the speculative request's 2nd step
    params = SamplingParams(max_tokens=30, temperature=0.0)
    with AsyncEngine(engine) as engine_async:
        first = engine_async.submit(PROMPTS[0], params)
        waiting = engine_async.submit(PROMPTS[1], params, speculative=True)
        gate.reached(1)
        assert waiting.cancel()
        gate.release(1)
        assert waiting.result(HANG_GUARD_S).finish_reason == "cancelled"
        assert waiting.result().token_ids == [] and waiting.result().stats.time_to_first_token_s is None
        gate.reached(2)
        assert first.cancel()
        gate.release(2)
        spec = engine_async.submit(PROMPTS[2], params, speculative=True)
        first_event = spec.next_output(HANG_GUARD_S)  # prefill; the second verification then waits
        verify_gate.reached(2)
        assert spec.cancel()
        verify_gate.release(2)
        result = spec.result(HANG_GUARD_S)
        assert result.finish_reason == "cancelled" and len(result.token_ids) > len(first_event.new_token_ids)
        assert result.token_ids == alone(trained_tiny_mtp2, PROMPTS[2], params, True).token_ids[: len(result.token_ids)]
        assert first.result(HANG_GUARD_S).finish_reason == "cancelled"
        assert_pool_empty(engine_async, engine)


def test_an_error_in_a_forward_reaches_every_consumer(trained_tiny_mtp2):
    """Three running and five waiting requests, consumed by four threads and four asyncio tasks: the
    injected failure of the third decode reaches all eight; the engine then refuses work and closes."""
    engine = make_engine(trained_tiny_mtp2, max_batch=3)
    boom = RuntimeError("injected decode failure")
    gate = PausingDecode(engine, pause_at=[1], fail_at=3, error=boom)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    engine_async = AsyncEngine(engine)
    handles = [engine_async.submit(p, params) for p in PROMPTS]
    caught = {}

    def consume_thread(i):
        try:
            for _ in handles[i]:
                pass
        except EngineDeadError as exc:
            caught[i] = exc

    async def consume_task(i):
        try:
            async for _ in handles[i]:
                pass
        except EngineDeadError as exc:
            caught[i] = exc

    async def tasks():
        await asyncio.wait_for(asyncio.gather(*(consume_task(i) for i in range(4, 8))), HANG_GUARD_S)

    threads = [threading.Thread(target=consume_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    gate.release(1)
    asyncio.run(tasks())
    for t in threads:
        t.join(HANG_GUARD_S)
    assert sorted(caught) == list(range(8))
    assert all(exc.__cause__ is boom for exc in caught.values())
    assert engine_async.error is boom and not engine_async.snapshot().alive
    with pytest.raises(EngineDeadError, match="injected decode failure"):
        engine_async.submit(PROMPTS[0], params)
    with pytest.raises(EngineDeadError):  # a consumer reading again is told again
        handles[0].result(HANG_GUARD_S)
    engine_async.close()  # returns: the loop thread is gone


def test_queue_bound_stop_accepting_drain_and_close(trained_tiny_mtp2):
    engine = make_engine(trained_tiny_mtp2, max_batch=1)
    gate = PausingDecode(engine, pause_at=[1])
    params = SamplingParams(max_tokens=5, temperature=0.0)
    engine_async = AsyncEngine(engine, max_waiting=2)
    with pytest.raises(ValueError, match="prompt"):  # a bad request is refused on the caller's thread
        engine_async.submit([], params)
    assert engine_async.num_waiting == 0
    first, second = engine_async.submit(PROMPTS[0], params), engine_async.submit(PROMPTS[1], params)
    with pytest.raises(QueueFullError, match="2 requests"):
        engine_async.submit(PROMPTS[2], params)
    gate.release(1)
    assert first.result(HANG_GUARD_S).finish_reason == "length"
    assert second.result(HANG_GUARD_S).finish_reason == "length"
    third = engine_async.submit(PROMPTS[2], params)  # room again
    engine_async.stop_accepting()
    with pytest.raises(EngineClosedError):
        engine_async.submit(PROMPTS[3], params)
    assert engine_async.drain(HANG_GUARD_S)
    assert third.result().token_ids == alone(trained_tiny_mtp2, PROMPTS[2], params, False).token_ids
    engine_async.close()
    engine_async.close()  # idempotent


def test_close_with_abort_cancels_what_is_in_flight(trained_tiny_mtp2):
    engine = make_engine(trained_tiny_mtp2, max_batch=1)
    gate = PausingDecode(engine, pause_at=[2])
    params = SamplingParams(max_tokens=30, temperature=0.0)
    engine_async = AsyncEngine(engine)
    running, queued = engine_async.submit(PROMPTS[0], params), engine_async.submit(PROMPTS[1], params)
    gate.reached(2)
    closer = threading.Thread(target=engine_async.close, kwargs={"abort": True})
    closer.start()
    while engine_async.accepting:  # close() has asked the loop to stop once this reads False
        time.sleep(0.001)
    gate.release(2)
    closer.join(HANG_GUARD_S)
    assert not closer.is_alive()
    assert running.result().finish_reason == queued.result().finish_reason == "cancelled"
    assert len(running.result().token_ids) == 3 and queued.result().token_ids == []
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.has_unfinished()


def test_engine_stream_on_two_threads_takes_turns_and_gets_what_each_gets_alone(trained_tiny_mtp2):
    """Without an AsyncEngine, two threads streaming from one Engine serialise on its lock instead of
    racing; each still gets exactly its own tokens."""
    model = trained_tiny_mtp2
    params = SamplingParams(max_tokens=12, temperature=0.0)
    engine = make_engine(model)
    got = {}

    def consume(i):
        got[i] = [t for out in engine.stream(PROMPTS[i], params, speculative=i == 1) for t in out.new_token_ids]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    for i in range(2):
        assert got[i] == alone(model, PROMPTS[i], params, i == 1).token_ids
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
