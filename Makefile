# Two set-up-and-go targets: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# experts: the cpu-profile OCR/detection runtimes; clip: torch + open_clip (CUDA wheels, they run on CPU too).
	$(PIP) install -q -e ".[test,experts,clip]"
	# The demo crawls scikit-image's sample photos: only the wheel's data files are used, not the library.
	$(PIP) install -q --no-deps "scikit-image==0.26.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capfactory demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/experts.py

clean:
	rm -rf $(VENV) capfactory-data .pytest_cache
