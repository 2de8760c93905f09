# Two commands on a fresh machine: `make sweep` and `make test`. Both create .venv when it
# is absent and install rayrec into it with the tested versions in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lint test test-fast sweep train bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# ruff's rules are in pyproject.toml ([tool.ruff]); the import rules are tests/test_imports.py.
lint: install
	$(VENV)/bin/ruff check rayrec tests bench

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The main job on the built-in offline dataset.
sweep: install
	$(VENV)/bin/rayrec sweep sasrec --stage quick $(ARGS)

train: install
	$(VENV)/bin/rayrec train sasrec $(ARGS)

bench: install
	$(PY) bench/sasrec_ml1m.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
