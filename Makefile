# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 3

.PHONY: install bytecode demo test bench clean image

install: $(STAMP)

# torch goes in first and pinned: its CPU wheel is on these machines, and installing it before
# the rest means no dependency range can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Bytecode for our own packages first: these machines export PYTHONDONTWRITEBYTECODE=1, so without it
# every process the suite starts (each Ray worker, each CLI subprocess) recompiles them, ~0.6 s apiece.
bytecode: $(STAMP)
	$(PY) -m compileall -q bitlm pipelines tune serve cluster benchmarks > /dev/null

test: bytecode
	$(PY) -m pytest -q

demo: bytecode
	$(VENV)/bin/bitlm demo --out $(DEMO_DIR) --minutes $(DEMO_MINUTES)

# The cluster image (Dockerfile): tagged with the pinned ray, which must equal the cluster's and the client's.
RAY_VERSION := $(shell sed -n 's/.*"ray\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
IMAGE ?= bitlm:$(RAY_VERSION)-py311-cu128

image:
	docker build -t $(IMAGE) .
	@echo "built $(IMAGE); push it where the nodes pull from and set docker.image (or BITLM_IMAGE)"

clean:
	rm -rf runs .pytest_cache
