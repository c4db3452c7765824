# Two commands: `make demo` (the main job) and `make test` (the whole suite). Both set up what is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The tested torch. A CPU build of this release sets up in seconds. The oldest supported one, in its own venv:
# make test TORCH=torch==2.5.1 EXTRAS=test VENV=.venv-floor (dev's triton pin conflicts with older torch's own)
TORCH  ?= torch==2.13.0
EXTRAS ?= dev
STAMP  := $(VENV)/.normlab-installed
# Test processes (pytest-xdist, one test file per process at a time): most of a first run is numba compiling the
# kernels, one process per core halves it (10 -> 6 minutes on 2 cores). JOBS=0 runs everything in this process.
JOBS   ?= 2

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile src/normlab/kernels/native.cpp
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@# the native glue for norm layers below 32 MiB (optional: without a C++ compiler the Python glue runs them)
	-$(BIN)/normlab build-native
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/normlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile

bench: $(STAMP)
	@mkdir -p runs
	$(BIN)/normlab bench --json runs/bench.json --plot runs/bench.png

clean:
	rm -rf $(VENV) runs .pytest_cache
