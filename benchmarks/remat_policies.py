r"""What each remat policy costs and saves, with the blocks unrolled and scanned.

  python -m benchmarks.remat_policies --json=/tmp/remat.json      # HH, 32 pairs a step, ~8 min here
  python -m benchmarks.remat_policies --policies=none,full --layouts=scan --pairs=64
  python -m benchmarks.remat_policies --data=synthetic --rows=8 --length=2048 --max_pairs=32

``Decoder.remat`` chooses what a block keeps for the backward pass
(``stack.REMAT_POLICIES``: ``full`` keeps only its input, ``attention`` also the
attention kernel's output and log-sum-exp, ``dots`` also every projection's output);
``none`` keeps everything. For each policy and each ``--layouts`` entry (``unrolled``
blocks, or ``scan``: ``Decoder.scan_layers``) this builds the RM step of the HH
workload's 23.47M Llama (``--hidden``/``--num_layers`` resize it), compiles it on the
first batch and reads XLA's memory analysis of the compiled step: ``temp_mb``, the
step's scratch memory (activations kept for the backward, gradients, optimizer
temporaries; the train state itself is ``argument_mb``). Then the variants take turns
over the same batches (``--rounds`` passes of ``--steps``), so a drifting machine slows
them alike. Batches: HH pairs packed prompt-shared into rows of 1,024 (``--data=hh``,
``--pairs`` per step, 4 per row), or, where the HH file is absent (the GPU check), the
same layout from ``scale_rm_step``'s synthetic pairs (``--data=synthetic``).

Reported per variant: temp and argument MB, compile s, median s/step, real tokens/s,
and ``vs_none``: its s/step over the same layout's ``none`` (the recomputation's price).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

LAYOUTS = ("unrolled", "scan")


def hh_batches(pairs: int, count: int) -> tuple[list[dict], int]:
  """``count`` batches of ``pairs`` HH pairs, shared-prompt packed into rows of 1,024 (4
  pairs a row, as ``rm_step_hh``'s 8 in 2), and their static segment count."""
  from benchmarks import workloads
  if pairs < 1:
    raise ValueError(f"--pairs must be >= 1, got {pairs}")
  batches = workloads.pair_batches("shared", count, batch_size=pairs)
  return list(batches), 3 * pairs


def build(policy: str, layout: str, config: Any, num_segments: int
          ) -> tuple[Callable, dict]:
  from benchmarks import steps
  return steps.prefjax_rm(num_segments, config=config, remat=policy,
                          scan_layers=layout == "scan")


def compiled_memory_mb(info: dict, batch: dict) -> tuple[float, float]:
  """XLA's ``(temp, argument)`` sizes in MB of the step compiled for ``batch``."""
  analysis = info["train_step"].lower(info["state"](), batch).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20, analysis.argument_size_in_bytes / 2**20


def sweep(policies: list[str], layouts: list[str], *, config: Any, batches: list[dict],
          num_segments: int, rounds: int) -> list[dict[str, Any]]:
  from benchmarks import ensemble_step
  from benchmarks import run as run_lib
  variants, rows = {}, {}
  for layout in layouts:
    for policy in policies:
      name = f"{policy}/{layout}"
      with run_lib.CompileClock() as clock:
        built = build(policy, layout, config, num_segments)
        built[0](batches[-1])  # the warm-up batch; the others are timed (benchmarks.run)
      temp, argument = compiled_memory_mb(built[1], batches[-1])
      variants[name] = built
      rows[name] = {"case": f"rm_remat_{policy}_{layout}", "policy": policy, "layout": layout,
                    "params": built[1]["params"], "temp_mb": round(temp, 1),
                    "argument_mb": round(argument, 1), "compile_s": round(clock.seconds, 2)}
      print(f"compiled {name}: {temp:,.0f} MB temp, {clock.seconds:.1f} s", flush=True)
  times = ensemble_step.time_interleaved(variants, batches[:-1], rounds)
  real = [run_lib.pair_tokens(b) for b in batches[:-1]] * rounds
  for name, row in rows.items():
    row.update(s_per_step=round(statistics.median(times[name]), 4),
               step_times=[round(t, 4) for t in times[name]],
               real_tokens_per_s=round(run_lib.total_rate(real, times[name]), 1))
  for row in rows.values():
    base = rows.get(f"none/{row['layout']}")
    row["vs_none"] = round(row["s_per_step"] / base["s_per_step"], 3) if base else None
  return list(rows.values())


def table(rows: list[dict[str, Any]]) -> str:
  lines = ["| policy | blocks | temp MB | argument MB | compile s | s/step | real tok/s | "
           "s/step vs none |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ratio = f"{r['vs_none']:.2f}×" if r["vs_none"] is not None else ""
    lines.append(f"| {r['policy']} | {r['layout']} | {r['temp_mb']:,.0f} | "
                 f"{r['argument_mb']:,.0f} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} | "
                 f"{r['real_tokens_per_s']:,.0f} | {ratio} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  from prefjax.models import stack
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--policies", default=",".join(["none", *stack.REMAT_POLICIES]),
                      help="comma-separated: none and stack.REMAT_POLICIES names")
  parser.add_argument("--layouts", default=",".join(LAYOUTS), help="unrolled, scan or both")
  parser.add_argument("--hidden", type=int, default=512, help="model width (head dim 64)")
  parser.add_argument("--num_layers", type=int, default=None, help="override the depth (6)")
  parser.add_argument("--data", default="hh", choices=["hh", "synthetic"])
  parser.add_argument("--pairs", type=int, default=32, help="hh: pairs per step (4 per row)")
  parser.add_argument("--rows", type=int, default=None, help="synthetic: packed rows (2)")
  parser.add_argument("--length", type=int, default=None, help="synthetic: row length (1024)")
  parser.add_argument("--max_pairs", type=int, default=None, help="synthetic: pair slots (8)")
  parser.add_argument("--steps", type=int, default=2, help="timed batches per round")
  parser.add_argument("--rounds", type=int, default=2, help="interleaved passes over them")
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args(argv)
  policies = [p for p in args.policies.split(",") if p]
  layouts = [layout for layout in args.layouts.split(",") if layout]
  unknown = sorted(set(policies) - {"none", *stack.REMAT_POLICIES}) + sorted(
      set(layouts) - set(LAYOUTS))
  if unknown or not policies or not layouts:
    parser.error(f"--policies must be among none, {', '.join(stack.REMAT_POLICIES)} and "
                 f"--layouts among {', '.join(LAYOUTS)}; got {unknown or 'none'}")
  import jax
  from benchmarks import ensemble_step
  from benchmarks import run as run_lib
  config = ensemble_step.model_config(args.hidden, args.num_layers)
  if args.data == "hh":
    from benchmarks import workloads
    args.steps = workloads.whole_windows("shared", args.steps)  # as benchmarks.run times it
    batches, num_segments = hh_batches(args.pairs, args.steps + 1)
  else:
    batches, num_segments = ensemble_step.data_batches(
        "synthetic", args.steps + 1, args.rows, args.length, args.max_pairs)
  num_rows, length = batches[0]["tokens"].shape
  device = jax.devices()[0].device_kind
  print(f"{device} ({jax.default_backend()}), {args.data} batches [{num_rows}, {length}], "
        f"{args.rounds} rounds x {args.steps} steps", flush=True)
  rows = sweep(policies, layouts, config=config, batches=batches, num_segments=num_segments,
               rounds=args.rounds)
  for r in rows:
    r.update(device=device, backend=jax.default_backend(), data=args.data, rows=num_rows,
             length=length, hidden=args.hidden, num_layers=config.num_layers,
             **run_lib.process_settings())
  print(table(rows), flush=True)
  run_lib.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
