# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 3

.PHONY: install demo test bench clean

install: $(STAMP)

# torch goes in first and pinned: its CPU wheel is on these machines, and installing it before
# the rest means no dependency range can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bitlm demo --out $(DEMO_DIR) --minutes $(DEMO_MINUTES)

clean:
	rm -rf runs .pytest_cache
