# Two set-up-free commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test lint clean bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# test tools (pytest, ruff, NIfTI/DICOM/ONNX extras) on top; `make demo` does not need them
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

setup: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/dusss demo --out runs/demo

# two pytest workers of one thread each (the machine has 2 cores); a test file stays on one worker, so its module
# fixtures are built once (`loadgroup` would let one file's slow cases spread, but pytest-xdist 3.8 cannot set
# its group suffix under pytest 9: the node id moved from `_nodeid` to `_id`); tests/conftest.py hands out the
# modules marked slow first, longest first; the 20 slowest tests are listed
test: $(DEV_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs build *.egg-info
