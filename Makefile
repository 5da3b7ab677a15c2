# Two commands for a newcomer: `make app` opens the explorer, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Empty: the address in .streamlit/config.toml (loopback). ADDRESS=0.0.0.0 shares the app
# on every network interface; read the README's warning first.
ADDRESS ?=

.PHONY: install app test test-fast browser-deps demo bench clean

install: $(STAMP)

# Re-install only when the declared dependencies change.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

app: install
	$(VENV)/bin/streamlit run streamlit_app.py$(if $(ADDRESS), --server.address $(ADDRESS))

# Debian's Chromium for the real-browser test; never a downloaded browser.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || ./.ci/install-chromium || \
	  echo "chromium could not be installed: the browser test will skip and say why"

test: install browser-deps
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not browser"

demo: install
	$(PY) -m extractor demo --out data/demo
	$(PY) -m extractor run --data data/demo --out runs/demo --checkpoint none --min-size 320 --max-size 512
	$(PY) -m index build runs/demo

bench: install
	$(PY) bench/extract_bench.py
	$(PY) bench/index_bench.py

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
