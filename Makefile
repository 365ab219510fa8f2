# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch: an unpinned torch pulls a multi-GB CUDA build. Override for GPUs,
# e.g. `make TORCH_SPEC='torch==2.11.0' demo`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmmo-installed
# mergekit 0.1.5 for the parity tests, in its own environment (it pins its own dependencies),
# cached between runs; the tests find it here (or at MMMO_MERGEKIT_VENV) and skip, saying why,
# when it could not be installed.
MERGEKIT_VENV ?= $(HOME)/.cache/mmmo/mergekit-venv
MERGEKIT_STAMP := $(MERGEKIT_VENV)/.mergekit-0.1.5

.PHONY: demo test test-fast lint clean mergekit

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmmo demo $(ARGS)

$(MERGEKIT_STAMP):
	python3 -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install -q --upgrade pip
	$(MERGEKIT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(MERGEKIT_VENV)/bin/python -m pip install -q "mergekit==0.1.5"
	touch $(MERGEKIT_STAMP)

mergekit: $(MERGEKIT_STAMP)

# The parity tests skip (with the reason) if mergekit cannot be installed here: `-` goes on.
test: $(STAMP)
	-$(MAKE) --no-print-directory mergekit
	MMMO_MERGEKIT_VENV=$(MERGEKIT_VENV) $(VENV)/bin/pytest -ra $(PYTEST_ARGS)

# Skips the slow end-to-end tests (CI runs everything).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -ra -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
