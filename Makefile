# The two commands a newcomer needs: `make demo` and `make test`.
# Both create the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test venv clean

$(BIN)/codetune: pyproject.toml
	@echo "setting up $(VENV): pip installs codetune and its dependencies (a few minutes, once)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/codetune

demo: venv
	$(BIN)/codetune run tiny-cpu --overwrite

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
