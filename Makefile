# One entry point for every routine; each target sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean build chromium

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Coilroom needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The browser client: npm packages pinned in static/package-lock.json, bundled by
# static/build.mjs (esbuild) from static/src/*.entry.js into static/dist/ and static/index.html.
STATIC := static
NPM_STAMP := $(STATIC)/node_modules/.installed
BUILD_STAMP := $(STATIC)/dist/.built
STATIC_SOURCES := $(shell find $(STATIC)/src -type f 2>/dev/null)

$(NPM_STAMP): $(STATIC)/package.json $(STATIC)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: building the browser client needs Node.js 18+ and npm" >&2; exit 1; }
	npm ci --prefix $(STATIC) --no-audit --no-fund
	@touch $(NPM_STAMP)

$(BUILD_STAMP): $(NPM_STAMP) $(STATIC)/build.mjs $(STATIC_SOURCES)
	node $(STATIC)/build.mjs
	@touch $(BUILD_STAMP)

## Bundle the browser client (make run and make test do it themselves).
build: $(BUILD_STAMP)

# The browser tests drive Debian's Chromium; they fail (never skip) without it.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) is missing: the browser tests need Debian's chromium package (apt-get install -y chromium)" >&2; exit 1; }

## Run the server with demo data on the embedded defaults (SQLite in ./data, in-process broker).
run: $(STAMP) $(BUILD_STAMP)
	$(BIN)/python server.py serve

# The stock npm Yjs client that tests/test_yjs_interop.py drives (versions pinned in its lock file).
INTEROP := tests/interop
INTEROP_STAMP := $(INTEROP)/node_modules/.installed

$(INTEROP_STAMP): $(INTEROP)/package.json $(INTEROP)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: the Yjs interop tests need Node.js and npm" >&2; exit 1; }
	npm ci --prefix $(INTEROP) --no-audit --no-fund
	@touch $(INTEROP_STAMP)

## Run the whole test suite (needs PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379, Node.js and npm, Chromium).
test: $(STAMP) $(INTEROP_STAMP) $(BUILD_STAMP) chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.chat_fanout

clean:
	rm -rf $(VENV) data .pytest_cache $(STATIC)/node_modules $(STATIC)/dist $(STATIC)/index.html test-artifacts
