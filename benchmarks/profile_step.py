r"""Op-level time breakdown of one compiled benchmark train step (XLA CPU).

  python -m benchmarks.profile_step                    # rm_step_hh, batch 1 (16 x 320): ~2 min
  python -m benchmarks.profile_step --case=dpo_step_hh_cached --batch=5 --json=/tmp/prof.json

Compiles the case's jitted train step (``benchmarks.steps``) for one workload
batch (``benchmarks.workloads``; batch 1 is the first timed batch of
``benchmarks.run``), times ``--repeats`` untraced calls, then traces
``--traced`` calls with ``jax.profiler`` and reads every executed HLO op's
duration from the trace (``jax.profiler.ProfileData``, no TensorBoard needed).
Each op of the optimized HLO (``compiled.as_text()``) is grouped by what it
computes, from its JAX metadata: attention forward / backward (ops whose source is
``prefjax/models/attention.py``; backward = under ``transpose(...)``), the
projection and MLP matmuls (forward, input gradient dX, weight gradient dW: a
backward dot contracting over the token rows), elementwise/norm fusions,
transposes/copies (ops that only move data), the optimizer update (optax and
``prefjax/train``) and the rest. Dot FLOPs come from the HLO shapes; each group's
achieved GFLOP/s is set against the machine's f32 ``jnp.dot`` ceiling and its
bytes (operands + outputs) against a measured elementwise-copy bandwidth.

Op durations are summed over the two CPU threads that run XLA thunks, so the
sum can exceed the wall time when ops overlap; ``busy`` is the union of op
intervals, the rest of the wall time is dispatch and waiting.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any

import numpy as np

GROUPS = ("attention fwd", "attention bwd", "matmul fwd", "matmul dX", "matmul dW",
          "elementwise/norm", "transpose/copy", "embedding", "optimizer", "other")
MOVES = {"parameter", "bitcast", "copy", "transpose", "slice", "concatenate", "reshape",
         "dynamic-slice", "dynamic-update-slice", "pad", "broadcast", "constant", "tuple",
         "get-tuple-element", "iota"}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in s.split(",") if d)) for t, s in _ARRAY.findall(text)]


def _nbytes(type_text: str) -> int:
  return sum(_BYTES.get(t, 4) * int(np.prod(s)) for t, s in _dims(type_text))


def _attr(rest: str, key: str) -> str:
  m = re.search(key + r'=(?:"([^"]*)"|\{([^}]*)\}|%?([\w.\-]+))', rest)
  return next((g for g in m.groups() if g is not None), "") if m else ""


def _stack_frames(lines: list[str]) -> dict[int, list[tuple[str, str, int]]]:
  """Stack frame id -> ``(file, function, line)`` from the innermost frame outwards."""
  tables: dict[str, dict[int, str]] = {}
  table = None
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = tables.setdefault(line, {})
    elif not line.strip() or table is None:
      table = None
    else:
      key, value = line.split(" ", 1)
      table[int(key)] = value.strip('"')
  fields = lambda v: {k: int(n) for k, n in re.findall(r"(\w+)=(\d+)", v)}
  locations = {}
  for key, value in tables.get("FileLocations", {}).items():
    f = fields(value)
    locations[key] = (tables["FileNames"][f["file_name_id"]],
                      tables["FunctionNames"][f["function_name_id"]], f["line"])
  parents = {k: fields(v) for k, v in tables.get("StackFrames", {}).items()}
  chains: dict[int, list[tuple[str, str, int]]] = {}
  for frame in parents:
    chain, current = [], frame
    while current in parents and len(chain) < 64:  # printed parent ids are one past the parent's
      chain.append(locations[parents[current]["file_location_id"]])
      parent = parents[current]["parent_frame_id"] - 1
      current = parent if parent != current else 0
    chains[frame] = chain
  return chains


def parse_hlo(text: str) -> dict[str, Any]:
  """``{"entry": [op names], "computations": {name: [ops]}, "ops": {name: op}}`` of HLO text.

  An op is a dict: name, type (its result type text), opcode, operands (names),
  calls (called computation), op_name, frames (its Python stack, innermost
  first) and, for dots, ``contract`` (contracted size) and ``flops``.
  """
  lines = text.splitlines()
  chains = _stack_frames(lines)
  computations: dict[str, list[dict]] = {}
  ops: dict[str, dict] = {}
  entry, current = "", None
  for line in lines:
    instr = _INSTR.match(line)
    if instr and current is not None:
      name, type_text, opcode, rest = instr.groups()
      frame = _attr(rest, "stack_frame_id")
      op = dict(name=name, type=type_text, opcode=opcode, op_name=_attr(rest, "op_name"),
                operands=re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0]),
                calls=_attr(rest, "calls").lstrip("%"),
                frames=chains.get(int(frame), []) if frame else [])
      if opcode == "dot":
        lhs = _dims(ops[op["operands"][0]]["type"])[0][1]
        contract = [int(d) for d in _attr(rest, "lhs_contracting_dims").split(",") if d]
        op["contract"] = int(np.prod([lhs[d] for d in contract]))
        op["flops"] = 2 * int(np.prod(_dims(type_text)[0][1])) * op["contract"]
      computations[current].append(op)
      ops[name] = op
    elif line.endswith("{") and (header := _HEADER.match(line)):
      current = header.group(1)
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      current = None
  users: dict[str, list[str]] = collections.defaultdict(list)
  for op in computations.get(entry, []):
    for operand in op["operands"]:
      users[operand].append(op["name"])
  return {"entry": [o["name"] for o in computations.get(entry, [])],
          "computations": computations, "ops": ops, "users": users}


def _inner(hlo: dict, op: dict) -> list[dict]:
  """The op itself and every op of the computations it calls (recursively)."""
  called = hlo["computations"].get(op["calls"], []) if op["calls"] else []
  return [op] + [i for o in called for i in _inner(hlo, o)]


def source(op: dict) -> str:
  """``file:line function`` of the op's innermost Python frame (site-packages paths cut)."""
  if not op["frames"]:
    return ""
  file, function, line = op["frames"][0]
  return f"{file.split('site-packages/')[-1].split('/work/')[-1]}:{line} {function}"


