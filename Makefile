# soo_ext: `make demo` (set up, build, run the default benchmark) and `make test` (set up,
# build, run every test).  Both start from a fresh clone: the venv, torch and the build are
# made here.  Override e.g. `make wheel CUDA_ARCHS="9.0"`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
CUDA_ARCHS ?= 8.0;8.6;9.0+PTX
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= $(CUDA_ARCHS)

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
MODULE_STAMP := soo_ext/_build_info.json

.PHONY: setup build test demo bench wheel cmake-check clean

setup: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) ninja numpy pytest hypothesis \
		expecttest tabulate tqdm matplotlib scikit-learn mnist1d
	# optional peers of bench train / bench precond (K-FAC of ASDL, Shampoo of pytorch-optimizer)
	$(PY) -m pip install --quiet --no-deps asdfghjkl pytorch-optimizer
	touch $@

# Rebuilt only when a source changes (ninja then recompiles only what changed).
build: $(MODULE_STAMP)
$(MODULE_STAMP): $(VENV)/.installed $(SOURCES)
	$(PY) setup.py build_ext --inplace

test: build cmake-check
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m pytest -q tests
	# the CUDA sources, run on the CPU by the emulation of tests/cuda_emu, in place of the CPU
	# kernels: every test's oracle checks them too (~3.5 min here)
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m pytest -q -p no:cacheprovider --cuda-emu-as-cpu tests \
		--ignore=tests/test_build.py --ignore=tests/ops/test_cuda_emu.py
	# the pure-PyTorch fallback (what `import soo_ext` runs without the compiled module) must pass
	# too; test_build's builds need no second run
	SOO_EXT_DISABLE_EXT=1 $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_build.py

demo: build
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m bench

bench: build
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m bench micro --json bench/results/micro-cpu.json

# A wheel for the CUDA targets in CUDA_ARCHS, checked to really contain their device code.
wheel: $(VENV)/.installed
	rm -rf dist
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	$(PY) tests/cuda_archs.py dist/*.whl "$(CUDA_ARCHS)"

# CMakeLists.txt must keep building the same module: configure and build it once per test run.
cmake-check: $(VENV)/.installed
	$(PY) tests/cmake_build.py build-cmake

clean:
	rm -rf build build-cmake dist soo_ext/_C*.so $(MODULE_STAMP) *.egg-info
