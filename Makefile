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
DEB_BUILD_DEPS := debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
	dpkg-dev fakeroot lintian git
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' neuraldrive_gw/__init__.py)
DEB := build/deb/neuraldrive-gw_$(VERSION)_all.deb
# dpkg-buildpackage and lintian with Debian's own tools only (python3 may be a pyenv shim).
CLEAN_ENV := env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$(HOME) LANG=C.UTF-8

.PHONY: help demo test test-pypi test-debian typecheck check clean docs deb lint-deb lint-unit \
	bench-compare deb-e2e bench bench-soak

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

deb: ## Build the Debian package with dh-python into build/deb/, then lintian it
	tools/bootstrap-debian $(DEB_BUILD_DEPS)
	@head -1 packaging/deb/debian/changelog | grep -q "($(VERSION))" || \
		{ echo "debian/changelog does not match __version__ $(VERSION)" >&2; exit 1; }
	rm -rf build/deb && mkdir -p build/deb/neuraldrive-gw-$(VERSION)
	git ls-files -z --cached --others --exclude-standard | \
		tar -c --null -T - | tar -x -C build/deb/neuraldrive-gw-$(VERSION)
	cp -r packaging/deb/debian build/deb/neuraldrive-gw-$(VERSION)/debian
	cp systemd/neuraldrive-gw.service build/deb/neuraldrive-gw-$(VERSION)/debian/
	cd build/deb/neuraldrive-gw-$(VERSION) && $(CLEAN_ENV) dpkg-buildpackage -us -uc -b
	$(MAKE) lint-deb

lint-deb: ## lintian on the built package: no errors, no warnings
	$(CLEAN_ENV) lintian --fail-on error,warning --pedantic $(DEB)

deb-e2e: deb ## Boot test: install the .deb in a Debian 12 container, check it under real systemd
	tools/bootstrap-debian debootstrap systemd-container
	tools/deb-e2e $(DEB)

lint-unit: ## systemd-analyze security of the unit: exposure 1.5 or lower
	$(CLEAN_ENV) systemd-analyze security --offline=true --threshold=15 \
		systemd/neuraldrive-gw.service

BENCH_DIR ?= ../shared/bench
BENCH_DUR ?= 10
# DEPS=debian: compare.py, ref_proxy.py and the gateway all on Debian's interpreter and
# aiohttp 3.8.4 (what the appliance runs); default: the venv's newest releases.
BENCH_PY_pypi = $(CURDIR)/$(VENV)/bin/python
BENCH_PY_debian = $(SYSPY)
BENCH_PY = $(BENCH_PY_$(DEPS))
bench-compare: $(VENV)/.installed ## The gateway next to the bare aiohttp proxy (BENCH_DIR's compare.py; DEPS=debian too)
	tools/bootstrap-debian wrk util-linux python3-psutil $(DEBIAN_RUNTIME)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check psutil
	mkdir -p build
	cd $(BENCH_DIR) && PYTHONPATH=$(CURDIR) $(BENCH_PY) compare.py --dur $(BENCH_DUR) \
		--gateway-setup '$(CURDIR)/bench/gateway-setup {workdir} $(BENCH_PY)' \
		--gateway-cmd 'exec $(BENCH_PY) -m neuraldrive_gw serve --config {workdir}/gw.yaml --listen 127.0.0.1:{port} --upstream {upstream}' \
		--gateway-ready /healthz --out $(CURDIR)/build/bench-results.jsonl \
		| tee $(CURDIR)/build/bench-comparison-$(DEPS).md

SOAK_S ?= 600
bench: $(VENV)/.installed ## This repo's benchmark: gateway vs the fake Ollama alone (bench/run.py)
	tools/bootstrap-debian wrk util-linux
	mkdir -p build
	$(VENV)/bin/python bench/run.py --dur $(BENCH_DUR) | tee build/bench.md

bench-soak: $(VENV)/.installed ## SOAK_S seconds of steady mixed load: RSS and fd drift (bench/run.py)
	tools/bootstrap-debian wrk util-linux
	mkdir -p build
	$(VENV)/bin/python bench/run.py --soak $(SOAK_S) | tee build/bench-soak.md
