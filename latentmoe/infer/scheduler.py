"""The scheduler: which requests run, and the cache blocks they are promised.

Requests wait in arrival order (first come, first served). One is admitted while fewer than ``max_batch``
are running and the pool can promise it its worst case — ``ceil((prompt + max_tokens + speculative
slack) / block_size)`` blocks, reserved at admission and returned when it finishes or is aborted. Because
of the reservation a running request never runs out of blocks mid-generation, so nothing needs to be
preempted; a request whose worst case exceeds the whole pool can never run and is refused when it is
added (:meth:`Scheduler.reserve_for`), instead of waiting forever.

Blocks are *reserved* here and *allocated* by the cache as positions are written; the reservation is the
upper bound, so ``reserved_blocks <= num_blocks`` always holds and ``free blocks >= num_blocks −
reserved_blocks``.

Preemption hook: when the head of the queue does not fit, :meth:`Scheduler.make_room` is asked to free
``blocks_needed`` blocks. With worst-case reservation there is nothing to gain (the default returns False:
the request waits for running ones to finish). A scheduler that reserves optimistically (prompt only, grow
as needed) would override it to pick victims among ``running``, release their blocks with
:meth:`Scheduler.release`, put them back at the front of ``waiting`` to be recomputed, and return True —
that policy is not implemented here.

Each step the engine asks for the decode batch (:meth:`Scheduler.decode_batches`): every running plain
request in one batch, and the speculative ones grouped by their draft plan.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from latentmoe.infer.paged_cache import PagedLatentCache
from latentmoe.infer.request import Request
from latentmoe.infer.speculative import DraftPlan


@dataclass
class DecodeBatches:
    """One step's decode work: ``plain`` requests decode one token each; each ``speculative[plan]`` list
    verifies its drafts and drafts again."""

    plain: list[Request] = field(default_factory=list)
    speculative: dict[DraftPlan, list[Request]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.plain or self.speculative)

    @property
    def requests(self) -> list[Request]:
        return self.plain + [r for group in self.speculative.values() for r in group]


class Scheduler:
    """Waiting and running queues and the block reservation against ``cache``'s pool.

    Args:
        cache: the paged cache whose pool is promised (the scheduler frees a finished request's blocks).
        max_batch: most requests running at once.
    """

    def __init__(self, cache: PagedLatentCache, *, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.cache = cache
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved_blocks = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reserve_for(self, num_positions: int) -> int:
        """Blocks a request that touches ``num_positions`` positions reserves; a ValueError naming the
        pool's limit when that is more than the whole pool (it could never be admitted, even alone)."""
        blocks = self.cache.blocks_for(num_positions)
        self._check_fits(blocks, num_positions)
        return blocks

    def _check_fits(self, blocks: int, num_positions: int | None = None) -> None:
        pool = self.cache.num_blocks
        if blocks > pool:
            positions = f" ({num_positions} positions)" if num_positions is not None else ""
            raise ValueError(
                f"max_tokens: the request needs {blocks} cache blocks{positions}; the cache pool "
                f"holds {pool} blocks = {pool * self.cache.block_size} tokens "
                "(raise cache_memory_bytes or num_blocks, or lower max_tokens)"
            )

    # ------------------------------------------------------------------ transitions
    def add(self, request: Request) -> None:
        """Queue a request at the back (one that can never fit is refused here too)."""
        self._check_fits(request.reserved_blocks)
        self.waiting.append(request)

    def admit_next(self) -> Request | None:
        """Move the head of the queue to ``running`` with its blocks reserved, or None when the batch is
        full, the queue is empty, or the head does not fit (first come, first served: it waits)."""
        if not self.waiting or len(self.running) >= self.max_batch:
            return None
        request = self.waiting[0]
        shortfall = self.reserved_blocks + request.reserved_blocks - self.cache.num_blocks
        if shortfall > 0 and not self.make_room(shortfall):
            return None
        self.waiting.popleft()
        self.reserved_blocks += request.reserved_blocks
        self.running.append(request)
        return request

    def make_room(self, blocks_needed: int) -> bool:
        """Preemption hook (see the module docstring): free ``blocks_needed`` reserved blocks and return
        True, or return False to let the request wait. Worst-case reservation never needs it."""
        return False

    def release(self, request: Request) -> None:
        """A running request leaves: its blocks go back to the pool and its reservation is dropped."""
        if request.request_id in self.cache.block_tables:  # admitted requests hold blocks once prefilled
            self.cache.free(request.request_id)
        self.reserved_blocks -= request.reserved_blocks
        self.running.remove(request)

    def abort(self, request_id: int) -> Request | None:
        """Remove a waiting or running request (running: its blocks return at once); the request, or None
        when no such request is queued or running."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        for request in self.running:
            if request.request_id == request_id:
                self.release(request)
                return request
        return None

    def decode_batches(self) -> DecodeBatches:
        """The running requests to advance this step: plain ones together, speculative ones by plan."""
        batches = DecodeBatches(plain=[r for r in self.running if r.plan is None])
        for r in self.running:
            if r.plan is not None and r.output_ids:
                batches.speculative.setdefault(r.plan, []).append(r)
        return batches
