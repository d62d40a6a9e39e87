# The two commands: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.carina-installed
CONFIG ?= config/carina.yaml

.PHONY: run test peers bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/carina serve --config $(CONFIG)

# The real peers (Orthanc, dcmtk, dicom3tools, Chromium, PostgreSQL unless one answers on 127.0.0.1:5432)
# come from Debian; tests fail, never skip, without them.
peers:
	scripts/ensure-peers.sh

test: $(STAMP) peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Each benchmark prints its JSON and writes it under bench/results/.
bench: $(STAMP) peers
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/hostile_input.py
	$(BIN)/python bench/onnx_runtime.py

clean:
	rm -rf $(VENV) var .pytest_cache
