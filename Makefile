# Every target sets itself up on a fresh machine: .venv is created and the project installed when missing.
PYTHON_BOOT ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install system-deps serve test lint format bench-akconv evaluate clean

# Debian tools the tests run for real (nginx, Prometheus, compose validation, Chromium for the page);
# installed when missing (needs root).
SYSTEM_TOOLS := nginx promtool prometheus docker-compose chromium

$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing nginx, prometheus, docker-compose, chromium (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			nginx prometheus docker-compose chromium; \
	fi

serve: $(INSTALLED)
	$(PYTHON) -m service

test: $(INSTALLED) system-deps lint
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
