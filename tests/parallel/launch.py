"""Run a function on W local ranks (gloo over 127.0.0.1 only), with bounded time.

``run_ranks(fn, world_size, *args)`` spawns W processes; each sets one torch thread, starts the
default process group on ``tcp://127.0.0.1:PORT`` and calls ``fn(rank, world_size, *args)``. An
exception in any rank fails the test with that rank's traceback; ranks still running at the deadline
are terminated and the test fails.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
DEFAULT_DEADLINE_S = 120.0
COLLECTIVE_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """Environment that keeps gloo on the loopback interface and each rank on one thread."""
    return {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": LOOPBACK}


def _worker(rank: int, fn, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(loopback_env())
    torch.set_num_threads(1)
    from latentmoe.parallel.runtime import init_distributed

    init_distributed(
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=world_size,
        timeout_s=timeout_s,
        device=torch.device("cpu"),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, deadline_s: float = DEFAULT_DEADLINE_S,
              collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    ctx = mp.start_processes(
        _worker,
        args=(fn, world_size, free_port(), collective_timeout_s, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, end - time.monotonic()))):
            if time.monotonic() > end:
                raise TimeoutError(f"{world_size} ranks did not finish within {deadline_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
