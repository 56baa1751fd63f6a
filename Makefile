# mmsim: `make test` and `make run` set up a virtual environment from scratch; `make help` lists the targets.
# The distribution's CPython is built with PGO and LTO: prefer it where it is 3.11 or later.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11) python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# `make run HOST=... PORT=...` listens there (defaults 127.0.0.1 and 7077). Only values given on make's
# command line count: shells export HOST, and without either `mmsim serve` keeps MMSIM_LISTEN.
RUN_HOST := $(if $(findstring command line,$(origin HOST)),$(HOST))
RUN_PORT := $(if $(findstring command line,$(origin PORT)),$(PORT))
RUN_ARGS := $(strip $(if $(RUN_HOST)$(RUN_PORT),--listen $(or $(RUN_HOST),127.0.0.1):$(or $(RUN_PORT),7077)) $(ARGS))

.PHONY: help test run bench clean proto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,locust]'
	touch $(STAMP)

help: ## list the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z_-]*:.*## / { printf "  %-6s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

test: $(STAMP) ## set up the virtualenv and run the whole test suite, one worker per core
	$(PY) -m pytest -q -n auto

run: $(STAMP) ## start the server in the foreground on 127.0.0.1:7077, or HOST=... PORT=... ARGS="more flags"
	$(VENV)/bin/mmsim serve $(RUN_ARGS)

demo: $(STAMP) ## start a server, run the race profile 10 s against it, print the report, write demo.png
	$(PY) -m mmsim.loadgen.demo

bench: $(STAMP) ## run the model benchmarks (benchmarks/model_bench.py)
	$(PY) benchmarks/model_bench.py

clean: ## remove the virtualenv and the build and test caches
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

proto: $(STAMP) ## regenerate the committed gRPC code beside its .proto (package mmsim.v1)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/mmsim/v1/mmsim.proto
