# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment when it is missing, and install bubblewrap (the code sandbox's
# isolation, docs/sandbox.md) when it is missing and this is root with apt-get.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-parity venv browser sandbox-deps vllm-env clean

$(BIN)/codetune: pyproject.toml
	@echo "setting up $(VENV): pip installs codetune and its dependencies (a few minutes, once)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Without bwrap the sandbox falls back to process-level isolation and says so; CI (root) must not.
sandbox-deps:
	@if command -v bwrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing bubblewrap (the code sandbox)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	else \
		echo "warning: bubblewrap (bwrap) is missing and cannot be installed here (needs root and apt-get):" \
			"executed tests will run in the process-level fallback sandbox (docs/sandbox.md)" >&2; \
	fi

venv: sandbox-deps $(BIN)/codetune

demo: venv
	$(BIN)/codetune run tiny-cpu --overwrite

# The report's browser tests drive Debian's chromium through its chromedriver. CI runs `make test` as
# root on a fresh machine: install them there (a no-op when present); a user's non-root clone skips them.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (apt) for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null; \
	else \
		echo "chromium or chromedriver missing and not root: the browser tests will skip"; \
	fi

# vLLM pins an older transformers than codetune's: it gets its own environment, never $(VENV).
# `codetune serve --engine vllm` finds it with --vllm .venv-vllm (or CODETUNE_VLLM). Needs a CUDA GPU to run.
VLLM_VENV ?= .venv-vllm
vllm-env:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm
	@echo "vLLM is in $(VLLM_VENV): codetune serve RUN --engine vllm --vllm $(VLLM_VENV)"

# Two workers of one thread each (pytest-xdist): a file's tests stay on one worker, so a module's fixtures are
# built once, and files start in the order tests/conftest.py gives them (the longest first: with xdist's
# default reordering by test count, the demo's fine-tune and the README walk ran last, one worker idle).
# Measured on a clean clone, 2 cores: 18.6 minutes of pytest against 25 serial (README.md, "Tests").
# The twelve-run family parity test (4 families x 3 seeds) takes over an hour: `make test-parity` runs it.
TEST_WORKERS ?= 2
test: venv browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=30 -m "not parity" \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-parity: venv
	$(BIN)/python -m pytest -q -m parity tests/test_family_parity.py

clean:
	rm -rf runs .pytest_cache
