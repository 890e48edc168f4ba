# The two commands of the README: `make run` and `make test`. Both create the environment if
# missing, install the project, prepare the embedded default assets and then do their job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch that these machines carry on disk; an already installed torch (e.g. a CUDA build
# on a GPU machine, or a venv made with VENV_FLAGS=--system-site-packages) is kept.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
ASSETS ?= smollm2 gemma3_270m data
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup assets run test bench clean-cache

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed
	$(PY) -m calibrate assets prepare $(ASSETS)

run: setup
	$(PY) -m calibrate.run $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m calibrate bench $(ARGS)

clean-cache:
	rm -rf $${CALIBRATE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/calibrate}
