"""Row exchanges on ``all_to_all_single`` with uneven splits: differentiable, optionally compressed, sync or async.

``exchange(x_ND, send_counts, recv_counts, group, codec=...)`` sends rows ``[sum(send_counts[:r]), ...)``
of ``x_ND`` to rank ``r`` of ``group`` and returns the rows received, ordered by source rank. Splits may be
uneven and zero. The payload goes on the wire in the codec's format (``latentmoe.parallel.payload``:
fp32, bf16, FP8 with 1×128 scales, LogFMT-8) and is decoded on arrival.

Gradients: the backward of an exchange is the same exchange in reverse — what rank r received, it sends
its gradient back — so gradients flow through dispatch and combine to the tokens and router weights on
their home rank. For a lossy codec the backward is straight-through (the gradient of decode∘encode is
taken as the identity) and travels in the codec's ``grad_dtype``.

The backward exchange may run on a process group of its own (``backward_group``, the same ranks): DualPipe's
overlapped chunk pairs run one micro-batch's forward and another's backward at the same time, from two threads,
and collectives of two threads may only share a group if every rank issued them in one order
(``latentmoe.parallel.pp.overlap``).

Asynchronous use: :func:`exchange_start` encodes and launches the transfer (``async_op=True``) and
returns a :class:`PendingExchange`; its :meth:`~PendingExchange.wait` blocks until the rows have arrived
and decodes them. Compute placed between the two overlaps the transfer (dual micro-batch overlap). The
time spent blocked in ``wait`` is the *exposed* communication time, summed in a :class:`CommClock`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentmoe.parallel.payload import Codec

ByteMeter = Callable[[list[int]], None]  # told the bytes one exchange sends to each peer of the group
FP32 = Codec("fp32")


@dataclass
class CommClock:
    """Seconds compute spent blocked on exchanges (``exposed``) and how many exchanges were waited for."""

    exposed: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.exposed, self.calls = 0.0, 0


def _launch(
    wire: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: dist.ProcessGroup | None,
    *,
    async_op: bool,
) -> tuple[torch.Tensor, dist.Work | None]:
    out = wire.new_empty((sum(recv_counts), *wire.shape[1:]))
    if group is None:  # a group of one rank: the exchange is a copy
        out.copy_(wire)
        return out, None
    work = dist.all_to_all_single(
        out,
        wire.contiguous(),
        output_split_sizes=list(recv_counts),
        input_split_sizes=list(send_counts),
        group=group,
        async_op=async_op,
    )
    return out, work


def _bytes_per_peer(counts: Sequence[int], row_bytes: int) -> list[int]:
    return [int(n) * row_bytes for n in counts]


class PendingExchange:
    """An exchange in flight; :meth:`wait` returns the decoded rows ``[sum(recv_counts), D]``."""

    def __init__(
        self,
        x_ND: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int],
        group: dist.ProcessGroup | None,
        *,
        codec: Codec,
        backward_meter: ByteMeter | None,
        clock: CommClock | None,
        backward_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.x_ND, self.send_counts, self.recv_counts, self.group = x_ND, send_counts, recv_counts, group
        self.backward_group = group if backward_group is None else backward_group
        self.codec, self.backward_meter, self.clock = codec, backward_meter, clock
        with torch.no_grad():
            wire = codec.encode(x_ND.detach())
        self.wire_row_bytes = math.prod(wire.shape[1:]) * wire.element_size()
        self._out, self._work = _launch(wire, send_counts, recv_counts, group, async_op=True)
        self._result: torch.Tensor | None = None

    @property
    def sent_bytes_per_peer(self) -> list[int]:
        """Bytes this exchange put on the wire for each peer (the forward direction)."""
        return _bytes_per_peer(self.send_counts, self.wire_row_bytes)

    def _arrive(self) -> torch.Tensor:
        start = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        if self.clock is not None:
            self.clock.exposed += time.perf_counter() - start
            self.clock.calls += 1
        return self.codec.decode(self._out, self.x_ND.shape[-1], self.x_ND.dtype)

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if torch.is_grad_enabled() and self.x_ND.requires_grad:
                self._result = _Arrive.apply(self.x_ND, self)
            else:
                self._result = self._arrive()
            self._out = None  # type: ignore[assignment]
        return self._result

    def backward(self, grad_MD: torch.Tensor) -> torch.Tensor:
        """The reverse exchange of a gradient (synchronous), in the codec's gradient dtype."""
        wire = grad_MD.to(self.codec.grad_dtype(grad_MD.dtype)).contiguous()
        if self.backward_meter is not None:
            self.backward_meter(_bytes_per_peer(self.recv_counts, math.prod(wire.shape[1:]) * wire.element_size()))
        out, _ = _launch(wire, self.recv_counts, self.send_counts, self.backward_group, async_op=False)
        return out.to(self.x_ND.dtype)


class _Arrive(torch.autograd.Function):
    """Connects the received rows to the sent ones for autograd; the transfer itself was launched earlier."""

    @staticmethod
    def forward(ctx, x_ND, pending):  # type: ignore[override]
        ctx.pending = pending
        return pending._arrive()

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        pending, ctx.pending = ctx.pending, None
        return pending.backward(grad_MD), None


def exchange_start(
    x_ND: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: dist.ProcessGroup | None,
    *,
    codec: Codec = FP32,
    backward_meter: ByteMeter | None = None,
    clock: CommClock | None = None,
    backward_group: dist.ProcessGroup | None = None,
) -> PendingExchange:
    """Encode ``x_ND [sum(send_counts), D]`` and launch the exchange; read the rows with ``.wait()``. The gradient
    goes back over ``backward_group`` (default ``group``)."""
    if x_ND.shape[0] != sum(send_counts):
        raise ValueError(f"exchange: {x_ND.shape[0]} rows to send but send_counts sum to {sum(send_counts)}")
    return PendingExchange(
        x_ND,
        [int(n) for n in send_counts],
        [int(n) for n in recv_counts],
        group,
        codec=codec,
        backward_meter=backward_meter,
        clock=clock,
        backward_group=backward_group,
    )


def exchange(
    x_ND: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: dist.ProcessGroup | None,
    *,
    codec: Codec = FP32,
    backward_meter: ByteMeter | None = None,
    clock: CommClock | None = None,
) -> torch.Tensor:
    """Synchronous, differentiable uneven all-to-all of rows (see the module docstring)."""
    return exchange_start(
        x_ND, send_counts, recv_counts, group, codec=codec, backward_meter=backward_meter, clock=clock
    ).wait()


def exchange_counts(send_counts_R: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """How many rows each peer sends me, given how many I send each: int64 ``[R]`` → int64 ``[R]``."""
    counts = send_counts_R.to(torch.int64).contiguous()
    if group is None:
        return counts.clone()
    recv_R = torch.empty_like(counts)
    dist.all_to_all_single(recv_R, counts, group=group)
    return recv_R
