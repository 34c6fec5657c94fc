# `make demo` and `make test` each set up .venv first (idempotent).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean slurm-up slurm-down

setup: $(STAMP)

# On machines without CUDA install the CPU torch wheel first: a bare `torch` requirement pulls GBs of CUDA. The zoo
# extra (torchvision, timm) is pinned to the torch installed, or pip would replace it by a CUDA build. The editable
# install runs with -qq: pip >= 25 echoes setuptools' informational "Editable installation" notice for this layout
# (package-dir maps mergebench.conf to conf/); errors still print.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q $(TORCH); fi
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/torch-pin.txt
	$(BIN)/pip install -qq -c $(VENV)/torch-pin.txt -e '.[dev,zoo]'
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/demo.py

# one pytest worker per core (at most 4: each holds ~2 GB); the tests and the runs they start use one torch thread each
XDIST   := -n auto --maxprocesses=4

test: setup
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not slurm"

lint: setup
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# every scripts/bench_*.py but the record comparer; each writes outputs/bench/<name>.json
bench: setup
	for f in $(filter-out scripts/bench_compare.py,$(sort $(wildcard scripts/bench_*.py))); do \
		$(BIN)/python $$f || exit 1; done
	@echo "records in outputs/bench/; compare two with: $(BIN)/python scripts/bench_compare.py OLD.json NEW.json"

# a one-node SLURM cluster on this machine (root; Debian packages) for the `slurm` tests and trying SLURM sweeps
slurm-up:
	scripts/slurm_local.sh start

slurm-down:
	scripts/slurm_local.sh stop

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun
