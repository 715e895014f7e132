"""DualPipe's overlapped chunk pair: one micro-batch's forward runs while another's backward computes.

DeepSeek-V3 (TR §3.2.1, Fig. 4) pairs a forward chunk with a backward chunk on each device and interleaves their
pieces — attention, all-to-all dispatch, MLP, all-to-all combine — so that the expert-parallel communication of
one is hidden behind the computation of the other. ``ScheduleDualPipeV`` names these pairs (``OVERLAP_F_B``:
the forward of micro-batch i through one of the rank's two stages, the full backward of micro-batch j through the
other) but runs them one after the other. :func:`register_overlap` installs this module's runner for that action
(torch's ``register_custom_function`` extension point):

    main thread                                       worker thread
    wait for both chunks' inputs (pipeline recvs)
    start: forward of mb i ─────────────────────────▶ forward chunk: its MoE layers launch their dispatch /
    backward of mb j (the stage's layers in reverse,   combine all-to-alls and wait for them — while it waits,
    its all-to-all gradients on the EP *backward*      the backward computes (and the reverse)
    group)
    join; hand outputs to the neighbouring stage on this rank (the V's local hand-off)

Two threads may only issue collectives on one process group if every rank issues them in the same order, so
the backward exchanges get a group of their own (``ProcessGroups.ep_backward``, the same ranks): the forward
thread uses the EP group, the backward the other; within each group the schedule fixes the order on every rank.
The pipeline's point-to-point sends and receives stay in the main thread, outside the pair. The arithmetic is
untouched — the same kernels on the same tensors, the backward accumulating into the same gradients in the same
order — so losses and weights equal the non-overlapped run's (tested).

What it can win is the time a chunk spends blocked in an all-to-all while the other has work. On a GPU the
compute kernels and the NIC proceed in parallel; here both threads share the process's CPU time with the other
ranks' processes (benchmarks/pipeline.py reports what that leaves).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from torch.distributed.pipelining.schedules import _ComputationType, _wait_batch_p2p

FORWARD, FULL_BACKWARD, OVERLAP_F_B = (
    _ComputationType.FORWARD,
    _ComputationType.FULL_BACKWARD,
    _ComputationType.OVERLAP_F_B,
)


class OverlappedPair:
    """The ``OVERLAP_F_B`` runner of one schedule (one worker thread, reused across steps)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dualpipe-forward")
        self.pairs = 0

    def __call__(self, action, ctx) -> None:
        f_action, b_action = action.sub_actions
        if f_action.computation_type != FORWARD or b_action.computation_type != FULL_BACKWARD:
            raise RuntimeError(f"unexpected overlapped pair {action}: expected a forward and a full backward")
        sched = self.schedule
        stages = {s.stage_index: s for s in sched._stages}
        f_stage, b_stage = stages[f_action.stage_index], stages[b_action.stage_index]
        f_mb, b_mb = f_action.microbatch_index, b_action.microbatch_index
        # the pipeline's receives of both chunks complete here, in the main thread
        if not f_stage.is_first and f_stage.stage_index - 1 not in stages:
            _wait_batch_p2p(sched.fwd_recv_ops.pop((f_stage.stage_index, f_mb)))
        if not b_stage.is_last and b_stage.stage_index + 1 not in stages:
            _wait_batch_p2p(sched.bwd_recv_ops.pop((b_stage.stage_index, b_mb)))
        loss = sched._internal_losses[b_mb] if b_stage.is_last else None
        sched.backward_counter[b_stage.stage_index] += 1
        last_backward = sched.backward_counter[b_stage.stage_index] == sched._n_microbatches

        def forward():
            out = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb], save_forward_output=False)
            sched._maybe_compute_loss(f_stage, out, ctx.target_mbs, f_mb)
            return out

        pending = self.worker.submit(forward)
        try:
            b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last_backward)
        finally:
            output = pending.result()  # the forward's exception, if any, surfaces here
        self.pairs += 1
        if f_stage.stage_index + 1 in stages:  # the V's local hand-offs (no communication)
            stages[f_stage.stage_index + 1].set_local_fwd_input(output, f_mb)
        if b_stage.stage_index - 1 in stages:
            stages[b_stage.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

    def close(self) -> None:
        self.worker.shutdown(wait=True)


def register_overlap(schedule, model) -> OverlappedPair:
    """Run ``schedule``'s ``OVERLAP_F_B`` actions as overlapped pairs (ScheduleDualPipeV)."""
    runner = OverlappedPair(schedule)
    schedule.register_custom_function(OVERLAP_F_B, runner)
    return runner
