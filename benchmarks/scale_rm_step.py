r"""A reward-model train step at 1B scale: issue G's accelerator target (≥ 45% MFU in bf16).

  python -m benchmarks.scale_rm_step --json=/tmp/scale.json        # on a GPU (not yet timed)
  python -m benchmarks.scale_rm_step --size=tiny --rows=2 --length=256 --steps=2   # CPU smoke run

The model is a Llama of ``--size`` with a scalar reward head and random weights:
``llama32_1b`` has Llama-3.2-1B's sizes (1.24B parameters, 0.97B of them outside the
embedding: hidden 2048, 16 layers, 32 query and 8 key-value heads, MLP 8192, vocabulary
128,256, tied). Parameters and AdamW moments are float32; the forward computes in the
backend's default dtype (bfloat16 on accelerators, float32 on CPU) unless ``--dtype``
says otherwise. The step is the library's own, as in ``benchmarks.run``: the
Bradley–Terry loss of ``rm.loss.make_loss_fn`` under ``train.make_train_step``, jitted
with the state donated. Its batches come from the real pipeline
(``data.pipeline.preference_dataset``, packed, each pair one ``prompt | chosen |
rejected`` sequence, the layout of ``rm_step_hh``) over synthetic pairs: prompts of
32–599 and responses of 16–399 words drawn uniformly, one token per word
(``workloads.HashWordTokenizer``), packed into ``--rows`` x ``--length``; every step
reads new pairs, all of one shape.

Reported: compile s (JAX's tracing, lowering and compiling, ``run.CompileClock``) and
startup s (building and initialising the model too); median s/step over ``--steps``
timed steps after one warm-up; real tokens/s (each pair counted as two ``prompt +
response`` sequences, as in ``benchmarks.run``); padded-slot %; analytic TFLOP per step
(6·N·slots for the N matmul parameters outside the embedding, plus attention over the
(query, key) pairs the masks leave visible, forward + backward; the last block counted at
the pooled slots it runs on, ``run.pooled_counts``) beside XLA's cost
analysis of the compiled step; MFU against the card's dense bf16 peak (H100/H200 SXM 989
TFLOP/s; none for other dtypes or unknown cards) and against a ``jnp.dot`` ceiling
measured in the same run (8192² in the compute dtype on accelerators, 2048² on CPU);
peak device memory (peak RSS on CPU). The step is compiled ahead of time, once: a batch
of another shape would fail rather than recompile.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

SIZES: dict[str, dict[str, Any]] = {
    "llama32_1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, intermediate_size=8192,
                       rope_theta=500000.0, tie_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_position_embeddings=4096),
}
# Dense bf16 tensor-core peaks (vendor datasheets), matched against jax's device_kind in order.
BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12),
              ("A100", 312e12))
PROMPT_WORDS = (32, 600)  # [low, high) words; one token each, plus BOS before the prompt
RESPONSE_WORDS = (16, 400)


def synthetic_pairs(count: int, seed: int = 0) -> list[dict[str, str]]:
  """``count`` preference rows of random words, lengths uniform in the ranges above."""
  rng = np.random.default_rng(seed)
  text = lambda bounds: " ".join(f"w{i}" for i in rng.integers(0, 10 ** 6, rng.integers(*bounds)))
  return [{"prompt": text(PROMPT_WORDS), "chosen": text(RESPONSE_WORDS),
           "rejected": text(RESPONSE_WORDS)} for _ in range(count)]


def pair_batches(count: int, *, rows: int, length: int, vocab_size: int,
                 max_pairs: int) -> list[dict[str, np.ndarray]]:
  """``count`` packed shared-prompt batches of ``rows x length`` from the real pipeline."""
  from benchmarks import workloads
  from prefjax.data import pipeline as pipeline_lib
  config = pipeline_lib.PipelineConfig(
      batch_size=max_pairs, max_length=(length + 1) // 2, mode="packed",
      share_prompt=True, pack_length=length, pack_rows=rows,
      max_segments_per_row=3 * max_pairs, pack_window=4 * max_pairs, shuffle=False,
      num_epochs=1, seed=0, shard_index=0, shard_count=1)
  tokenizer = workloads.HashWordTokenizer(vocab_size=vocab_size)
  # Rows of L tokens take sequences of up to (L + 1) // 2 (prompt + one response); the
  # pipeline cuts longer ones (from 2,048 on, none are). Enough pairs for `count` batches:
  source = synthetic_pairs(count * max_pairs + 4 * max_pairs)
  iterator = iter(pipeline_lib.preference_dataset(source, tokenizer, config))
  return [next(iterator) for _ in range(count)]


def bf16_peak(device_kind: str) -> float | None:
  return next((peak for name, peak in BF16_PEAKS if name in device_kind), None)


def peak_memory_mb(device: Any) -> int:
  """Peak bytes the device's allocator held (accelerators), else this process's peak RSS."""
  from benchmarks import steps as steps_lib
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return round(stats["peak_bytes_in_use"] / 2 ** 20)
  return steps_lib.peak_rss_mb()


def time_steps(compiled: Any, state: Any, batches: list[dict[str, np.ndarray]]) -> list[float]:
  """Seconds of each step after the first (a warm-up), each until its update is done."""
  import jax
  times = []
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    state, loss = jax.block_until_ready((state, metrics["loss"]))
    loss = float(loss)
    if i:
      times.append(time.perf_counter() - start)
    if not np.isfinite(loss):
      raise RuntimeError(f"step {i}: non-finite loss {loss}")
  return times


def run(size: str, *, rows: int, length: int, max_pairs: int, steps: int,
        dtype: str | None, remat: bool | str, scan_layers: bool,
        num_layers: int | None = None) -> dict[str, Any]:
  """Builds, compiles and times the step; returns the result row."""
  import jax
  import jax.numpy as jnp
  from benchmarks import run as run_lib
  from benchmarks import steps as steps_lib
  from prefjax.models import decoder as dec
  device = jax.devices()[0]
  compute = jnp.dtype(dtype) if dtype else jnp.dtype(dec.default_compute_dtype())
  sizes = {**SIZES[size], **({"num_layers": num_layers} if num_layers else {})}
  config = dec.DecoderConfig.llama(**sizes, pad_id=0, bos_id=1, eos_id=2)
  batches = pair_batches(steps + 1, rows=rows, length=length, vocab_size=config.vocab_size,
                         max_pairs=max_pairs)
  start = time.perf_counter()
  with run_lib.CompileClock() as clock:
    _, info = steps_lib.prefjax_rm(3 * max_pairs, config=config, remat=remat,
                                   scan_layers=scan_layers, dtype=compute)
    state = info["state"]()
    compiled = info["train_step"].lower(state, batches[0]).compile()
  startup_s = time.perf_counter() - start
  times = time_steps(compiled, state, batches)
  timed = batches[1:]
  s_per_step = statistics.median(times)
  flops = [run_lib.analytic_flops(rows, length, lm_head=False, passes=1.0,
                                  attention_pairs=run_lib.visible_pairs(b), config=config,
                                  pooled=run_lib.pooled_counts(b)) for b in timed]
  real, computed, pairs = run_lib.per_step_counts(timed)
  on_accelerator = device.platform != "cpu"
  ceiling = steps_lib.matmul_ceiling(8192 if on_accelerator else 2048,
                                     dtype=compute if on_accelerator else jnp.float32)
  peak = bf16_peak(device.device_kind) if compute == jnp.bfloat16 else None
  achieved = run_lib.total_rate(flops, times)
  xla = steps_lib.xla_flops(compiled)
  return {
      "case": f"rm_step_scale_{size}" + (f"_{num_layers}layers" if num_layers else ""),
      "device": device.device_kind,
      "backend": jax.default_backend(), "jax": jax.__version__, "dtype": compute.name,
      "params": info["params"], "rows": rows, "length": length, "remat": remat,
      "scan_layers": scan_layers, "steps": len(times), "compile_s": round(clock.seconds, 1),
      "startup_s": round(startup_s, 1),
      "s_per_step": round(s_per_step, 4), "step_times": [round(t, 4) for t in times],
      "pairs_per_step": float(np.mean(pairs)),
      "real_tokens_per_s": round(run_lib.total_rate(real, times), 1),
      "padded_slot_pct": round(100 * (1 - np.mean(computed) / (rows * length)), 1),
      "analytic_tflop_per_step": round(float(np.mean(flops)) / 1e12, 5),
      "xla_tflop_per_step": round(xla / 1e12, 5) if xla else None,
      "achieved_tflop_s": round(achieved / 1e12, 4),
      "matmul_ceiling_tflop_s": round(ceiling / 1e12, 4),
      "mfu": round(achieved / ceiling, 3),
      "bf16_peak_tflop_s": peak and round(peak / 1e12, 1),
      "mfu_vs_peak": peak and round(achieved / peak, 3),
      "peak_memory_mb": peak_memory_mb(device),
  }


def table(r: dict[str, Any]) -> str:
  peak = f"{100 * r['mfu_vs_peak']:.1f}%" if r["mfu_vs_peak"] else "n/a"
  xla = f"{r['xla_tflop_per_step']:.4g}" if r["xla_tflop_per_step"] else "n/a"
  return "\n".join([
      f"{r['case']} on {r['device']} ({r['backend']}, jax {r['jax']}), {r['dtype']}, "
      f"{r['params'] / 1e6:,.1f}M params, [{r['rows']}, {r['length']}], "
      f"remat={r['remat']}, scan_layers={r['scan_layers']}",
      "| s/step | real tok/s | pairs/step | padded % | TFLOP/step (XLA) | TFLOP/s | "
      "MFU vs matmul ceiling | MFU vs bf16 peak | peak MB | compile s |",
      "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
      f"| {r['s_per_step']:.3f} | {r['real_tokens_per_s']:.0f} | {r['pairs_per_step']:.1f} | "
      f"{r['padded_slot_pct']:.0f} | {r['analytic_tflop_per_step']:.4g} ({xla}) | "
      f"{r['achieved_tflop_s']:.4g} | {100 * r['mfu']:.1f}% of {r['matmul_ceiling_tflop_s']:.4g} | "
      f"{peak} | {r['peak_memory_mb']} | {r['compile_s']:.0f} |"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  from benchmarks import run as run_lib
  from prefjax.models import stack
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="llama32_1b", choices=sorted(SIZES))
  parser.add_argument("--num_layers", type=int, default=None, help="override the size's depth")
  parser.add_argument("--rows", type=int, default=8, help="packed rows per step")
  parser.add_argument("--length", type=int, default=2048, help="tokens per packed row")
  parser.add_argument("--max_pairs", type=int, default=32, help="static pair slots per batch")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
  parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                      help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--remat", nargs="?", const="full", default="none",
                      choices=["none", *stack.REMAT_POLICIES],
                      help="recompute blocks in the backward: what each keeps "
                           "(stack.REMAT_POLICIES); --remat alone is 'full'")
  parser.add_argument("--scan_layers", action="store_true", help="one lax.scan over the blocks")
  parser.add_argument("--json", default="", help="write the row here")
  args = parser.parse_args(argv)
  row = run(args.size, rows=args.rows, length=args.length, max_pairs=args.max_pairs,
            steps=args.steps, dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers,
            num_layers=args.num_layers)
  print(table(row), flush=True)
  run_lib.write_json(args.json, row)
  return row


if __name__ == "__main__":
  main()
