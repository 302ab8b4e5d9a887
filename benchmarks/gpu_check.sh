#!/usr/bin/env bash
# One prepared GPU check (device machine; its own jax/flax, nothing installed from the network).
# Usage on the device: OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes one JSON per benchmark into $OUT and prints each table.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
run() { name=$1; shift; timeout 300 python3 -m benchmarks.model_throughput "$@" --repeats=3 --out="$OUT/$name.json" 2>&1 | grep -v Warning; }
run bf16_b8_t256 --model=random:smollm2_135m --dtype=bfloat16 --batch=8 --length=256 --gen_batch=8 --new_tokens=64
run bf16_b32_t1024 --model=random:smollm2_135m --dtype=bfloat16 --batch=32 --length=1024 --skip_generate
run f32_b8_t256 --model=random:smollm2_135m --dtype=float32 --batch=8 --length=256 --skip_generate
