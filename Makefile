# The two commands a new machine needs: `make demo` and `make test`.
# Both create .venv on first use and (re)install the project only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned here (not in pyproject) so pip takes the CPU wheel that lies on this disk.
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= runs/demo

MODULE ?= latentmoe/model/moe.py

.PHONY: demo test lint bench mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/latentmoe demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# Mutation testing of one module with the tests that import it (docs/testing.md); not part of `make test`.
mutants: $(STAMP)
	nice -n 15 $(PY) tools/mutants.py $(MODULE)

# Removes only what make itself created; run directories (runs/) are yours and are never touched here.
clean:
	rm -rf $(VENV) .mutants
