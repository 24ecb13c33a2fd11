# One command from a fresh machine: `make test` creates .venv, installs a CPU build of torch when the
# interpreter has none, installs regtune with its test/bench extras, then runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup test lint docs demo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: setup lint docs
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -q

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/regtune run recipes/quickstart_noisy_labels.yaml

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
