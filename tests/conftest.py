"""Suite-wide settings.

Tests run torch on one thread: the models here are tiny, and on a 2-core machine OpenMP threads
waiting for each other make small matmuls far slower (and a busy neighbour makes it much worse).
One fixed thread count also keeps bit-exact comparisons meaningful within a process.
"""

import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import TINY, run_cli

torch.set_num_threads(1)


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

