# `make test` and `make demo` each create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Local wheels on the build machines; users may install any torch >= 2.1.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo venv clean lint

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

# Tests run in a shuffled order (pytest-randomly) with a fixed seed, so a failure reproduces: `make test SEED=7`.
# They run in JOBS worker processes (pytest-xdist: tests are handed out one by one, except the modules marked
# xdist_group, which stay on one worker; torch threads are split between the workers by tests/conftest.py);
# `make test JOBS=0` runs them in this process. The 15 slowest tests are listed at the end (where the time goes).
SEED ?= 20251129
JOBS ?= auto
test: $(VENV)/.installed-dev
	$(PY) -m pytest tests -q -p randomly --randomly-seed=$(SEED) -n $(JOBS) --maxprocesses 4 --dist loadgroup --durations=15

demo: $(VENV)/.installed-demo
	$(VENV)/bin/excelseg demo

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out
