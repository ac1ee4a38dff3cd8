# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv (torch first, pinned to 2.13.0 unless TORCH_SPEC says otherwise), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bnb,torchao,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_lora hub tests examples bench

.PHONY: install demo test bench lint