def classify(hlo: dict, op: dict, rows: tuple[int, ...]) -> str:
  """The group (``GROUPS``) of one top-level op.

  ``rows``: the batch's sequence and token counts (N, N·T); a backward dot that
  contracts over one of them is a weight gradient.
  """
  inner = own = _inner(hlo, op)
  opcodes = {o["opcode"] for o in own} - {"parameter", "fusion"}
  frames = [f for o in inner for f in o["frames"]]
  pending, seen = list(hlo["users"].get(op["name"], [])), set()
  while not frames and pending:  # XLA-made ops (split reductions, head products): a user's
    user = pending.pop(0)
    if user not in seen:
      seen.add(user)
      inner = inner + _inner(hlo, hlo["ops"][user])
      frames = [f for o in inner for f in o["frames"]]
      pending += hlo["users"].get(user, [])
  functions = {f[1] for f in frames}
  files = " ".join(f[0] for f in frames)
  op_names = " ".join(o["op_name"] for o in inner)
  under_loss = "_grads_one.<locals>.inner" in functions
  if opcodes & {"gather", "scatter"}:
    return "embedding"
  if opcodes <= MOVES:
    return "transpose/copy"
  if "models/attention.py" in files:
    forward = functions & {"_forward", "_attention_fwd"} or (
        "jvp(" in op_names and "transpose(" not in op_names)
    return "attention fwd" if forward else "attention bwd"
  dots = [o for o in own if o["opcode"] == "dot"]
  if dots:
    if under_loss and "transpose(" not in op_names:
      return "matmul fwd"
    return "matmul dW" if any(d["contract"] in rows for d in dots) else "matmul dX"
  if "/optax/" in files or (frames and not under_loss):
    return "optimizer"
  if frames:
    return "elementwise/norm"
  return "other"


def op_times(xplane: str, names: set[str]) -> tuple[dict[str, float], float]:
  """Summed seconds per HLO op name in a trace, and the union of their intervals (busy s)."""
  import jax
  data = jax.profiler.ProfileData.from_file(xplane)
  times: dict[str, float] = collections.defaultdict(float)
  intervals = []
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          times[event.name] += event.duration_ns / 1e9
          intervals.append((event.start_ns, event.start_ns + event.duration_ns))
  busy, end = 0.0, -1.0
  for a, b in sorted(intervals):
    busy += max(0.0, b - max(a, end)) / 1e9
    end = max(end, b)
  return dict(times), busy


