# Set-up is automatic: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= build/demo
OPSET ?= 18

.PHONY: all install demo demo-big test test-all big corpus bench fuzz lint clean

all: test

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev,dask,s3,http,test-remote]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(PY) -m fixtures.demo $(DEMO_DIR)/demo.onnx
	$(PY) -m streamconv $(DEMO_DIR)/demo.onnx $(DEMO_DIR)/demo-opset$(OPSET).onnx --opset $(OPSET)
	$(PY) -m streamconv $(DEMO_DIR)/demo.onnx $(DEMO_DIR)/demo-opset$(OPSET)-ext.onnx --opset $(OPSET) --layout external
	$(PY) -m fixtures.demo --run $(DEMO_DIR)/demo.onnx $(DEMO_DIR)/demo-opset$(OPSET).onnx $(DEMO_DIR)/demo-opset$(OPSET)-ext.onnx

# The headline: an inline model past 2 GiB that onnx.load refuses, converted and run in
# ONNX Runtime, timed beside a plain copy; everything it writes is removed at the end.
demo-big: $(STAMP)
	$(PY) -m fixtures.demo_big build/demo-big

# The suite CI runs (includes one conversion past 2 GiB).
test: $(STAMP)
	$(PY) -m pytest -q

# Every (backend node test case, target) pair against onnx's converter: about 7,500
# conversions; then every downgrade of every case to 7, 9, ..., 21 by streamconv and by
# onnx, run in ONNX Runtime against the reference outputs: about 11,700 pairs.
# Both reports are printed even when the first finds a bug; the target fails if either does.
corpus: $(STAMP)
	mkdir -p build
	status=0; \
	$(PY) -m fixtures.corpus --all --jobs 2 --variants plain,folded || status=1; \
	$(PY) -m fixtures.downgrades --all --jobs 2 --json build/downgrades.json || status=1; \
	exit $$status

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.run

fuzz: $(STAMP)
	STREAMCONV_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_fuzz.py

lint: $(STAMP)
	$(PY) -m ruff check streamconv tests fixtures bench attacks
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
