# Two commands on a fresh machine:
#   make demo   set up .venv, then run every stage on the built-in corpus
#   make test   set up .venv (with dev extras), then run the whole test suite
#   make test-fast   the same without the tests marked slow (end-to-end runs, kills, many processes)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUN_DIR ?= runs/demo
PIP     := $(BIN)/pip install --disable-pip-version-check -q -c requirements.lock

.PHONY: demo test test-fast setup setup-dev bench clean

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

# The inner loop: every test that takes under ~3 s here (the slow ones are marked @pytest.mark.slow).
test-fast: setup-dev
	$(BIN)/python -m pytest -n auto --dist loadfile -m "not slow"

bench: setup-dev
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
