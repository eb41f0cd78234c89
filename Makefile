# The README's two commands: `make demo` and `make test`; each sets up .venv itself.
#
# TORCH_SPEC picks the torch release installed into .venv. The default 2.13.0 is the
# CPU wheel available on local disk. `make TORCH_SPEC=2.14.1 test` installs a CUDA
# build instead; `make TORCH_INDEX=https://download.pytorch.org/whl/cu126 test` adds
# an extra index to install torch from. Changing either rebuilds the venv's stamp.

PYTHON      ?= python3
# torchvision for the model zoo (tests/test_zoo.py, `make zoo`): the registry serves only its CUDA
# build, installed without dependencies so it keeps the venv's torch; untangle_ext.zoo.import_torchvision
# makes it importable in a CPU torch. Must be the release that matches TORCH_SPEC.
TORCHVISION_SPEC ?= 0.28.0
VENV        ?= .venv
TORCH_SPEC  ?= 2.13.0
TORCH_INDEX ?=
PIP          = $(VENV)/bin/pip
PY           = $(VENV)/bin/python
STAMP        = $(VENV)/.stamp
# The [ecosystem] extra, pinned as tested (wheels only; none of them replaces torch): CI runs their tests.
ECOSYSTEM    = "captum==0.9.0" "quantus==0.6.0" "nbclient==0.11.0" "nbformat>=5.10" "ipykernel>=7.4" "ipywidgets>=8.1"
TORCH_STAMP  = $(VENV)/.torch-$(TORCH_SPEC)$(if $(TORCH_INDEX),-custom-index)

.PHONY: venv demo test quality docs-quality bench gpu-check zoo clean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(VENV)/bin/python
	$(PIP) install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "torch==$(TORCH_SPEC)"
	rm -f $(VENV)/.torch-*
	touch $@

NATIVE_SRC   = $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu)

$(STAMP): pyproject.toml setup.py $(NATIVE_SRC) $(TORCH_STAMP)
	$(PIP) install numpy matplotlib pillow tqdm pytest hypothesis ninja scikit-learn "safetensors==0.8.0"
	$(PIP) install $(ECOSYSTEM)  # captum is also the Saliency baseline of the benchmarks
	$(PIP) install --no-deps "torchvision==$(TORCHVISION_SPEC)"
	$(PIP) install --no-build-isolation -e .
	touch $@

demo: venv
	$(PY) -m untangle_ext.cli demo

# `make quality` writes to results/quality; `make docs-quality` refreshes the tracked figures in docs/quality.
quality: venv
	$(PY) -m untangle_ext.cli quality --out results/quality

docs-quality: venv
	$(PY) -m untangle_ext.cli quality --out docs/quality

test: venv
	$(PY) -m pytest -q -x --durations=15

# `make bench` runs the full suite (< 10 min on 2 idle cores), then the real-model benchmarks (ResNet-50,
# VGG-16 at 224: appends benchmarks/results/history.jsonl, redraws trend.png); `BENCH_ARGS=--quick` (< 1 min each).
BENCH_ARGS ?=
bench: venv
	$(PY) -m untangle_ext.cli bench $(BENCH_ARGS)
	$(PY) -m benchmarks.realmodels $(filter --quick,$(BENCH_ARGS))

# On a CUDA machine (<= 8 min once the venv is built): `make TORCH_SPEC=2.14.1 gpu-check` builds the
# extension against a CUDA torch, runs the CUDA tests and GPU benchmarks (LeNet, VGG-style, VGG-16 and
# ResNet-50 at 224) and writes benchmarks/results/<gpu>.json and .md; it exits 1 (saying why) elsewhere.
gpu-check: venv
	$(PY) -m benchmarks.gpucheck

# `make zoo` explains every torchvision classification builder (hours on 2 cores) and writes
# docs/zoo.md + benchmarks/results/zoo.json; `make zoo ZOO_ARGS="--only resnet18 vit_b_16"` runs a few.
ZOO_ARGS ?=
zoo: venv
	$(PY) -m untangle_ext.zoo $(ZOO_ARGS)

clean:
	rm -rf build dist *.egg-info untangle_ext/_C*.so $(VENV) .pytest_cache .hypothesis results .cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
