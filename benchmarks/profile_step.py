r"""Op-level time breakdown of one compiled benchmark train step on XLA CPU.

  python -m benchmarks.profile_step --torch --json=/tmp/prof.json  # rm_step_hh_padded, batch 1: ~1.5 min
  python -m benchmarks.profile_step --case=dpo_step_hh_cached --batch=5

Compiles the case's jitted step (``benchmarks.steps``) for one workload batch
(batch 1 = the first timed batch of ``benchmarks.run``), times untraced calls,
traces ``--traced`` more with ``jax.profiler`` and reads each HLO op's duration
from the trace. Ops are grouped from the optimized HLO's Python stack frames:
attention forward/backward (``prefjax/models/attention.py``), projection/MLP
matmuls (forward, input gradient dX, weight gradient dW = a backward dot
contracting over the batch rows), elementwise/norm fusions, ops that only move
data, the embedding gather/scatter, the optimizer (optax, grad norm, skip logic).
Dot FLOPs come from HLO shapes, set against the f32 ``jnp.dot`` ceiling; other
groups' operand+output bytes against a jitted ``x + 1``'s bandwidth. Every
instant of the traced call's op span goes to one op (``hlo_ops.op_times``:
overlaps are split, the gaps of asynchronous dots go to the awaited op). The ops
of a conditional's branch that ran (the tiled attention's skippable tiles, the
log-prob head, the NaN guard's update) are rows of their own, with the FLOPs they
ran; ``busy`` is the part covered by op events. ``--torch`` adds ``torch_rm_step_hh`` on the
padded batch of the same index, the same pairs for the ``*_padded`` cases
(``torch.profiler``, aten ops' self CPU time). Expect ~1.5 min.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import hlo_ops
from benchmarks import run as run_lib


def copy_bandwidth(mib: int = 64) -> float:
  """Bytes/s (read + write) of a jitted ``x + 1`` over ``mib`` MiB of float32."""
  import jax
  import jax.numpy as jnp
  x, f = jnp.zeros((mib * 2 ** 18,), jnp.float32), jax.jit(lambda a: a + 1)
  return 2 * x.nbytes / min(_timed(lambda: f(x))[1] for _ in range(10))


def _timed(fn) -> tuple[Any, float]:
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def profile(case: str, batch_index: int, repeats: int, traced: int) -> dict[str, Any]:
  """Compiles, times and traces ``case``'s step on workload batch ``batch_index``."""
  import jax
  from benchmarks import run, steps, workloads
  spec = run.CASES[case]
  batch = workloads.layout_batches(spec["layout"], batch_index + 1)[batch_index]
  if "cached" in spec["kind"]:
    batch = steps.with_cached_reference(batch)
  _, info = run._builder(spec["kind"], run.NUM_SEGMENTS.get(spec["layout"]), spec.get("decoder"))
  if "train_step" not in info:
    raise SystemExit(f"case {case!r} has no jitted train step to profile")
  state = info["state"]()
  compiled, compile_s = _timed(lambda: info["train_step"].lower(state, batch).compile())
  hlo = hlo_ops.parse_hlo(compiled.as_text())
  walls = []
  for _ in range(repeats + 1):  # the first call is a warm-up
    (state, _), seconds = _timed(lambda: compiled(state, batch))
    walls.append(seconds)
  totals: dict[str, float] = collections.defaultdict(float)
  flops: dict[str, float] = collections.defaultdict(float)
  busy = traced_wall = span = 0.0
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  for _ in range(traced):
    with tempfile.TemporaryDirectory() as log_dir:
      with jax.profiler.trace(log_dir, profiler_options=options):
        (state, _), seconds = _timed(lambda: compiled(state, batch))
      events = hlo_ops.run_events(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)[0], hlo)
      times, op_busy, op_span = hlo_ops.op_times(events, hlo)
      for name, op_flops in hlo_ops.executed_flops(events, hlo).items():
        flops[name] += op_flops / traced
    traced_wall, busy = traced_wall + seconds / traced, busy + op_busy / traced
    span += op_span / traced
    for name, op_seconds in times.items():
      totals[name] += op_seconds / traced
  rows = (batch["tokens"].shape[0], int(np.prod(batch["tokens"].shape)))
  ops = []
  for name in totals:  # entry ops, and the ops of conditionals' branches that ran
    op = hlo["ops"][name]
    moved = 0 if hlo_ops.runs_computations(op) else sum(  # a branch's ops count their own
        hlo_ops.nbytes(hlo["ops"][o]["type"]) for o in [name] + op["operands"])
    ops.append(dict(name=name, group=hlo_ops.classify(hlo, op, rows), seconds=totals[name],
                    flops=flops[name], bytes=moved,
                    source=hlo_ops.source(op), within=hlo_ops.top_level(hlo, name)))
  return dict(case=case, batch=batch_index, shape=list(batch["tokens"].shape),
              real_tokens=int(np.count_nonzero(run.real_slots(batch))),
              compile_s=round(compile_s, 1),
              wall_s=statistics.median(walls[1:]), walls=[round(w, 3) for w in walls[1:]],
              traced_wall_s=traced_wall, busy_s=busy, span_s=span, ops=ops)


