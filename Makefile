# One entry point for every routine; each target sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Coilroom needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Run the server with demo data on the embedded defaults (SQLite in ./data, in-process broker).
run: $(STAMP)
	$(BIN)/python server.py serve

# The stock npm Yjs client that tests/test_yjs_interop.py drives (versions pinned in its lock file).
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.installed

$(INTEROP_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: the Yjs interop tests need Node.js and npm" >&2; exit 1; }
	npm ci --prefix $(INTEROP) --no-audit --no-fund
	@touch $(INTEROP_STAMP)

## Run the whole test suite (needs PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379, Node.js and npm).
test: $(STAMP) $(INTEROP_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.chat_fanout

clean:
	rm -rf $(VENV) data .pytest_cache
