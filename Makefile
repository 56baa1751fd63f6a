# mmsim: `make test` and `make run` set up a virtual environment from scratch; `make help` lists the targets.
# The distribution's CPython is built with PGO and LTO: prefer it where it is 3.11 or later.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11) python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The exact tested set of every dependency and extra, for Python 3.11: `make lock` regenerates it from
# pyproject.toml's ranges with uv, keeping each pin the ranges still allow (UPGRADE=1: the newest instead).
LOCK   := requirements.lock
UV     := build/uv/bin/uv

# `make run HOST=... PORT=...` listens there (defaults 127.0.0.1 and 7077). Only values given on make's
# command line count: shells export HOST, and without either `mmsim serve` keeps MMSIM_LISTEN.
RUN_HOST := $(if $(findstring command line,$(origin HOST)),$(HOST))
RUN_PORT := $(if $(findstring command line,$(origin PORT)),$(PORT))
# An IPv6 address goes in brackets: HOST=::1 listens on [::1]:PORT.
RUN_LISTEN_HOST := $(if $(findstring :,$(RUN_HOST)),[$(RUN_HOST)],$(RUN_HOST))
RUN_ARGS := $(strip $(if $(RUN_HOST)$(RUN_PORT),--listen $(or $(RUN_LISTEN_HOST),127.0.0.1):$(or $(RUN_PORT),7077)) $(ARGS))

.PHONY: help test lint run demo bench docs lock dist clean proto

# The virtualenv holds exactly the lock file's set (every extra), then mmsim itself, editable.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

$(UV):
	$(PYTHON) -m venv build/uv
	build/uv/bin/python -m pip install --quiet 'uv>=0.13.9,<0.14'

help: ## list the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z_-]*:.*## / { printf "  %-6s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

# .ci/swapfile gives the kernel conformance scenarios that page out a swap file where none is active
# (as root; elsewhere it says why, and they are skipped): see docs/conformance.md.
test: lint ## set up the virtualenv, lint, and run the whole test suite, one worker per core
	bash .ci/swapfile
	$(PY) -m pytest -q -rs -n auto

# mypy reads the packages as their import names lay them out (see [tool.mypy] in pyproject.toml).
lint: $(STAMP) ## ruff check and mypy (settings in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(PY) -m mmsim.server.tools.package_tree build/typecheck
	$(PY) -m mypy

run: $(STAMP) ## start the server in the foreground on 127.0.0.1:7077, or HOST=... PORT=... ARGS="more flags"
	$(VENV)/bin/mmsim serve $(RUN_ARGS)

demo: $(STAMP) ## start a server, run the race profile 10 s against it, print the report, write demo.png
	$(PY) -m mmsim.loadgen.demo

bench: $(STAMP) ## run the model benchmarks (benchmarks/model_bench.py)
	$(PY) benchmarks/model_bench.py

docs: $(STAMP) ## build the documentation site (MkDocs, docs/ and mkdocs.yml) into site/; any warning fails it
	$(PY) -m mkdocs build --strict --site-dir site

lock: $(UV) ## regenerate requirements.lock from pyproject.toml (all extras, Python 3.11); UPGRADE=1 for the newest
	$(UV) pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
		--custom-compile-command 'make lock' --output-file $(LOCK) $(if $(UPGRADE),--upgrade) --quiet

dist: $(STAMP) ## build the sdist and the wheel into dist/ and check them with twine
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

clean: ## remove the virtualenv, dist/ and the build and test caches
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

proto: $(STAMP) ## regenerate the committed gRPC code beside its .proto (package mmsim.v1)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/mmsim/v1/mmsim.proto
