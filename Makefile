# The two commands: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.carina-installed
CONFIG ?= config/carina.yaml
# OHIF/Cornerstone3D, pinned in tests/js/package-lock.json, for the tests that run their code.
JS       := tests/js
JS_STAMP := $(JS)/node_modules/.carina-installed

.PHONY: run test peers bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# `carina db upgrade` first: it creates the schema on a fresh machine and migrates an
# existing database (one made before migrations included) to this version's.
run: $(STAMP)
	$(BIN)/carina db upgrade --config $(CONFIG)
	$(BIN)/carina serve --config $(CONFIG)

# The real peers (Orthanc, dcmtk, dicom3tools, Chromium, PostgreSQL unless one answers on 127.0.0.1:5432)
# come from Debian; tests fail, never skip, without them.
peers:
	scripts/ensure-peers.sh

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json | peers
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

test: $(STAMP) peers $(JS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Each benchmark prints its JSON and writes it under bench/results/.
bench: $(STAMP) peers
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/hostile_input.py
	$(BIN)/python bench/receive_hash.py
	$(BIN)/python bench/onnx_runtime.py
	$(BIN)/python bench/dicomweb.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) var .pytest_cache $(JS)/node_modules
