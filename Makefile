# soo_ext: `make demo` (set up, build, show soo_ext against torch in a minute) and `make test`
# (set up, build, run every test).  Both start from a fresh clone: the venv, torch and the build
# are made here.  Override e.g. `make wheel CUDA_ARCHS="9.0"`.
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

PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# Tests that build or install the module: the first pass only (a second run checks nothing new).
FIRST_PASS_ONLY := --ignore=tests/test_build.py --ignore=tests/test_install.py

.PHONY: setup build test test-isa demo bench wheel cmake-check clean

setup: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) ninja numpy pytest hypothesis \
		expecttest tabulate tqdm matplotlib scikit-learn mnist1d
	# optional peers of bench train / bench precond and of the peer tests (K-FAC of ASDL, Shampoo
	# and SOAP of pytorch-optimizer, SOAP and PSGD-Kron of heavyball, kron-torch's Kron); without
	# their deps: none of them may change torch (heavyball and kron-torch run without opt-einsum,
	# and kron-torch's triton is only used on CUDA)
	$(PY) -m pip install --quiet --no-deps asdfghjkl pytorch-optimizer heavyball==3.2.1 \
		kron-torch==0.3.3
	touch $@

# Rebuilt only when a source changes (ninja then recompiles only what changed).
build: $(MODULE_STAMP)
$(MODULE_STAMP): $(VENV)/.installed $(SOURCES)
	$(PY) setup.py build_ext --inplace

# The CMake check and three passes of the suite, each run to its end whatever the others did; then
# a line per pass (time, result, pytest's summary), and failure if any failed (.ci/test-passes).
#  1. the compiled kernels;
#  2. the CUDA sources, run on the CPU by the emulation of tests/cuda_emu, in place of the CPU
#     kernels: every test's oracle checks them too;
#  3. the pure-PyTorch fallback (what `import soo_ext` runs without the compiled module).
test: build
	@bash .ci/test-passes \
	  "cmake check|$(MAKE) --no-print-directory cmake-check" \
	  "compiled kernels|SOO_EXT_REQUIRE_EXT=1 $(PYTEST) tests" \
	  "emulated CUDA|SOO_EXT_REQUIRE_EXT=1 $(PYTEST) --cuda-emu-as-cpu tests $(FIRST_PASS_ONLY) \
	    --ignore=tests/ops/test_cuda_emu.py" \
	  "fallback|SOO_EXT_DISABLE_EXT=1 $(PYTEST) tests $(FIRST_PASS_ONLY)"

# The first pass on torch's baseline CPU kernels (ATEN_CPU_CAPABILITY=default: no AVX) and
# soo_ext's (SOO_EXT_CPU_BASELINE=1), as on a CPU without AVX2: a test that holds on one code path
# only fails here.  ISA=avx2 (or avx512) picks torch's kernels for that instruction set instead.
ISA ?= default
test-isa: build
	ATEN_CPU_CAPABILITY=$(ISA) $(if $(filter default,$(ISA)),SOO_EXT_CPU_BASELINE=1) \
	  SOO_EXT_REQUIRE_EXT=1 $(PYTEST) tests

demo: build
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m bench demo

bench: build
	SOO_EXT_REQUIRE_EXT=1 $(PY) -m bench micro --json bench/results/micro-cpu.json

# A wheel for the CUDA targets in CUDA_ARCHS, checked to really contain their device code.
wheel: $(VENV)/.installed
	rm -rf dist
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	$(PY) tests/cuda_archs.py dist/*.whl "$(CUDA_ARCHS)"

# CMakeLists.txt must keep building the same module: configure and build it, load it, run its ops
# (tests/cmake_build.py).  CPU kernels only unless SOO_EXT_CUDA=1 (`make cmake-check
# SOO_EXT_CUDA=1`: the CUDA kernels too, for CUDA_ARCHS: many minutes); the CUDA part of
# CMakeLists.txt is configured in both cases.
cmake-check: $(VENV)/.installed
	$(PY) tests/cmake_build.py build-cmake

clean:
	rm -rf build build-cmake dist soo_ext/_C*.so $(MODULE_STAMP) *.egg-info
