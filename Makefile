# Two entry points for a fresh machine:
#   make demo  - train a real model with a cockpit attached and serve the live dashboard
#   make test  - run the whole test suite (this is what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean browser compiler

# The dashboard's browser tests drive Debian's Chromium (we are root on CI's fresh machine).
browser:
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver)

# The histogram kernels (cockpit/native.py) are compiled on first use; without a C
# compiler they fall back to the slower torch path with a warning.
compiler:
	command -v cc >/dev/null || (apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev) || \
		echo "no C compiler: histograms will use the slower torch path (cockpit/native.py)" >&2

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,examples]'
	touch $(STAMP)

demo: $(STAMP) compiler
	$(BIN)/python -m examples.demo

test: $(STAMP) browser compiler
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) compiler
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
