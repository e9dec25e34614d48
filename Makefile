# Two commands on a fresh machine:
#   make demo   set up .venv, then run every stage on the built-in corpus
#   make test   set up .venv (with dev extras), then run the whole test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUN_DIR ?= runs/demo
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c requirements.lock

.PHONY: demo test setup setup-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Stamp files: re-install only when the dependency lists change.
$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	$(BIN)/zero-chatgpt run --preset demo --run-dir $(RUN_DIR)

# One test file per worker, as many workers as cores: a file's tests share its fixtures and keep their order.
test: setup-dev
	$(BIN)/python -m pytest -n auto --dist loadfile

bench: setup-dev
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
