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

DEMO_CNN := examples/out/small_cnn.safetensors examples/out/cnn_input.npy --arch models:small_cnn --pythonpath examples

# The demo's bn-diff commands exit 1 on purpose where they show a failure; `-` keeps make going.
demo: install
	$(PY) examples/make_examples.py examples/out
	$(BN) run examples/out/forum_model.pt examples/out/forum_input.pt --trust --layer bn
	$(BN) explain --layer bn --trust
	$(BN) run $(DEMO_CNN)
	-$(BN) run $(DEMO_CNN) --reference examples/out/theirs.npz
	$(PY) examples/ci/export_model.py examples/out/ci
	$(BN) check examples/out/ci/model.onnx --against examples/out/ci/model.pt \
		--arch models:resnet_tiny --pythonpath examples --input examples/out/ci/input.pt

test: install
	$(PY) -m pytest -q -p no:cacheprovider

LINT_DIRS := $(wildcard bn_diff tests examples bench)

lint: install
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/bench_run.py

clean:
	rm -rf $(VENV) examples/out bench/out .bn-diff
