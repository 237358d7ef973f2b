# make test: a virtual environment with the CPU build of torch, the package and its test dependencies,
# then the whole test suite. Override TORCH to pick another torch build (e.g. TORCH="torch==2.13.0").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test lint install demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check diffusmith tests benchmarks scripts examples

# make demo: the toy model (toy/qwen-image-toy) draws a few prompts, learns the colour purple from the pictures in
# demo/concept/ with a LoRA, and draws them again: demo/before_after.png, demo/loss.png. CPU only, ~25 s.
demo: install
	$(BIN)/python scripts/demo.py
