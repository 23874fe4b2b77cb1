# `make demo` and `make test` each set up .venv/ on a fresh machine first (tools/bootstrap.sh).
PY := .venv/bin/python

.PHONY: demo test test-all test-mock bench venv clean

venv:
	@tools/bootstrap.sh

demo: venv
	$(PY) -m ttswap.demo

test: venv
	$(PY) -m pytest -q

# also every model of the benchmark tables (the `exhaustive` tests): about an hour on 2 cores
test-all: venv
	$(PY) -m pytest -q -m ""

test-mock: venv
	$(PY) -m pytest -q -m ttnn_mock

bench: venv
	$(PY) benchmarks/bench_models.py

clean:
	rm -rf .venv .ttswap generated build *.egg-info
