# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and (re)install the project into it when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo

.PHONY: demo test lint docs venv clean chromium tiny-oct

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Debian's Chromium for the review page's browser test (tests/test_serve_page.py), installed when
# missing and make runs as root (as CI does); otherwise that test is skipped, except under CI.
chromium:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

test: $(STAMP) lint chromium
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or a page
# missing from the navigation.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The shipped tiny-oct backbone pretrained on the synthetic corpus, adapted with 16 shots per class:
# zero-shot first (no training), then SAVLT, then both side by side.
demo: $(STAMP)
	$(BIN)/savlt synth $(DEMO_DATA) --seed 0 || { \
		echo "make demo: if $(DEMO_DATA)/ holds an older demo's data, run make clean first"; exit 2; }
	$(BIN)/savlt train --config configs/demo.yaml --data $(DEMO_DATA) --method zero_shot \
		--out $(DEMO_RUN)-zero-shot --overwrite
	$(BIN)/savlt train --config configs/demo.yaml --data $(DEMO_DATA) --out $(DEMO_RUN) --overwrite
	$(BIN)/savlt compare $(DEMO_RUN)-zero-shot $(DEMO_RUN)

# Rebuild the shipped tiny-oct backbone (configs/pretrain_tiny_oct.yaml says how it is made).
tiny-oct: $(STAMP)
	$(BIN)/savlt synth build/corpus --pretrain --seed 0 --per-class 60
	$(BIN)/savlt pretrain build/corpus/pairs.csv --config configs/pretrain_tiny_oct.yaml \
		--out build/tiny-oct --float16
	mkdir -p src/savlt/backbones/tiny-oct
	cp build/tiny-oct/config.json build/tiny-oct/model.safetensors build/tiny-oct/tokenizer.json \
		build/tiny-oct/preprocessor_config.json \
		build/tiny-oct/tokenizer_config.json build/tiny-oct/README.md src/savlt/backbones/tiny-oct/

clean:
	rm -rf $(DEMO_DATA) $(DEMO_RUN) $(DEMO_RUN)-zero-shot build site .pytest_cache
