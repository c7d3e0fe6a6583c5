# Two commands on a fresh machine: `make demo` (the whole job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is what CI and the tests use; the GPU image brings its own torch.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install demo test lint bench-tokenizer clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) entrypoint.py run --config configs/demo.yaml $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(PY) -m ruff check .

bench-tokenizer: install
	$(PY) scripts/bench_tokenizer.py $(ARGS)

clean:
	rm -rf work bucket .pytest_cache
