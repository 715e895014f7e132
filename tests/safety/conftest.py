"""Fixtures of the data-safety tests (docs/safety.md): the CLI in this process, and hostile filesystems (read-only,
full). The trained run and the cache are tests/conftest.py's; the helpers tests/cli_helpers.py's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.cli_helpers import Done


@pytest.fixture
def cli(capsys, monkeypatch, cache_dir):
    """``latentmoe ARGS`` in this process (fast; the same ``main`` a user runs). Returns a :class:`Done`."""
    from latentmoe.cli import main

    monkeypatch.setenv("LATENTMOE_CACHE", str(cache_dir))

    def call(*args: str | os.PathLike) -> Done:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse rejected an argument (already printed)
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return call


# ---------------------------------------------------------------------------------------------- hostile filesystems


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def _is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def read_only(monkeypatch):
    """``with read_only(dir):`` makes ``dir`` read-only for real where it can (a read-only bind mount as root,
    permissions otherwise); where neither bites, ``os.access`` and file creation under ``dir`` fail the way a
    read-only filesystem makes them fail (EROFS)."""
    import contextlib
    import errno

    @contextlib.contextmanager
    def make(path: Path):
        path = Path(path)
        if not _is_root():
            modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
            for p in modes:
                p.chmod(modes[p] & ~0o222)
            try:
                yield
            finally:
                for p, mode in modes.items():
                    p.chmod(mode)
            return
        if _mount("--bind", str(path), str(path)):
            try:
                if _mount("-o", "remount,bind,ro", str(path), str(path)):
                    yield
                    return
            finally:
                _umount(path)
        real_access, real_open = os.access, os.open

        def access(p, mode, *a, **k):
            if mode & os.W_OK and Path(p).resolve().is_relative_to(path.resolve()):
                return False
            return real_access(p, mode, *a, **k)

        def fake_open(p, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(p).resolve().is_relative_to(path.resolve()):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
            return real_open(p, flags, *a, **k)

        with monkeypatch.context() as m:
            m.setattr(os, "access", access)
            m.setattr(os, "open", fake_open)
            yield

    return make


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``small_disk(nbytes)`` -> a directory on a filesystem with room for about ``nbytes`` (a tmpfs, as root);
    where no tmpfs can be mounted, the checkpoint writer raises ENOSPC once ``nbytes`` have been written there."""
    import errno

    mounts = []

    def make(nbytes: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        if _is_root() and _mount("-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(where)):
            mounts.append(where)
            return where
        from latentmoe.checkpoint import tensors

        real = tensors.save_file
        written = {"bytes": 0}

        def save_file(data, filename, metadata=None):
            size = sum(t.numel() * t.element_size() for t in data.values())
            if Path(filename).resolve().is_relative_to(where.resolve()):
                written["bytes"] += size
                if written["bytes"] > nbytes:
                    raise tensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                                  f"(os error {errno.ENOSPC})")
            return real(data, filename, metadata=metadata)

        monkeypatch.setattr(tensors, "save_file", save_file)
        return where

    yield make
    for where in mounts:
        _umount(where)
