# Two entry points, each sets up everything it needs on a fresh machine:
#   make demo   - the main job: the demo report on the shipped shapes-llava model
#   make test   - lint and the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= report

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first: any other torch request pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/hooked-vlm demo --out $(OUT)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
