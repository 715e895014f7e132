"""Mutation testing of one module with the tests that import it: ``make mutants MODULE=latentmoe/model/moe.py``.

mutmut (a dev dependency) changes one thing at a time in MODULE — ``<`` into ``<=``, ``+ 1`` into ``+ 2``, a
keyword argument dropped, ``-1`` into ``+1`` — and runs the tests that reach the changed function. A mutant the
tests do not notice ("survived") is a behaviour no test pins down: kill it with a test, or say in
docs/testing.md why it cannot change behaviour (an equivalent mutant).

What this script does:

1. picks the test files that import MODULE or a name defined in it (directly, or through its package's
   ``__init__``), plus the mirror file ``tests/<pkg>/test_<name>.py``; files that start other processes
   (``subprocess``, ``run_ranks``) are left out, because a mutant lives only in mutmut's own process;
2. lays out ``.mutants/`` (git-ignored, recognised by its marker file): fresh copies of ``latentmoe/`` and
   ``tests/`` and a pyproject.toml holding the mutmut settings for this module and the project's pytest
   settings. mutmut keeps its results in ``.mutants/mutants/``; they are cleared first (mutmut retests only
   functions whose source changed, and would keep a survivor that a new test now kills), unless ``--keep``;
3. runs ``mutmut run`` there (one torch thread per worker, ``--max-children`` workers) and prints the survivors.

Options: ``--tests`` overrides the selection; ``--max-children`` (default 2); ``--keep``; arguments after ``--`` go
to ``mutmut run`` (e.g. a mutant-name pattern ``"latentmoe.model.moe.x_route*"``). Browse results with
``cd .mutants && mutmut browse`` or ``mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutants"
MARKER = "created-by-tools-mutants-py"
PACKAGE = "latentmoe"
OTHER_PROCESS_MARKERS = ("subprocess", "run_ranks")
# Exception messages are not mutated: which message a bad input gets is pinned by the tests that match on it,
# and a mutant of message text is noise in the survivor list.
DO_NOT_MUTATE_PATTERNS = (r"raise \w+", r"^\s*f?\"")
NOT_KILLED = ("survived", "timeout", "no tests", "suspicious")  # mutmut statuses that need a look


def module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts)


def defined_names(path: Path) -> set[str]:
    """Top-level classes, functions and assignments of a module."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def imports_module(test: Path, module: str, names: set[str]) -> bool:
    package = module.rsplit(".", 1)[0]
    leaf = module.rsplit(".", 1)[1]
    for node in ast.walk(ast.parse(test.read_text())):
        if isinstance(node, ast.Import) and any(a.name == module for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module:
            imported = {a.name for a in node.names}
            if node.module == module:
                return True
            if node.module == package and (leaf in imported or imported & names):
                return True
    return False


def select_tests(module_path: Path) -> list[str]:
    module = module_name(module_path)
    names = defined_names(ROOT / module_path)
    mirror = Path("tests", *module_path.parts[1:-1], f"test_{module_path.stem}.py")
    chosen = []
    for test in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = test.relative_to(ROOT)
        text = test.read_text()
        if any(m in text for m in OTHER_PROCESS_MARKERS):
            continue
        if rel == mirror or imports_module(test, module, names):
            chosen.append(str(rel))
    return chosen


def toml_list(values) -> str:
    return "[" + ", ".join(repr(str(v)).replace("\\\\", "\\") for v in values) + "]"


def write_config(module_path: Path, tests: list[str]) -> None:
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    patterns = ", ".join("'" + p + "'" for p in DO_NOT_MUTATE_PATTERNS)
    lines = [
        f"# written by tools/mutants.py for {module_path}; rewritten on every run",
        "[tool.mutmut]",
        f'source_paths = ["{PACKAGE}/"]',
        f"only_mutate = {toml_list([module_path])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not slow"]',
        f"do_not_mutate_patterns = [{patterns}]",
        'process_isolation = "forkserver"  # torch is imported before the workers fork',
        "",
        "[tool.pytest.ini_options]",
        f"markers = {toml_list(pytest_ini.get('markers', []))}",
        f"filterwarnings = {toml_list(pytest_ini.get('filterwarnings', []))}",
        f"timeout = {int(pytest_ini.get('timeout', 300))}",
        "",
    ]
    (WORK / "pyproject.toml").write_text("\n".join(lines))


def prepare_workdir(*, keep: bool) -> None:
    if WORK.exists() and not (WORK / MARKER).exists():
        sys.exit(f"mutants: {WORK} exists but was not made by tools/mutants.py; move it away first")
    WORK.mkdir(exist_ok=True)
    (WORK / MARKER).write_text("tools/mutants.py works here; delete the whole directory to start afresh\n")
    names = (PACKAGE, "tests") if keep else (PACKAGE, "tests", "mutants")
    for name in names:
        target = WORK / name
        if target.exists():
            shutil.rmtree(target)
        if name != "mutants":
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a file under latentmoe/, e.g. latentmoe/model/moe.py")
    parser.add_argument("--tests", nargs="+", help="test files to run instead of the selected ones")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--keep", action="store_true", help="reuse mutmut's results of the last run of this module")
    argv = sys.argv[1:] if argv is None else argv
    mutmut_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    module_path = Path(args.module)
    if module_path.is_absolute():
        module_path = module_path.relative_to(ROOT)
    if module_path.suffix != ".py" or module_path.parts[0] != PACKAGE or not (ROOT / module_path).is_file():
        sys.exit(f"mutants: MODULE must be a .py file under {PACKAGE}/, got {args.module!r}")
    tests = args.tests or select_tests(module_path)
    if not tests:
        sys.exit(f"mutants: no test file imports {module_name(module_path)}; name some with --tests")
    print(f"mutants: {module_path} with {len(tests)} test files: {' '.join(tests)}", flush=True)
    prepare_workdir(keep=args.keep)
    write_config(module_path, tests)
    mutmut = Path(sys.executable).with_name("mutmut")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORK)}
    run = subprocess.run([str(mutmut), "run", "--max-children", str(args.max_children), *mutmut_args],
                         cwd=WORK, env=env, stdout=subprocess.DEVNULL)
    results = subprocess.run([str(mutmut), "results"], cwd=WORK, env=env, capture_output=True, text=True)
    prefix = module_name(module_path) + "."
    survivors = [
        line.strip()
        for line in results.stdout.splitlines()
        if line.strip().startswith(prefix) and line.strip().endswith(NOT_KILLED)
    ]
    (WORK / "survivors.txt").write_text("\n".join(survivors) + "\n")
    print(f"mutants: {len(survivors)} not killed (list: .mutants/survivors.txt; diff: cd .mutants && mutmut show NAME)")
    for line in survivors:
        print("  " + line)
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
