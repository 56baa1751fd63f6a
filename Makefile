# mmsim: `make test` and `make run` set up a virtual environment from scratch.
# The distribution's CPython is built with PGO and LTO: prefer it where it is 3.11 or later.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11) python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test run bench clean proto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

run: $(STAMP)
	$(VENV)/bin/mmsim serve

bench: $(STAMP)
	$(PY) benchmarks/model_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Regenerate the committed gRPC code beside its .proto (package mmsim.v1).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/mmsim/v1/mmsim.proto
