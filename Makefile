# neuraldrive-gw — `make help` lists the targets. Every target installs what it needs.
#
#   make demo              the gateway + a built-in fake Ollama on 127.0.0.1:3002
#   make test              the test suite on the newest PyPI releases (a venv in .venv)
#   make test DEPS=debian  the same suite on Debian 12's own python3-* packages
#   make check             typecheck + both test runs (what CI runs)

SHELL := /bin/sh
DEPS ?= pypi
VENV ?= .venv
DEBIAN_CLIENTS ?= .debian-clients
PYTEST_ARGS ?=
# Debian's interpreter, never a pyenv shim or whatever else is first on PATH.
SYSPY := /usr/bin/python3
DEBIAN_RUNTIME := python3-aiohttp python3-aiosqlite python3-argon2 python3-sdnotify \
	python3-yaml python3-click
# Programs the tests run as real processes, in both worlds: curl (test_process, test_caddy)
# and Debian's caddy 2.6 in front of the gateway (test_caddy).
DEBIAN_TOOLS := curl caddy
DEBIAN_TEST := python3-pytest python3-pytest-aiohttp python3-aioresponses \
	python3-pytest-timeout python3-trustme python3-pip $(DEBIAN_TOOLS)
DEBIAN_BASE := python3 python3-venv python3-pip $(DEBIAN_TOOLS)

.PHONY: help demo test test-pypi test-debian typecheck check clean docs

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(VENV)/.installed: setup.cfg pyproject.toml
	tools/bootstrap-debian $(DEBIAN_BASE)
	$(SYSPY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade -e '.[test]' mypy types-PyYAML
	touch $@

demo: $(VENV)/.installed ## Run the gateway demo (fake Ollama, temp DB, demo key, curl commands)
	$(VENV)/bin/neuraldrive-gw demo

test: test-$(DEPS) ## Run the tests (DEPS=pypi: newest releases; DEPS=debian: Debian 12 packages)

test-pypi: $(VENV)/.installed
	tools/bootstrap-debian $(DEBIAN_TOOLS)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-debian:
	tools/bootstrap-debian $(DEBIAN_RUNTIME) $(DEBIAN_TEST)
	tools/debian-clients $(DEBIAN_CLIENTS)
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(DEBIAN_CLIENTS) $(SYSPY) -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed ## mypy --strict over the package
	$(VENV)/bin/python -m mypy --strict neuraldrive_gw

check: typecheck ## Everything CI runs
	$(MAKE) test DEPS=pypi
	$(MAKE) test DEPS=debian

clean: ## Remove the venv and caches
	rm -rf $(VENV) $(DEBIAN_CLIENTS) build *.egg-info .mypy_cache

docs: $(VENV)/.installed ## Regenerate docs/cli.md from --help
	$(VENV)/bin/python tools/gen_cli_docs.py > docs/cli.md
