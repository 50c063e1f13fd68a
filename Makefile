# Quickstart: `make run` starts a node with the embedded defaults; `make test` runs the tests.
# Both create .venv and install the package on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit e2e bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dhtnode run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dhtnode tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict dhtnode

unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not netns"

e2e: $(STAMP)
	$(BIN)/pytest -q -m "slow or netns"

test: lint typecheck $(STAMP)
	$(BIN)/pytest -q

.PHONY: natlab
natlab: $(STAMP)
	NATLAB_FULL=1 $(BIN)/pytest -q -s -m netns

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# Docker swarm test (root): builds the image offline, runs 3 bootstrap + 12 nodes behind NAT
# router containers, checks them, tears everything down. See README "Docker and swarm tests".
.PHONY: swarm
swarm: $(STAMP)
	$(PYTHON) deploy/swarm/run.py

# deploy/systemd/dhtnode.service under a real systemd (root): a container with systemd as PID 1,
# the README's install commands, start/status/reload/watchdog/restart/stop, torn down.
# See README "Run it as a systemd service".
.PHONY: systemd-check
systemd-check: $(STAMP)
	$(PYTHON) deploy/systemd/realcheck.py
