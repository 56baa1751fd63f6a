# mmsim: `make test` and `make run` set up a virtual environment from scratch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test run bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

run: $(STAMP)
	$(PY) -m mmsim.server

bench: $(STAMP)
	$(PY) benchmarks/model_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
