# Every target sets itself up on a fresh machine: .venv is created and the project installed when missing.
PYTHON_BOOT ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install serve test lint format bench-akconv evaluate clean

$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

serve: $(INSTALLED)
	$(PYTHON) -m service

test: $(INSTALLED) lint
	$(PYTHON) -m pytest

lint: $(INSTALLED)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(INSTALLED)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

bench-akconv: $(INSTALLED)
	$(PYTHON) -m bench.akconv

evaluate: $(INSTALLED)
	$(PYTHON) -m model evaluate --count 500

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
