# The two commands of the README's Quick start, plus the stage targets they are made of.
# Every target first runs scripts/setup.sh (idempotent: Debian packages when root, .venv, pinned packages).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo lint test test-fast benchmarks rewrites

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup lint
	$(PY) -m pytest -q

# ruff (pyproject.toml's rules) before the tests: seconds, so a lint error fails CI at once.
lint: setup
	$(PY) -m ruff check .

# Everything but the tests marked slow (tests/conftest.py says which): for the edit-test loop.
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

benchmarks: setup
	$(PY) -m benchmarks all --out results/benchmarks.json

# Rewrites every training caption of the embedded sets into data/rewrites/embedded (resumable; README:
# Rewriting captions, for its measured time).
rewrites: setup
	$(PY) scripts/make_rewrites.py
