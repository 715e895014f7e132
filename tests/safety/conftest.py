"""Shared pieces of the data-safety tests (docs/safety.md): the CLI in a subprocess, a small trained run, and
snapshots of a directory that tell whether anything in it changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ("--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1",
        "--no-progress")
CLI_TIMEOUT_S = 300


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.strip().splitlines() if line.strip()]

    def one_error_line(self, *fragments: str) -> str:
        """Assert: exit status 2, exactly one ``latentmoe...: error: ...`` line on stderr, no traceback, each
        fragment in it; return the line."""
        assert self.returncode == 2, (self.returncode, self.stdout, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        assert len(self.lines) == 1, self.stderr
        line = self.lines[0]
        assert line.startswith("latentmoe") and "error: " in line, line
        for fragment in fragments:
            assert fragment in line, (fragment, line)
        return line


def cli_env(cache: Path) -> dict[str, str]:
    return os.environ | {"LATENTMOE_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def run_cli(*args: str | os.PathLike, cwd: Path, cache: Path, timeout: float = CLI_TIMEOUT_S) -> Done:
    """``latentmoe ARGS`` in a fresh process (what a user runs)."""
    proc = subprocess.run([sys.executable, "-m", "latentmoe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(cache), timeout=timeout)
    return Done(proc.returncode, proc.stdout, proc.stderr)


def start_cli(*args: str | os.PathLike, cwd: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "latentmoe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=cli_env(cache))


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative path -> sha256, symlinks by target), and every directory: equal
    snapshots mean nothing was created, changed or removed."""
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer cache for the whole session (the tiny preset's BPE is trained once)."""
    return tmp_path_factory.mktemp("latentmoe-cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir) -> Path:
    """A tiny run of 4 steps with checkpoints at steps 2 and 4 (read-only for tests: copy before changing)."""
    root = tmp_path_factory.mktemp("trained")
    done = run_cli("train", *TINY, "--steps", "4", "--save-every", "2", "--keep-last", "5", "--out", root / "run",
                   cwd=root, cache=cache_dir)
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.fixture
def run_copy(tmp_path, trained_run) -> Path:
    """A private copy of the trained run to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, symlinks=True)
    return dst


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
