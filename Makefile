# The README's two commands: `make demo` and `make test`. Both create/reuse .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint venv clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/skypipe demo

# The viewer's browser test drives Debian's chromium (headless, through Playwright's Python client): install it
# when it is missing (as root, or through sudo); skipped when already there.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "chromium is missing and cannot be installed here (not root): the browser test will skip"; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
