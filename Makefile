# The two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fm3d-installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint

setup: $(STAMP)

# torch goes in first, from constraints.txt (a CPU wheel here); the project then installs
# against that pin, so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/fm3d info
	$(BIN)/python -c "import torch, fm3d; enc = fm3d.create_encoder('vit3d_tiny'); out = enc(torch.randn(1, 1, 64, 64, 64)); print('vit3d_tiny tokens', tuple(out.tokens.shape), 'pooled', tuple(out.pooled.shape))"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
