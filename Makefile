# Two commands do the whole set-up: `make run` (the main job) and `make test` (the test suite).
# Both create or update the local virtualenv in .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= workdirs/mae_builtin
CONFIG ?= configs/mae_builtin.py

.PHONY: run test install clean

# PyTorch, timm and transformers are for the checkpoint-conversion tests (tests/convert), pytorch-fid for the FID
# Inception test, panopticapi-lite (panopticapi's pq_compute; --no-deps: its metadata pins numpy<2, its code runs
# on numpy 2) for the PQ test. The CPU torch wheel goes in first and pinned: an unpinned torch, asked for directly or by
# timm/torchvision/pytorch-fid, is the CUDA build (GBs of nvidia-* wheels). timm, torchvision and pytorch-fid go in
# with --no-deps for the same reason (their light
# dependencies are in the "test" extra); PyPI's torchvision is built against CUDA torch, so its compiled ops do
# not load and maskjax/convert/_torch_compat.py declares the op schema its import needs. On machines without
# the local CPU wheel: make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
$(TEST_STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(VENV)/bin/python -m pip install --quiet --no-deps "torchvision==0.28.0" "timm==1.0.29" "pytorch-fid==0.3.0" \
		"panopticapi-lite==0.2.0"
	$(VENV)/bin/python -m pip install --quiet -e ".[test,notebooks]"
	touch $(STAMP) $(TEST_STAMP)

# The main job needs no PyTorch: maskjax alone.
$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $(STAMP)

install: $(TEST_STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m maskjax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(TEST_STAMP)
	$(VENV)/bin/python -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
