"""Running the command line in tests: in a subprocess (what a user runs), the tiny-run arguments, and snapshots
of a directory that tell whether anything in it changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