def torch_profile(batch_index: int, repeats: int) -> dict[str, Any]:
  """``torch_rm_step_hh`` on the same batch: median s/step and its top aten ops' self CPU s."""
  import torch
  from benchmarks import steps, workloads
  batch = list(workloads.pair_batches("longest", batch_index + 1))[batch_index]
  step, _ = steps.torch_rm()
  walls = [_timed(lambda: step(batch))[1] for _ in range(repeats + 1)][1:]
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    step(batch)
  ops = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()),
               key=lambda kv: -kv[1])
  return {"s_per_step": statistics.median(walls), "top_ops": ops[:12]}


def summarize(ops: list[dict], ceiling: float, bandwidth: float) -> list[dict[str, Any]]:
  """One row per group (and a total): seconds, share, GFLOP, rates and the time at ceiling."""
  total = sum(o["seconds"] for o in ops)
  rows = []
  for group in hlo_ops.GROUPS + ("total",):
    members = [o for o in ops if group in (o["group"], "total")]
    seconds, flops = sum(o["seconds"] for o in members), sum(o["flops"] for o in members)
    moved = sum(o["bytes"] for o in members if not o["flops"])
    rows.append(dict(group=group, ops=len(members), seconds=seconds, share=seconds / total,
                     gflop=flops / 1e9, gflop_s=flops / max(seconds, 1e-12) / 1e9,
                     gb_s=moved / max(seconds, 1e-12) / 1e9,
                     ceiling_s=flops / ceiling + moved / bandwidth))
  return rows


def table(rows: list[dict[str, Any]], ceiling: float, bandwidth: float) -> str:
  lines = [f"| group | ops | s | share | GFLOP | GFLOP/s | of {ceiling / 1e9:.0f} GFLOP/s | "
           f"GB/s (copy: {bandwidth / 1e9:.0f}) | s at ceiling |", "|---|" + "---:|" * 8]
  for r in rows:
    mfu = f"{100 * r['gflop_s'] * 1e9 / ceiling:.0f}%" if r["gflop"] > 0.01 else ""
    lines.append(f"| {r['group']} | {r['ops']} | {r['seconds']:.3f} | {100 * r['share']:.0f}% | "
                 f"{r['gflop']:.1f} | {r['gflop_s']:.0f} | {mfu} | {r['gb_s']:.1f} | "
                 f"{r['ceiling_s']:.3f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", default="rm_step_hh_padded",
                      help="a train-step case of benchmarks.run (--torch: a padded one)")
  parser.add_argument("--batch", type=int, default=1, help="workload batch index")
  parser.add_argument("--repeats", type=int, default=3, help="untraced timed calls")
  parser.add_argument("--traced", type=int, default=2, help="traced calls (op times averaged)")
  parser.add_argument("--top", type=int, default=15, help="slowest ops to list")
  parser.add_argument("--torch", action="store_true",
                      help="also profile torch_rm_step_hh on the same batch (torch.profiler)")
  parser.add_argument("--json", default="", help="write the result here")
  args = parser.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  from prefjax import xla_cpu
  xla_cpu.apply_cpu_defaults()
  from benchmarks import run  # imports no JAX: safe before the restart
  if run.runs_as_train_binary(args.case):
    xla_cpu.apply_malloc_defaults({"benchmarks.profile_step"})
  from benchmarks import steps
  ceiling, bandwidth = steps.matmul_ceiling(), copy_bandwidth()
  result = profile(args.case, args.batch, args.repeats, args.traced)
  rows = summarize(result["ops"], ceiling, bandwidth)
  print(f"{result['case']} batch {result['batch']} {result['shape']} "
        f"({result['real_tokens']} real tokens): {result['wall_s']:.2f} s/step untraced "
        f"{result['walls']}, traced {result['traced_wall_s']:.2f} s (ops span "
        f"{result['span_s']:.2f} s, busy {result['busy_s']:.2f} s), compile {result['compile_s']} s; load average "
        f"{os.getloadavg()[0]:.2f}")
  print(table(rows, ceiling, bandwidth))
  print(f"\nslowest {args.top} ops:")
  for o in sorted(result["ops"], key=lambda o: -o["seconds"])[:args.top]:
    rate = f"{o['flops'] / o['seconds'] / 1e9:.0f} GFLOP/s" if o["flops"] else \
        f"{o['bytes'] / o['seconds'] / 1e9:.1f} GB/s"
    name = o["name"] if o["within"] == o["name"] else f"{o['name']} in {o['within']}"
    print(f"  {o['seconds'] * 1e3:7.1f} ms  {o['group']:16s} {name:32s} {rate:>14s}  "
          f"{o['source']}")
  if args.torch:
    result["torch"] = torch_profile(args.batch, args.repeats)
    print(f"\ntorch_rm_step_hh, same batch: {result['torch']['s_per_step']:.2f} s/step; top ops "
          "(self CPU s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["torch"]["top_ops"]))
  run_lib.write_json(args.json, {**result, "groups": rows, "matmul_ceiling_gflop_s": ceiling / 1e9,
                                 "copy_gb_s": bandwidth / 1e9, "load_average": os.getloadavg()})


if __name__ == "__main__":
  main()
