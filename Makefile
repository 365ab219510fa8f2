# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch: an unpinned torch pulls a multi-GB CUDA build. Override for GPUs,
# e.g. `make TORCH_SPEC='torch==2.11.0' demo`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmmo-installed

.PHONY: demo test test-fast lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmmo demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -ra $(PYTEST_ARGS)

# Skips the slow end-to-end tests (CI runs everything).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -ra -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
