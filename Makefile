# Two commands from a fresh clone (README "Set up, run, test"); both create .venv first if it is missing.
#   make run     install into .venv (about a minute), then run the embedded default: hf-ewc train
#   make test    install into .venv if needed, then ruff, the import contracts and the test suite
# PYTHON picks the interpreter for the venv (Python >= 3.10); RUN_DIR is where the default run writes.

PYTHON ?= python3
VENV ?= .venv
RUN_DIR ?= .
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install "torch==2.13.0" -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	cd $(RUN_DIR) && $(abspath $(VENV))/bin/hf-ewc train --disable_tqdm true

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q
