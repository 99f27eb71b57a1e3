# The two set-up commands of the README. Both install what they need into the active Python.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test demo bench-core

install:
	$(PIP) install -q --disable-pip-version-check -r requirements.txt

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) scripts/demo.py

bench-core: install
	$(PYTHON) bench/bench_unet_attention.py
