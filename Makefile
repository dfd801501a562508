# playrec: two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= $(or $(PLAYREC_DATA),../shared/data)

.PHONY: venv test lint demo bench soak soak-takeover screenshot clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,spark]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# DEMO_ARGS=--hold keeps the worker (and its console, http://127.0.0.1:PORT/console) up after the demo
demo: $(STAMP)
	$(VENV)/bin/playrec demo --data $(DATA) $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) benchmarks/als_vs_implicit.py

# the lifecycle scenario at 50x: ~1M plays, 20 nights, a seeded random fault a day; figures into
# docs/RELIABILITY.md (SOAK_ARGS="--seed N --nights 20 --scale 3.5")
soak: $(STAMP)
	$(PY) -m tests.lifecycle.soak --write-docs $(SOAK_ARGS)

# take-over soak: 50 kill -9 cycles of one of two workers under a steady replay (TAKEOVER_ARGS="--seed N")
soak-takeover: $(STAMP)
	$(PY) benchmarks/soak.py --cycles 50 $(TAKEOVER_ARGS)

# the README's screenshot of the operator's console, taken by its browser test (tests/integration/test_console.py)
screenshot: $(STAMP)
	PLAYREC_CONSOLE_SCREENSHOT=docs/img/console.png $(PY) -m pytest -q tests/integration/test_console.py -k real_browser

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
