# Two commands do the whole set-up: `make run` (the main job) and `make test` (the test suite).
# Both create or update the local virtualenv in .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/mae_builtin
CONFIG ?= configs/mae_builtin.py

.PHONY: run test install clean

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test,notebooks]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m maskjax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
