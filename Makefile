# Every target first runs scripts/setup.sh (a no-op when .venv is up to date), then runs in .venv.
#   make tune  ARGS="..."          extra flags for `mezo-vllm tune --task sst2` (its defaults are the study's choice)
#   make test  PYTEST_ARGS="..."   extra flags for pytest
#   make bench ARGS="..."          extra flags for `mezo-vllm bench`
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup tune test bench

setup:
	MEZO_VENV=$(VENV) scripts/setup.sh

tune: setup
	$(VENV)/bin/mezo-vllm tune --task sst2 --out runs/sst2-default $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q --durations=20 $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/mezo-vllm bench --out runs/bench $(ARGS)
