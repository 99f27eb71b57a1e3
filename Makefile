# The two set-up commands of the README. Both install what they need into the active Python.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test demo bench-core

# requirements.txt first (pinned torch), then this repository as an editable package: ldm, vlmdiff and
# utils become importable from any folder; --no-deps keeps pip from resolving anything a second time.
install:
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps -e .

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) scripts/demo.py

bench-core: install
	$(PYTHON) bench/bench_unet_attention.py
