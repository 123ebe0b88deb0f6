# The two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fm3d-installed

.PHONY: setup demo test lint docs

setup: $(STAMP)

# torch goes in first, from constraints.txt (a CPU wheel here); the project then installs
# against that pin, so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# The demo cohort, EHR labels, prepared cache and a tiny encoder pretrained with all four
# objectives on CPU, with the summary (run folder, best/last checkpoint, export, MLflow run);
# ends with the evaluation suite's table (pretrained against random weights). DEMO_ARGS go to
# `fm3d pretrain fit`, EVAL_ARGS to `fm3d eval-encoders`.
demo: setup
	FM3D=$(BIN)/fm3d PYTHON=$(BIN)/python EVAL_ARGS="$(EVAL_ARGS)" bash scripts/demo.sh $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# The docs site into site/, warnings as errors as in CI (tests/test_docs_site.py).
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site
