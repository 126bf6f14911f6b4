# Two entry points for a fresh machine with nothing but Python:  `make demo`  and  `make test`.
# GPU users: install your CUDA build of torch into .venv first and call `make ... TORCH=` to keep it.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_OUT ?= demo_out

.PHONY: install demo test sync-check nbtest pytest bench clean-nbs lint help

help:
	@echo "make demo   - set up .venv, pre-train the tiny model on data_samples/, probe it, write $(DEMO_OUT)/report.md"
	@echo "make test   - set up .venv, check notebooks/package sync, nbdev-test, pytest"
	@echo "make bench  - run the benchmarks in benchmarks/"

$(BIN)/python:
	$(PY) -m venv $(VENV)

# on Linux, PyPI's torch wheel is the CUDA build (GBs): TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
# CPU build instead (macOS and Windows wheels on PyPI are CPU builds already; pip's own config may point elsewhere)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/msm demo --out $(DEMO_OUT)

# notebooks are the source: cleaning and exporting must not change anything that is committed
sync-check: install
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  changed="$$(git status --porcelain -- nbs msm)"; \
	  if [ -n "$$changed" ]; then \
	    echo "Notebooks and msm/ are out of sync (run nbdev-clean && nbdev-export and commit):"; \
	    echo "$$changed"; git --no-pager diff --stat -- nbs msm; exit 1; \
	  fi; \
	fi

# two notebooks at a time, one BLAS thread each: 2 cores. OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep
# instead of spinning, which otherwise slows 2-thread torch 5-10x whenever another process holds a core
nbtest: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg $(BIN)/nbdev-test --n-workers 2 --timing

pytest: install
	OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg $(BIN)/python -m pytest -q

test: sync-check nbtest pytest

bench: install
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

lint: install
	$(BIN)/ruff check msm tests benchmarks
