#!/usr/bin/env bash
# The one prepared GPU check (issue G): nothing is installed from the network.
#
# On the device:  OUT=/some/dir bash benchmarks/gpu_check.sh   (carry .whl; limits add to 10 min)
# Smoke run here: OUT=/tmp/gpu_check SMOKE=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh
#
# .whl holds the wheels the device image lacks (grain, array_record, ml_collections,
# portpicker for CPython 3.12; the download command is in README.md, "Speed").
# Steps, each with its own time limit, each writing JSON into $OUT:
#   1. the target: a Llama-3.2-1B-sized RM train step in bf16 (benchmarks/scale_rm_step.py),
#      blocks unrolled, then scanned (compile time against step time), then scanned with
#      remat="attention" (what recomputing all but the attention outputs costs per step);
#   2. the attention kernels' exactness tests on the GPU (f32 matmuls at full precision);
#   3. decoder forward and KV-cache generation throughput (SmolLM2-135M shapes);
#   4. a 4-member deep ensemble of the HH benchmark's 23.47M RM in one step, vmapped and
#      unrolled, against 4 one-model steps, on synthetic pairs (benchmarks/ensemble_step.py;
#      issue G's >= 1.5x).
set -u
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$OUT"
if [ -n "${SMOKE:-}" ]; then
  scale="--size=tiny --rows=2 --length=512 --max_pairs=6 --steps=2"
  model="--model=random:tiny_llama --batch=2 --length=64 --gen_batch=2 --new_tokens=8"
  tests="tests/test_attention.py::test_reach_is_the_earliest_key_a_real_query_of_each_block_sees"
  ensemble="--data=synthetic --hidden=64 --num_layers=1 --steps=1 --rounds=1 --length=256"
  ensemble="$ensemble --max_pairs=3"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  scale=""
  model="--model=random:smollm2_135m --dtype=bfloat16 --batch=8 --length=256"
  model="$model --gen_batch=8 --new_tokens=64"
  tests="tests/test_attention.py"
  ensemble="--data=synthetic --hidden=512 --steps=4 --rounds=2"
fi
$PY -c "import jax, flax, optax, grain, ml_collections
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" || exit 1
step() {  # "== name", then the command under timeout; a timeout or failure is said.
  local name=$1 rc; shift; echo "== $name"
  timeout "$@" 2>&1 | grep -v -i warning
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ]; then echo "!! $name: timed out after $1 s"; elif [ "$rc" != 0 ]; then
    echo "!! $name: exit $rc"; fi
}
scale_step="$PY -m benchmarks.scale_rm_step $scale"
step "1B RM step, unrolled" 180 $scale_step --json="$OUT/rm_step_1b.json"
step "1B RM step, scanned" 110 $scale_step --scan_layers --json="$OUT/rm_step_1b_scan.json"
step "1B RM step, scanned, remat=attention" 100 $scale_step --scan_layers --remat=attention \
  --json="$OUT/rm_step_1b_scan_remat.json"
step "attention tests" 90 env JAX_PLATFORMS= JAX_DEFAULT_MATMUL_PRECISION=highest \
  $PY -m pytest -q -p no:cacheprovider "$tests"
step "decoder throughput" 70 $PY -m benchmarks.model_throughput $model --repeats=3 \
  --out="$OUT/throughput.json"
step "ensemble of 4 in one step" 50 $PY -m benchmarks.ensemble_step $ensemble \
  --json="$OUT/ensemble.json"