def copy_bandwidth(mib: int = 64) -> float:
  """Bytes/s of a jitted ``x + 1`` over a ``mib`` MiB float32 array (read + write)."""
  import jax
  import jax.numpy as jnp
  x = jnp.zeros((mib * 2 ** 18,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    start = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / float(np.median(times))


def profile(case: str, batch_index: int, repeats: int, traced: int) -> dict[str, Any]:
  import jax
  from benchmarks import run, steps
  from benchmarks import workloads
  spec = run.CASES[case]
  batch = list(workloads.pair_batches(spec["layout"], batch_index + 1))[batch_index]
  if "cached" in spec["kind"]:
    batch = steps.with_cached_reference(batch)
  num_segments = 16 if spec["layout"] == "packed" else None
  _, info = run._builder(spec["kind"], num_segments)
  if "train_step" not in info:
    raise SystemExit(f"case {case!r} has no jitted train step to profile")
  state = info["state"]()
  start = time.perf_counter()
  compiled = info["train_step"].lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  hlo = parse_hlo(compiled.as_text())
  state, _ = compiled(state, batch)  # warm-up
  walls = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    walls.append(time.perf_counter() - start)
  names = set(hlo["entry"])
  totals: dict[str, float] = collections.defaultdict(float)
  busy = traced_wall = 0.0
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  for _ in range(traced):
    with tempfile.TemporaryDirectory() as log_dir:
      with jax.profiler.trace(log_dir, profiler_options=options):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        traced_wall += time.perf_counter() - start
      times, op_busy = op_times(glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)[0], names)
    busy += op_busy
    for name, seconds in times.items():
      totals[name] += seconds / traced
  rows = (batch["tokens"].shape[0], int(np.prod(batch["tokens"].shape)))
  ops = []
  for name in hlo["entry"]:
    op = hlo["ops"][name]
    if name not in totals:
      continue
    inner = _inner(hlo, op)
    ops.append(dict(name=name, group=classify(hlo, op, rows), seconds=totals[name],
                    flops=sum(o.get("flops", 0) for o in inner), source=source(op),
                    bytes=_nbytes(op["type"]) + sum(_nbytes(hlo["ops"][o]["type"])
                                                    for o in op["operands"] if o in hlo["ops"])))
  return dict(case=case, batch=batch_index, shape=list(batch["tokens"].shape),
              real_tokens=int(np.count_nonzero(batch.get("segment_ids", batch["attention_mask"]))),
              compile_s=round(compile_s, 1), wall_s=statistics.median(walls),
              walls=[round(w, 3) for w in walls], traced_wall_s=traced_wall / traced,
              busy_s=busy / traced, ops=ops,
              untraced_ops=len(names) - len(ops))


def summarize(result: dict[str, Any], ceiling: float, bandwidth: float) -> list[dict[str, Any]]:
  total = sum(o["seconds"] for o in result["ops"])
  rows = []
  for group in GROUPS:
    ops = [o for o in result["ops"] if o["group"] == group]
    seconds = sum(o["seconds"] for o in ops)
    flops = sum(o["flops"] for o in ops)
    moved = sum(o["bytes"] for o in ops)
    rows.append(dict(group=group, ops=len(ops), seconds=seconds, share=seconds / total,
                     gflop=flops / 1e9, gflop_s=flops / seconds / 1e9 if seconds else 0.0,
                     ceiling_s=flops / ceiling + (0 if flops else moved / bandwidth),
                     gb_s=moved / seconds / 1e9 if seconds else 0.0))
  return rows


def table(rows: list[dict[str, Any]], ceiling: float, bandwidth: float) -> str:
  lines = [f"| group | ops | s (summed) | share | GFLOP | GFLOP/s | % of {ceiling / 1e9:.0f} "
           f"GFLOP/s | GB/s (copy {bandwidth / 1e9:.0f}) | s at ceiling |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows + [dict(group="total", ops=sum(r["ops"] for r in rows),
                        seconds=sum(r["seconds"] for r in rows), share=1.0,
                        gflop=sum(r["gflop"] for r in rows),
                        gflop_s=sum(r["gflop"] for r in rows) / sum(r["seconds"] for r in rows),
                        gb_s=0.0, ceiling_s=sum(r["ceiling_s"] for r in rows))]:
    mfu = f"{100 * r['gflop_s'] * 1e9 / ceiling:.0f}%" if r["gflop"] > 0.01 else ""
    lines.append(f"| {r['group']} | {r['ops']} | {r['seconds']:.3f} | {100 * r['share']:.0f}% | "
                 f"{r['gflop']:.1f} | {r['gflop_s']:.0f} | {mfu} | "
                 f"{r['gb_s']:.1f} | {r['ceiling_s']:.3f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", default="rm_step_hh", help="a train-step case of benchmarks.run")
  parser.add_argument("--batch", type=int, default=1, help="workload batch index")
  parser.add_argument("--repeats", type=int, default=3, help="untraced timed calls")
  parser.add_argument("--traced", type=int, default=2, help="traced calls (op times averaged)")
  parser.add_argument("--top", type=int, default=15, help="slowest ops to list")
  parser.add_argument("--json", default="", help="write the result here")
  args = parser.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  from prefjax import xla_cpu
  xla_cpu.apply_cpu_defaults()
  from benchmarks import steps
  ceiling, bandwidth = steps.matmul_ceiling(), copy_bandwidth()
  result = profile(args.case, args.batch, args.repeats, args.traced)
  rows = summarize(result, ceiling, bandwidth)
  print(f"{result['case']} batch {result['batch']} {result['shape']} "
        f"({result['real_tokens']} real tokens): {result['wall_s']:.2f} s/step untraced "
        f"{result['walls']}, traced {result['traced_wall_s']:.2f} s, ops busy "
        f"{result['busy_s']:.2f} s, compile {result['compile_s']} s; load average "
        f"{os.getloadavg()[0]:.2f}; {result['untraced_ops']} entry ops not in the trace")
  print(table(rows, ceiling, bandwidth))
  print(f"\nslowest {args.top} ops:")
  for o in sorted(result["ops"], key=lambda o: -o["seconds"])[:args.top]:
    rate = f"{o['flops'] / o['seconds'] / 1e9:.0f} GFLOP/s" if o["flops"] else \
        f"{o['bytes'] / o['seconds'] / 1e9:.1f} GB/s"
    print(f"  {o['seconds'] * 1e3:7.1f} ms  {o['group']:16s} {o['name']:32s} {rate:>14s}  "
          f"{o['source']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**result, "groups": rows, "matmul_ceiling_gflop_s": ceiling / 1e9,
                 "copy_gb_s": bandwidth / 1e9, "load_average": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
  main()
