"""Prefill/decode disaggregation: the front end (this process, the HTTP server), N prefill workers and one
decode worker, each a process started here with ``torch.multiprocessing`` spawn; docs/disaggregation.md has
the protocol and its failure handling.

    front end ──queue──▶ prefill worker p ──torch.distributed send/recv (pair group p)──▶ decode worker
        ▲                    (prompt → latent rows,                                  (places the rows,
        └──────────── queue: events, transfers, snapshots ◀──────────────────────────  decodes, streams)

Ranks: prefill workers 0..N-1, the decode worker N, in one gloo (CPU) / NCCL (GPU) world whose rendezvous is
a ``TCPStore`` the front end hosts on 127.0.0.1 (port chosen by the OS). Each prefill worker and the decode
worker share a two-rank group of their own, so a dead prefill worker breaks only its own pair. Tensors —
the latent KV rows, the first token, the MTP hidden states, the sampling generator — cross only those
groups (transfer.py); the control messages (a request to prefill, a cancellation, the decode worker's
events and counters) are small Python objects on ``multiprocessing`` queues, one per direction and worker,
so that a worker killed mid-write can corrupt nothing but its own queue.

Why it helps: a long prompt prefilled on a colocated engine stalls every decoding request for the length
of its forward (the engine's step is prefill + decode); here the decode worker never runs a prompt, so the
inter-token latency of running requests does not depend on what arrives (on separate cores or devices —
benchmarks/serve.py measures it).

Failure: a worker that exits is noticed within ``POLL_S`` by the reader thread that watches its process.
A dead prefill worker fails the requests it had not handed off yet (503) and the others route around it;
when the decode worker (or the last prefill worker) dies, every live request fails with 503, ``/health``
turns 503, new requests get 503, and the remaining workers are stopped — nothing waits on a dead peer.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch

from latentmoe.infer import AsyncEngine, Engine, EngineClosedError, EngineDeadError, QueueFullError, SamplingParams
from latentmoe.infer.async_engine import RequestHandle
from latentmoe.infer.cache_budget import CachePool
from latentmoe.infer.speculative import SpeculativeConfig
from latentmoe.io import one_line
from latentmoe.serve.backend import MODE_DISAGGREGATED, BackendSnapshot, ModelInfo
from latentmoe.serve.transfer import HEARTBEAT_S, params_from_json, params_to_json

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
POLL_S = 0.1  # how often a reader thread checks that its worker is alive
SNAPSHOT_S = 0.05  # how often the decode worker publishes its counters (when they changed)
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
GROUP_TIMEOUT = datetime.timedelta(seconds=10 * HEARTBEAT_S)  # a recv waits at most this long: heartbeats beat it


class WorkerError(RuntimeError):
    """A worker failed to start, died, or could not run a request."""


@dataclass(frozen=True)
class WorkerConfig:
    """What each worker builds its engine from (sent to the spawned processes, so plain values only).

    ``num_threads``: torch threads per worker (None: the cores divided among the workers)."""

    checkpoint: str
    device: str = "auto"
    dtype: str = "fp32"
    cache_dtype: str | None = None
    block_size: int = 64
    max_batch: int = 16
    cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    num_threads: int | None = None


# ------------------------------------------------------------------ the worker processes
def _build_engine(config: WorkerConfig, *, prefill: bool) -> Engine:
    from latentmoe.dtypes import dtype_from_name
    from latentmoe.pretrained import load

    model, tokenizer = load(config.checkpoint, device=config.device,
                            dtype=dtype_from_name(config.dtype, allowed=("fp32", "bf16", "fp64")))
    common = dict(cache_dtype=config.cache_dtype, block_size=config.block_size, max_model_len=config.max_model_len)
    if prefill:  # one prompt at a time; its pool holds exactly one sequence of the longest length
        limit = config.max_model_len or model.config.max_position_embeddings
        return Engine(model, tokenizer, max_batch=1, num_blocks=math.ceil(limit / config.block_size) + 1, **common)
    return Engine(model, tokenizer, max_batch=config.max_batch, cache_memory_bytes=config.cache_memory_bytes,
                  **common)


def worker_main(index: int, config: WorkerConfig, num_prefill: int, store_port: int, inboxes, outboxes) -> None:
    """Entry point of worker ``index`` (rank ``index``; the decode worker is rank ``num_prefill``)."""
    import torch.distributed as dist

    from latentmoe.device import HOST, collective_backend, is_cuda, rank_device, set_current

    outbox = outboxes[index]
    parent = os.getppid()
    # Ctrl-C and SIGTERM reach the whole process group; the front end drains and then stops us itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        world = num_prefill + 1
        torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // world))
        devices = [rank_device(rank, config.device) for rank in range(world)]
        device = devices[index]
        set_current(device)
        # NCCL needs a GPU of its own per rank; otherwise gloo moves the bytes through host memory
        own_gpus = all(is_cuda(d) for d in devices) and len(set(devices)) == world
        comm_device = device if own_gpus else HOST
        store = dist.TCPStore(LOCALHOST, store_port, is_master=False, timeout=GROUP_TIMEOUT)
        dist.init_process_group(collective_backend(comm_device), store=store, rank=index, world_size=world,
                                timeout=GROUP_TIMEOUT)
        groups = [dist.new_group([p, num_prefill], timeout=GROUP_TIMEOUT) for p in range(num_prefill)]
        engine = _build_engine(replace(config, device=str(device)), prefill=index < num_prefill)
        if index < num_prefill:
            _PrefillWorker(index, engine, groups[index], num_prefill, comm_device, inboxes[index], outbox,
                           parent).run()
        else:
            _DecodeWorker(engine, groups, comm_device, inboxes[index], outbox, parent).run()
        status = 0
    except BaseException as exc:  # the front end must hear why, then sees the process exit
        outbox.put(("error", index, f"{type(exc).__name__}: {one_line(exc)}"))
        status = 1
    outbox.close()
    outbox.join_thread()  # every message is in the pipe
    # leave without running C++ destructors: threads may still wait in a recv on a peer that is gone
    os._exit(status)


def orphaned(parent: int) -> bool:
    """The front end is gone (this process was re-parented): nobody will ever stop us, so stop."""
    return os.getppid() != parent


class _PrefillWorker:
    def __init__(self, rank, engine: Engine, group, decode_rank: int, device, inbox, outbox, parent: int):
        self.rank, self.engine, self.group, self.decode_rank = rank, engine, group, decode_rank
        self.device, self.inbox, self.outbox, self.parent = device, inbox, outbox, parent

    def run(self) -> None:
        from latentmoe.serve.transfer import send_handoff, send_heartbeat

        self.outbox.put(("ready", self.rank, {"pid": os.getpid()}))
        idle_since = time.monotonic()
        while True:
            try:
                message = self.inbox.get(timeout=POLL_S)
            except queue.Empty:
                if orphaned(self.parent):
                    return
                if time.monotonic() - idle_since > HEARTBEAT_S:
                    send_heartbeat(dst=self.decode_rank, group=self.group, device=self.device)
                    idle_since = time.monotonic()
                continue
            idle_since = time.monotonic()
            if message[0] == "stop":
                return
            _, request_id, prompt_ids, params_json, speculative = message
            params = params_from_json(params_json)
            try:
                handoff = self.engine.prefill_handoff(prompt_ids, params, speculative=speculative)
            except ValueError as exc:  # the front end validated it; a refusal here is reported, not fatal
                self.outbox.put(("failed", request_id, f"prefill: {exc}"))
                continue
            sent = send_handoff(handoff, request_id=request_id, params=params, speculative=speculative,
                                dst=self.decode_rank, group=self.group, device=self.device)
            self.outbox.put(("sent", request_id, sent.kv_bytes, sent.hidden_bytes, len(prompt_ids)))


class _DecodeWorker:
    """An AsyncEngine fed by one receiver thread per prefill pair; one forwarding thread per request."""

    def __init__(self, engine: Engine, groups, device, inbox, outbox, parent: int):
        self.engine, self.groups, self.device, self.inbox, self.outbox = engine, groups, device, inbox, outbox
        self.parent = parent
        self.async_engine = AsyncEngine(engine)
        self.lock = threading.Lock()
        self.handles: dict[int, RequestHandle] = {}
        self.cancelled: set[int] = set()  # cancelled before their handoff arrived
        self.stop = threading.Event()

    def run(self) -> None:
        e = self.engine
        self.outbox.put(("ready", len(self.groups), {
            "pid": os.getpid(), "max_model_len": e.max_model_len, "vocab_size": e.config.vocab_size,
            "bos_token_id": e.config.bos_token_id, "eos_token_id": e.config.eos_token_id,
            "num_mtp_layers": e.num_mtp_layers, "pool": vars(e.pool).copy(),
            "cache_bytes_per_token": e.cache_bytes_per_token()}))
        for p, group in enumerate(self.groups):
            threading.Thread(target=self._receive, args=(p, group), daemon=True).start()
        threading.Thread(target=self._control, daemon=True).start()
        last = None
        while not self.stop.wait(SNAPSHOT_S):
            s = self.async_engine.snapshot()
            current = (s.num_waiting, s.num_running, s.num_blocks, s.free_blocks, s.stats.prefill_tokens,
                       s.stats.placed_tokens, s.stats.decode_tokens, s.stats.draft_tokens,
                       s.stats.accepted_draft_tokens)
            if current != last:
                self.outbox.put(("snapshot", current))
                last = current
            if not s.alive:
                raise WorkerError(f"the decode engine stopped: {self.async_engine.error}")
            if orphaned(self.parent):
                break
        self.async_engine.close(abort=True)

    def _receive(self, p: int, group) -> None:
        from latentmoe.serve.transfer import recv_message

        while not self.stop.is_set():
            try:
                message = recv_message(src=p, group=group, device=self.device)
            except Exception as exc:  # the prefill worker is gone: its pair is broken, the others go on
                self.outbox.put(("prefill_lost", p, one_line(exc)))
                return
            if message is None:
                continue
            rid = message.request_id
            try:
                handle = self.async_engine.submit(message.handoff.prompt_ids, message.params,
                                                  speculative=message.speculative, handoff=message.handoff)
            except (ValueError, EngineClosedError, EngineDeadError) as exc:
                self.outbox.put(("failed", rid, f"decode: {exc}"))
                continue
            with self.lock:
                self.handles[rid] = handle
                if rid in self.cancelled:
                    self.cancelled.discard(rid)
                    handle.cancel()
            threading.Thread(target=self._forward, args=(rid, handle), daemon=True).start()

    def _forward(self, rid: int, handle: RequestHandle) -> None:
        try:
            for event in handle:
                self.outbox.put(("event", rid, event))
        except (EngineClosedError, EngineDeadError) as exc:
            self.outbox.put(("failed", rid, f"decode: {exc}"))
        finally:
            with self.lock:
                self.handles.pop(rid, None)

    def _control(self) -> None:
        while True:
            message = self.inbox.get()
            if message[0] == "stop":
                self.stop.set()
                return
            if message[0] == "cancel":
                with self.lock:
                    handle = self.handles.get(message[1])
                    if handle is None:
                        self.cancelled.add(message[1])
                if handle is not None:
                    handle.cancel()


# ------------------------------------------------------------------ the front end
@dataclass
class _Live:
    handle: RequestHandle
    prefill: int
    sent: bool = False
    started: bool = False


@dataclass
class _Worker:
    index: int
    process: object
    inbox: object
    outbox: object
    alive: bool = True
    ready: dict | None = None
    error: str | None = None
    reader: threading.Thread | None = None


@dataclass
class _Counters:
    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    free_blocks: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    transfer_kv_bytes: int = 0
    transfer_hidden_bytes: int = 0
    transfer_tokens: int = 0
    extra: dict = field(default_factory=dict)


class DisaggregatedBackend:
    """The front end of disaggregated serving (see the module docstring); the same interface as
    :class:`~latentmoe.serve.backend.LocalBackend`.

    Args:
        config: how the workers build their engines. tokenizer: for the API layer (the front end holds no
            weights). name: the served model name. num_prefill: prefill worker processes.
        max_queued: most requests admitted but not decoding yet (prefilling, in transfer, waiting in the
            decode worker) before ``submit`` raises QueueFullError. speculative: MTP speculative decoding
            (None: on when the model has MTP modules).
    """

    def __init__(self, config: WorkerConfig, *, tokenizer, name: str, num_prefill: int = 1,
                 max_queued: int | None = None, speculative: bool | None = None,
                 start_timeout: float = START_TIMEOUT_S):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if num_prefill < 1:
            raise ValueError(f"prefill_workers must be >= 1, got {num_prefill}")
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.config = config
        self.num_prefill = num_prefill
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._live: dict[int, _Live] = {}
        self._orphans: set[int] = set()  # ids failed here while the decode worker may still run them
        self._ids = itertools.count()
        self._accepting = True
        self._problem: str | None = None
        self._closing = False
        self._counters = _Counters()
        self._store = dist.TCPStore(LOCALHOST, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
        context = mp.get_context("spawn")
        inboxes = [context.Queue() for _ in range(num_prefill + 1)]
        outboxes = [context.Queue() for _ in range(num_prefill + 1)]
        procs = mp.start_processes(worker_main, args=(config, num_prefill, self._store.port, inboxes, outboxes),
                                   nprocs=num_prefill + 1, join=False, start_method="spawn")
        self._workers = [_Worker(i, procs.processes[i], inboxes[i], outboxes[i]) for i in range(num_prefill + 1)]
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.close(abort=True)
            raise
        ready = self._workers[-1].ready
        self.num_mtp_layers = ready["num_mtp_layers"]
        speculative = self.num_mtp_layers > 0 if speculative is None else speculative
        if speculative and not self.num_mtp_layers:
            self.close(abort=True)
            raise ValueError("speculative: the model has no MTP modules (num_nextn_predict_layers is 0)")
        self._slack = SpeculativeConfig().resolve(self.num_mtp_layers).cache_slack if speculative else 0
        pool = CachePool(**ready["pool"])
        self._counters.num_blocks = self._counters.free_blocks = pool.num_blocks
        self.info = ModelInfo(name=name, max_model_len=ready["max_model_len"], vocab_size=ready["vocab_size"],
                              bos_token_id=ready["bos_token_id"], eos_token_id=ready["eos_token_id"], pool=pool,
                              cache_bytes_per_token=ready["cache_bytes_per_token"], speculative=speculative,
                              mode=f"{MODE_DISAGGREGATED} ({num_prefill} prefill worker"
                                   f"{'s' if num_prefill > 1 else ''} + 1 decode worker)",
                              tokenizer=tokenizer)
        for worker in self._workers:
            worker.reader = threading.Thread(target=self._read, args=(worker,), daemon=True,
                                             name=f"latentmoe-worker-{worker.index}")
            worker.reader.start()

    # ------------------------------------------------------------------ start
    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            while worker.ready is None:
                try:
                    message = worker.outbox.get(timeout=POLL_S)
                except queue.Empty:
                    if not worker.process.is_alive():
                        raise WorkerError(f"worker {worker.index} exited with code {worker.process.exitcode} "
                                          "while starting") from None
                    if time.monotonic() > deadline:
                        raise WorkerError(f"worker {worker.index} did not start within {timeout:g} s") from None
                    continue
                if message[0] == "error":
                    raise WorkerError(f"{self._role(worker.index)} failed to start: {message[2]}")
                if message[0] == "ready":
                    worker.ready = message[2]

    def _role(self, index: int) -> str:
        return "the decode worker" if index == self.num_prefill else f"prefill worker {index}"

    @property
    def pids(self) -> list[int]:
        """Process ids: prefill workers first, the decode worker last."""
        return [w.process.pid for w in self._workers]

    @property
    def workers_alive(self) -> list[bool]:
        """Per worker (order of :attr:`pids`): alive as far as the front end knows."""
        return [w.alive for w in self._workers]

    @property
    def processes_alive(self) -> list[bool]:
        """Per worker: whether its process is still running."""
        return [w.process.is_alive() for w in self._workers]

    # ------------------------------------------------------------------ requests
    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The limits ``Engine.new_request`` applies in the decode worker, checked here first (same words)."""
        info = self.info
        if not prompt_ids:
            raise ValueError("prompt: the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < info.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
        if len(prompt_ids) + params.max_tokens > info.max_model_len:
            raise ValueError(f"max_tokens: the prompt's {len(prompt_ids)} tokens + max_tokens={params.max_tokens} "
                             f"exceed max_model_len={info.max_model_len}")
        positions = len(prompt_ids) + params.max_tokens + self._slack
        blocks = math.ceil(positions / info.pool.block_size)
        if blocks > info.pool.num_blocks:
            pool = info.pool
            raise ValueError(f"max_tokens: the request needs {blocks} cache blocks ({positions} positions); the "
                             f"cache pool holds {pool.num_blocks} blocks = {pool.num_tokens} tokens "
                             "(raise cache_memory_bytes or num_blocks, or lower max_tokens)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        prompt_ids = [int(t) for t in prompt_ids]
        with self._cond:
            self._check_open()
            self._check(prompt_ids, params)
            if self.max_queued is not None and self._num_waiting() >= self.max_queued:
                raise QueueFullError(f"the waiting queue is full ({self.max_queued} requests wait for decoding)")
            alive = [w.index for w in self._workers[:-1] if w.alive]
            if not alive:  # the last one just died; _worker_died is about to say so
                raise EngineDeadError("no prefill worker is alive")
            load = {p: 0 for p in alive}
            for live in self._live.values():
                if not live.sent and live.prefill in load:
                    load[live.prefill] += 1
            prefill = min(alive, key=lambda p: (load[p], p))  # the least busy prefill worker
            rid = next(self._ids)
            handle = RequestHandle(SimpleNamespace(request_id=rid, prompt_ids=prompt_ids), self)
            self._live[rid] = _Live(handle, prefill)
        self._workers[prefill].inbox.put(("prefill", rid, prompt_ids, params_to_json(params), self.info.speculative))
        return handle

    def _check_open(self) -> None:
        if self._problem is not None:
            raise EngineDeadError(self._problem)
        if not self._accepting:
            raise EngineClosedError("the server is not accepting requests (stopping)")

    def _num_waiting(self) -> int:
        return sum(1 for live in self._live.values() if not live.started)

    def cancel(self, request_id: int) -> bool:
        with self._cond:
            if request_id not in self._live or self._problem is not None:
                return False
        self._workers[-1].inbox.put(("cancel", request_id))
        return True

    # ------------------------------------------------------------------ worker messages (reader threads)
    def _read(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.outbox.get(timeout=POLL_S)
            except queue.Empty:
                if not worker.process.is_alive():
                    self._worker_died(worker)
                    return
                if self._closing:
                    return
                continue
            except (EOFError, OSError, ValueError):  # the queue broke with its writer
                self._worker_died(worker)
                return
            self._dispatch(worker, message)

    def _dispatch(self, worker: _Worker, message) -> None:
        kind = message[0]
        if kind == "event":
            _, rid, event = message
            with self._cond:
                live = self._live.get(rid)
                if live is None:  # failed here already (its prefill worker died after sending): stop it there
                    if not event.finished and rid not in self._orphans:
                        self._orphans.add(rid)
                        self._workers[-1].inbox.put(("cancel", rid))
                    return
                if event.new_token_ids or event.finished:
                    live.started = True
                if event.finished:
                    del self._live[rid]
                    self._cond.notify_all()
            live.handle.deliver(replace(event, request_id=rid))
        elif kind == "sent":
            _, rid, kv_bytes, hidden_bytes, tokens = message
            with self._cond:
                c = self._counters
                c.transfer_kv_bytes += kv_bytes
                c.transfer_hidden_bytes += hidden_bytes
                c.transfer_tokens += tokens
                if rid in self._live:
                    self._live[rid].sent = True
        elif kind == "snapshot":
            waiting, running, blocks, free, prefill, placed, decode, drafts, accepted = message[1]
            with self._cond:
                c = self._counters
                c.num_running, c.num_blocks, c.free_blocks = running, blocks, free
                c.decode_tokens, c.draft_tokens, c.accepted_draft_tokens = decode, drafts, accepted
        elif kind == "failed":
            _, rid, text = message
            self._fail_requests([rid], WorkerError(text))
        elif kind == "error":
            worker.error = message[2]
            log.error("%s: %s", self._role(worker.index), message[2])
        elif kind == "prefill_lost" and not self._closing:
            log.warning("the decode worker lost prefill worker %d: %s", message[1], message[2])

    def _fail_requests(self, rids, error: BaseException) -> None:
        with self._cond:
            failed = [self._live.pop(rid) for rid in rids if rid in self._live]
            self._cond.notify_all()
        for live in failed:
            live.handle.fail(error)

    def _worker_died(self, worker: _Worker) -> None:
        worker.process.join(POLL_S)
        if self._closing or not worker.alive:
            worker.alive = False
            return
        worker.alive = False
        code = worker.process.exitcode
        why = f"{self._role(worker.index)} (pid {worker.process.pid}) exited with code {code}"
        if worker.error:
            why += f": {worker.error}"
        log.error("%s", why)
        if worker.index == self.num_prefill or not any(w.alive for w in self._workers[:-1]):
            with self._cond:
                self._problem = f"{why}; the server cannot decode any more"
                rids = list(self._live)
            self._fail_requests(rids, WorkerError(why))
            threading.Thread(target=self._stop_workers, daemon=True).start()
        else:
            with self._cond:
                rids = [rid for rid, live in self._live.items() if live.prefill == worker.index and not live.sent]
            self._fail_requests(rids, WorkerError(why))

    # ------------------------------------------------------------------ state
    def snapshot(self) -> BackendSnapshot:
        with self._cond:
            c = self._counters
            return BackendSnapshot(
                alive=self._problem is None, accepting=self._accepting and self._problem is None,
                num_waiting=self._num_waiting(), num_running=c.num_running, num_blocks=c.num_blocks,
                free_blocks=c.free_blocks, prefill_tokens=c.transfer_tokens, decode_tokens=c.decode_tokens,
                draft_tokens=c.draft_tokens, accepted_draft_tokens=c.accepted_draft_tokens,
                transfer_kv_bytes=c.transfer_kv_bytes, transfer_hidden_bytes=c.transfer_hidden_bytes,
                transfer_tokens=c.transfer_tokens, problem=self._problem)

    # ------------------------------------------------------------------ shutdown
    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def drain(self, timeout: float | None) -> bool:
        self.stop_accepting()
        with self._cond:
            return self._cond.wait_for(lambda: not self._live, timeout)

    def close(self, *, abort: bool = False, timeout: float | None = None) -> None:
        """Drain (unless ``abort``), then stop every worker (SIGKILL for one that does not stop within
        ``STOP_TIMEOUT_S``); requests still live end with EngineClosedError. Idempotent."""
        if not abort and self._problem is None:
            self.drain(timeout)
        self.stop_accepting()
        self._closing = True
        with self._cond:
            rids = list(self._live)
        self._fail_requests(rids, EngineClosedError("the server closed before this request ended"))
        self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in self._workers:
            if worker.process.is_alive():
                worker.inbox.put(("stop",))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(STOP_TIMEOUT_S)
