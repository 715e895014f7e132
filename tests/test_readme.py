"""The README's Python examples run as written (in order, in one namespace), against a run directory and a
Hugging Face export made the way the README's commands make them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_RE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK_RE.findall(README.read_text())


def test_the_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert any("Engine(" in b for b in blocks) and any("load(" in b for b in blocks)


@pytest.fixture
def readme_cwd(tmp_path, monkeypatch, trained_run):
    """runs/demo (a tiny run standing in for make demo's) and hf-small (``latentmoe convert runs/demo hf-small``)."""
    from latentmoe.cli import main

    shutil.copytree(trained_run, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "runs/demo", "hf-small", "--to", "hf"]) == 0
    return tmp_path


@pytest.mark.slow
def test_every_python_example_in_the_readme_runs_verbatim(readme_cwd, capsys):
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"README python block {i} failed: {exc!r}\n{block}") from exc
