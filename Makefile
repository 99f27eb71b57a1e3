# The two set-up commands of the README. Both install what they need into the active Python.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install lint test demo bench-core

# requirements.txt first (pinned torch), then this repository as an editable package: ldm, vlmdiff and
# utils become importable from any folder; --no-deps keeps pip from resolving anything a second time.
install:
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .

# ruff first: the tree stays formatted and lint-clean (pyproject.toml [tool.ruff]); then the test suite.
test: install lint
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

demo: install
	$(PYTHON) scripts/demo.py

bench-core: install
	$(PYTHON) bench/bench_unet_attention.py
