"""Process lifecycle under torch.distributed: start, barrier, shutdown, collective errors and timeouts.

Processes are launched by ``torchrun`` (or, in tests and benchmarks, by torch's own spawn with a TCP
rendezvous on 127.0.0.1); this module starts the default process group on the backend the device asks for
(gloo on CPU, NCCL on CUDA, ``latentmoe.device``), bounds every collective with a timeout, and turns the
backends' transport failures into one :class:`CollectiveError` line that names the rank. Nothing runs at
import time.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from latentmoe.device import CUDA_TYPE, HOST, collective_backend, rank_device, set_current

DEFAULT_TIMEOUT_S = 300.0  # collective timeout: a dead peer turns into an error after this long, not a hang
ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
ENV_RESTART_COUNT, ENV_AGENT_STORE = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"
_TRANSPORT_FAILURES = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "NCCL")


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died or stopped responding within the collective timeout."""


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    return int(os.environ.get(ENV_RANK, 0)), int(os.environ.get(ENV_WORLD, 1)), int(os.environ.get(ENV_LOCAL_RANK, 0))


def launched_distributed() -> bool:
    """Whether this process was started as one of several (torchrun sets WORLD_SIZE)."""
    return env_world()[1] > 1


def init_distributed(
    *,
    device: torch.device | str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.device:
    """Start the default process group (if not yet started) and return this rank's device.

    Under torchrun everything comes from the environment (``env://``); tests pass ``init_method``
    (``tcp://127.0.0.1:PORT``), ``rank`` and ``world_size``. ``device``: a spec for ``latentmoe.device``
    ("auto": ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU). ``timeout_s`` bounds every collective: a
    rank that died or hangs makes the others fail with an error after that long instead of waiting forever.
    """
    env_rank, env_size, local_rank = env_world()
    rank = env_rank if rank is None else rank
    world_size = env_size if world_size is None else world_size
    device = rank_device(local_rank, device)
    set_current(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _restart_store(rank, world_size, timeout) if init_method is None else None
        dist.init_process_group(
            collective_backend(device),
            init_method=None if store is not None else init_method,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    return device


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under ``torchrun --max-restarts``, a store namespaced by the restart count.

    torchelastic's agent keeps one store for the whole job, so a restarted group would read the addresses its
    dead predecessors published (gloo then fails with "Connection refused"); a prefix per attempt avoids it.
    None outside a restarted torchelastic job (the default env:// rendezvous is then right).
    """
    restart = os.environ.get(ENV_RESTART_COUNT)
    if restart is None or int(restart) == 0:
        return None
    agent_hosts_store = os.environ.get(ENV_AGENT_STORE) == str(True)
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"latentmoe-restart-{restart}/", base)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of a started process group, or a single process."""
    return not is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down (end of a distributed run)."""
    if is_initialized():
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """The device collectives of small host values must use: the current CUDA device under NCCL, else the host."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device(CUDA_TYPE, torch.cuda.current_device())
    return HOST


@contextlib.contextmanager
def collective_errors(rank: int, world_size: int, timeout_s: float):
    """Turn the backend's transport errors (gloo/NCCL timeouts, closed connections) into :class:`CollectiveError`
    naming this rank, so a run whose peer died ends with one clear line instead of a backend traceback."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if world_size == 1 or not (isinstance(exc, dist.DistError) or any(m in text for m in _TRANSPORT_FAILURES)):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CollectiveError(
            f"rank {rank} of {world_size}: a collective failed — a peer rank died or stopped responding "
            f"(collective timeout {timeout_s:.0f} s): {first[:200]}"
        ) from exc
