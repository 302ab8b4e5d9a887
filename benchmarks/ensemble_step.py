r"""K reward models trained in one step against K one-model steps, across model widths.

  python -m benchmarks.ensemble_step --json=/tmp/ensemble.json      # widths 64-512, ~10 min here
  python -m benchmarks.ensemble_step --hidden=512 --forwards=vmap   # one width, one forward
  python -m benchmarks.ensemble_step --data=synthetic --length=256 --max_pairs=3   # smaller steps

Issue G asks that a 4-member deep ensemble trained in one step be ≥ 1.5× faster than 4
one-model steps. ``benchmarks.run`` measures that on the HH workload's 23.47M RM
(``vs_4_sequential``); this script measures where it holds, as the model narrows. Each
width is the workload's Llama (6 layers, head dim 64, MLP 2.75 × hidden, vocabulary
8,192: ``workloads.rm_model_config``) at ``--hidden``. For each width it builds the
one-model step (``steps.prefjax_rm``) and a ``--members``-member ``DeepEnsemble`` step
per ``--forwards`` entry (``steps.prefjax_rm_ensemble``: one vmapped program, or the
members one after another), compiles each on the first batch, then times them
interleaved: ``--rounds`` rounds, each running every variant over the same
``--steps`` batches, so a drifting machine slows all of them alike. Batches are
``rm_step_hh``'s (``--data=hh``: HH pairs packed prompt-shared into 2 rows of 1,024,
the first ``1 + --steps`` of ``workloads.pair_batches``), or, where the HH file is
absent (the GPU check), the same layout built by the real pipeline from
``scale_rm_step``'s synthetic pairs (``--data=synthetic``, shaped by ``--rows``,
``--length`` and ``--max_pairs``; they are longer than HH's, so a step holds fewer pairs).

Reported per variant: median s/step, real tokens/s, compile s, and for each ensemble
``vs_sequential``: K × the one-model step's median time over the ensemble step's, i.e.
how much faster one K-member step is than K one-model steps on the same batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

ONE = "one"


def vs_sequential(members: int, one_s: float, ensemble_s: float) -> float:
  """How much faster one ``members``-member step is than ``members`` one-model steps."""
  if one_s <= 0 or ensemble_s <= 0:
    raise ValueError(f"step times must be positive, got {one_s} and {ensemble_s}")
  return members * one_s / ensemble_s


def model_config(hidden: int, num_layers: int | None = None) -> Any:
  """The workload's Llama at width ``hidden``: head dim 64, MLP 2.75 × hidden."""
  from benchmarks import workloads
  if hidden < 64 or hidden % 64:
    raise ValueError(f"--hidden must be a positive multiple of 64 (head dim), got {hidden}")
  heads = hidden // 64
  return workloads.rm_model_config(hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                                   intermediate_size=round(2.75 * hidden) // 8 * 8,
                                   num_layers=num_layers)


def data_batches(data: str, count: int, rows: int | None = None, length: int | None = None,
                 max_pairs: int | None = None) -> tuple[list[dict], int]:
  """``count`` packed shared-prompt batches and their static segment count: ``rm_step_hh``'s
  (``data="hh"``) or ``rows x length`` rows of up to ``max_pairs`` synthetic pairs."""
  from benchmarks import run as run_lib
  from benchmarks import scale_rm_step
  from benchmarks import workloads
  if data == "hh":
    return list(workloads.pair_batches("shared", count)), run_lib.NUM_SEGMENTS["shared"]
  max_pairs = max_pairs or 8
  return scale_rm_step.pair_batches(count, rows=rows or 2, length=length or 1024,
                                    vocab_size=workloads.VOCAB, max_pairs=max_pairs), 3 * max_pairs


def build_variants(config: Any, members: int, forwards: list[str], num_segments: int,
                   dtype: Any) -> dict[str, tuple[Callable, dict]]:
  from benchmarks import steps
  variants = {ONE: steps.prefjax_rm(num_segments, config=config, dtype=dtype)}
  for forward in forwards:
    variants[forward] = steps.prefjax_rm_ensemble(members, num_segments, config=config,
                                                  forward=forward, dtype=dtype)
  return variants


def time_interleaved(variants: dict[str, tuple[Callable, dict]], batches: list[dict],
                     rounds: int) -> dict[str, list[float]]:
  """Per variant, the time of every step over ``rounds`` passes of ``batches``,
  variants taking turns pass by pass."""
  times: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (step, _) in variants.items():
      for batch in batches:
        start = time.perf_counter()
        step(batch)
        times[name].append(time.perf_counter() - start)
  return times


