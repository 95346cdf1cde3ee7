# Two commands for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
BN := $(VENV)/bin/bn-diff

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev,onnx]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/make_examples.py examples/out
	-$(BN) run examples/out/forum_model.pt examples/out/forum_input.pt --trust
	$(BN) run examples/out/small_cnn.safetensors examples/out/cnn_input.npy \
		--arch models:small_cnn --pythonpath examples

test: install
	$(PY) -m pytest -q -p no:cacheprovider

LINT_DIRS := $(wildcard bn_diff tests examples bench)

lint: install
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/bench_run.py

clean:
	rm -rf $(VENV) examples/out bench/out .bn-diff
