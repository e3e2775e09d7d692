# Two entry points, both doing all the set-up on a fresh machine:
#   make up     the local serving cluster (Ray + embedded Redis + Serve app), on :8000 through our
#               front HAProxy (503 + Retry-After under overload) into Serve's HAProxy mode;
#               make up ARGS="--no-haproxy --no-front-proxy": Serve's Python proxy alone
#   make test   the test suite
# TORCH_SPEC picks the torch build: the CPU wheel by default; on a GPU machine
#   make up TORCH_SPEC="torch==2.13.0"  with the CUDA index configured for pip.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install up test bench clean

$(BIN)/rerank: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/rerank

install: $(BIN)/rerank

up: install
	$(BIN)/rerank up $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) runs artifacts
