# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and (re)install the project into it when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/savlt synth $(DEMO_DATA) --seed 0
	$(BIN)/savlt train --config configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO_RUN) --overwrite

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN) .pytest_cache