def run_width(hidden: int, *, members: int, forwards: list[str], batches: list[dict],
              rounds: int, num_segments: int, dtype: Any,
              num_layers: int | None = None) -> list[dict[str, Any]]:
  """Rows for one width: the one-model step, then each ensemble forward."""
  from benchmarks import run as run_lib
  config = model_config(hidden, num_layers)
  compile_s, variants = {}, {}
  for name, built in build_variants(config, members, forwards, num_segments, dtype).items():
    with run_lib.CompileClock() as clock:
      built[0](batches[-1])  # the warm-up batch; the others are timed (benchmarks.run)
    compile_s[name], variants[name] = clock.seconds, built
  times = time_interleaved(variants, batches[:-1], rounds)
  real = [run_lib.pair_tokens(b) for b in batches[:-1]] * rounds
  one_s = statistics.median(times[ONE])
  rows = []
  for name, (_, info) in variants.items():
    s = statistics.median(times[name])
    rows.append({
        "case": f"rm_step_h{hidden}" if name == ONE else f"rm_ensemble{members}_{name}_h{hidden}",
        "hidden": hidden, "num_layers": config.num_layers, "params": info["params"],
        "members": 1 if name == ONE else members, "forward": None if name == ONE else name,
        "s_per_step": round(s, 4), "step_times": [round(t, 4) for t in times[name]],
        "real_tokens_per_s": round(run_lib.total_rate(real, times[name]), 1),
        "compile_s": round(compile_s[name], 2),
        "vs_sequential": None if name == ONE else round(vs_sequential(members, one_s, s), 3)})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  lines = ["| case | params | s/step | real tok/s | compile s | vs K one-model steps |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    ratio = f"{r['vs_sequential']:.2f}×" if r["vs_sequential"] is not None else ""
    lines.append(f"| {r['case']} | {r['params'] / 1e6:.2f}M | {r['s_per_step']:.4f} | "
                 f"{r['real_tokens_per_s']:.0f} | {r['compile_s']:.1f} | {ratio} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hidden", default="64,128,256,512", help="comma-separated widths")
  parser.add_argument("--num_layers", type=int, default=None, help="override the depth (6)")
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument("--forwards", default="vmap,unrolled",
                      help="comma-separated DeepEnsemble forwards: vmap, unrolled, auto")
  parser.add_argument("--data", default="hh", choices=["hh", "synthetic"],
                      help="rm_step_hh's batches (needs the HH file) or synthetic pairs")
  parser.add_argument("--rows", type=int, default=None, help="synthetic: packed rows (2)")
  parser.add_argument("--length", type=int, default=None, help="synthetic: row length (1024)")
  parser.add_argument("--max_pairs", type=int, default=None, help="synthetic: pair slots (8)")
  parser.add_argument("--steps", type=int, default=6, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved passes over them")
  parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                      help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from benchmarks import run as run_lib
  from prefjax.models import decoder as dec
  from prefjax.models import heads
  forwards = [f for f in args.forwards.split(",") if f]
  unknown = sorted(set(forwards) - set(heads.DeepEnsemble.FORWARDS))
  if unknown or args.members < 2:
    parser.error(f"--forwards must be among {heads.DeepEnsemble.FORWARDS} (got {unknown}) "
                 f"and --members >= 2 (got {args.members})")
  shape = (args.rows, args.length, args.max_pairs)
  if args.data == "hh" and shape != (None, None, None):
    parser.error("--rows, --length and --max_pairs shape synthetic batches (--data=synthetic); "
                 "--data=hh runs rm_step_hh's own")
  dtype = jnp.dtype(args.dtype) if args.dtype else jnp.dtype(dec.default_compute_dtype())
  if args.data == "hh":  # whole packing windows, as benchmarks.run times them
    from benchmarks import workloads
    args.steps = workloads.whole_windows("shared", args.steps)
  batches, num_segments = data_batches(args.data, args.steps + 1, *shape)
  num_rows, length = batches[0]["tokens"].shape
  device = jax.devices()[0].device_kind
  print(f"{device} ({jax.default_backend()}), {dtype.name}, {args.data} batches "
        f"[{num_rows}, {length}], {args.members} members, {args.rounds} rounds x {args.steps} steps",
        flush=True)
  rows = []
  for hidden in (int(h) for h in args.hidden.split(",")):
    width_rows = run_width(hidden, members=args.members, forwards=forwards, batches=batches,
                           rounds=args.rounds, num_segments=num_segments, dtype=dtype,
                           num_layers=args.num_layers)
    for r in width_rows:
      r.update(device=device, backend=jax.default_backend(), dtype=dtype.name, data=args.data,
               rows=num_rows, length=length, **run_lib.process_settings())
    print(table(width_rows), flush=True)
    rows += width_rows
  run_lib.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
