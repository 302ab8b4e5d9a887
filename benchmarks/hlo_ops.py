"""Reading XLA CPU's artifacts: optimized HLO text (ops, FLOPs, Python stack frames) and traces.

``parse_hlo`` reads ``compiled.as_text()``; ``classify`` puts a top-level op into
one of ``GROUPS`` from its own and its fused ops' stack frames; ``run_events``
reads one call's op events from a ``jax.profiler`` trace, which ``op_times`` turns
into wall-clock seconds per op and ``executed_flops`` into the FLOPs that ran.
Used by ``benchmarks.profile_step``.
"""

from __future__ import annotations

import collections
import re
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
# Attributes naming the computations an op runs: a fusion's, a conditional's branches, a loop's.
_CALLED = ("calls", "branch_computations", "true_computation", "false_computation", "body",
           "condition")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _dims(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in s.split(",") if d)) for t, s in _ARRAY.findall(text)]


def nbytes(type_text: str) -> int:
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
  calls (the computations it runs: fused, branches, loop body), computation (the one
  holding it), op_name, frames (its Python stack, innermost first) and, for dots,
  ``contract`` (contracted size) and ``flops``. ``callers`` maps a called computation
  to the op that runs it.
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
                calls=[c.strip().lstrip("%") for key in _CALLED
                       for c in _attr(rest, key).split(",") if c.strip()],
                computation=current, frames=chains.get(int(frame), []) if frame else [])
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
  for op in ops.values():
    for operand in op["operands"]:
      users[operand].append(op["name"])
  return {"entry": [o["name"] for o in computations.get(entry, [])],
          "computations": computations, "ops": ops, "users": users,
          "callers": {c: op["name"] for op in ops.values() for c in op["calls"]}}


def inner(hlo: dict, op: dict) -> list[dict]:
  """The op itself and, for a fusion, every op it fuses (recursively). A conditional's
  or loop's ops are not included: they run as ops of their own, with their own events."""
  if runs_computations(op):
    return [op]
  called = [o for c in op["calls"] for o in hlo["computations"].get(c, [])]
  return [op] + [i for o in called for i in inner(hlo, o)]


def runs_computations(op: dict) -> bool:
  """A control-flow op (conditional, loop, call), whose called computations' ops run as
  ops of their own."""
  return bool(op["calls"]) and op["opcode"] != "fusion"


def top_level(hlo: dict, name: str) -> str:
  """The entry op that runs op ``name``: itself, or the conditional (loop, ...) whose
  called computations hold it, however deep."""
  while (computation := hlo["ops"][name]["computation"]) in hlo["callers"]:
    name = hlo["callers"][computation]
  return name


def executed_flops(events: list[tuple[int, int, str]], hlo: dict) -> dict[str, int]:
  """Dot FLOPs per op in one traced call, counted from its ``run_events``: the dots of a
  conditional's branch count when the branch ran, a loop's at every trip."""
  flops: dict[str, int] = collections.defaultdict(int)
  for _, _, name in events:
    flops[name] += sum(o.get("flops", 0) for o in inner(hlo, hlo["ops"][name]))
  return dict(flops)


def source(op: dict) -> str:
  """``file:line function`` of the op's innermost Python frame (site-packages paths cut)."""
  if not op["frames"]:
    return ""
  file, function, line = op["frames"][0]
  return f"{re.sub(r'^.*?site-packages/|^.*?/(?=prefjax/|benchmarks/)', '', file)}:{line} {function}"


def classify(hlo: dict, op: dict, rows: tuple[int, ...]) -> str:
  """The group (``GROUPS``) of one top-level op.

  ``rows``: the batch's sequence and token counts (N, N·T); a backward dot that
  contracts over one of them is a weight gradient.
  """
  context = own = inner(hlo, op)
  opcodes = {o["opcode"] for o in own} - {"parameter", "fusion"}
  frames = [f for o in context for f in o["frames"]]
  pending, seen = list(hlo["users"].get(op["name"], [])), set()
  while not frames and pending:  # XLA-made ops (split reductions, head products): a user's
    user = pending.pop(0)
    if user not in seen:
      seen.add(user)
      context = context + inner(hlo, hlo["ops"][user])
      frames = [f for o in context for f in o["frames"]]
      pending += hlo["users"].get(user, [])
  functions = {f[1] for f in frames}
  files = " ".join(f[0] for f in frames)
  op_names = " ".join(o["op_name"] for o in context)
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


def run_events(xplane: str, hlo: dict) -> list[tuple[int, int, str]]:
  """``(start_ns, end_ns, op)`` of the events of ``hlo``'s ops in one call, sorted.

  The call is the trace's run (XLA's ``run_id``) with the most such events, the latest
  on a tie: events of an earlier call still running when the trace began, or of another
  program whose op names collide (``fusion.3`` recurs across modules), are left out.
  """
  import jax
  runs: dict[Any, list[tuple[int, int, str]]] = collections.defaultdict(list)
  for plane in jax.profiler.ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      for e in line.events:
        if e.name in hlo["ops"]:
          run = dict(e.stats).get("run_id")
          runs[run].append((e.start_ns, e.start_ns + e.duration_ns, e.name))
  if not runs:
    raise ValueError(f"{xplane}: no events of the profiled program's ops")
  return sorted(max(runs.values(), key=lambda events: (len(events), max(events))))


def op_times(events: list[tuple[int, int, str]],
             hlo: dict) -> tuple[dict[str, float], float, float]:
  """Wall-clock seconds per op of one traced call (entry ops and the ops of the
  conditionals' branches that ran), the ops' busy time and their span.

  Every instant between the first and the last op event is split equally among
  the ops whose events cover it; a conditional's or loop's event counts only where
  none of the ops it runs has one. Dots (and, it seems, parallel loops) run
  asynchronously on XLA's thread pool, so their events end at the launch; an idle gap therefore
  goes to the ops that the op starting after the gap was waiting for: its
  operands whose events ended last, within 1 ms of each other (or, when none,
  the events that ended last). Dots launched together share their gaps, so
  per-op times of concurrent dots are approximate; read the group sums.
  """
  ended: dict[str, float] = {}

  def waited_for(name: str, before: float) -> list[str]:
    pending, done = list(hlo["ops"][name]["operands"]), set()
    while pending:  # through bitcasts and tuples, which have no events
      operand = pending.pop()
      if operand in ended:
        done.add(operand)
      elif operand in hlo["ops"] and hlo["ops"][operand]["opcode"] != "parameter":
        pending += hlo["ops"][operand]["operands"]
    done = {d for d in done if ended[d] <= before} or set(ended)
    last = max(ended[d] for d in done)
    return [d for d in done if ended[d] >= last - 1e6]  # launched together: share the gap

  times: dict[str, float] = collections.defaultdict(float)
  active: list[tuple[float, str]] = []
  busy, now, i = 0.0, events[0][0], 0
  while i < len(events) or active:
    nxt = min([e for e, _ in active] + ([events[i][0]] if i < len(events) else []))
    if active:
      # A conditional's (loop's) event spans its branch's ops: they get the time.
      running = [a for a in active if not runs_computations(hlo["ops"][a[1]])] or active
      for _, name in running:
        times[name] += (nxt - now) / 1e9 / len(running)
      busy += (nxt - now) / 1e9
    elif nxt > now and ended:
      awaited = waited_for(events[i][2], now)
      for name in awaited:
        times[name] += (nxt - now) / 1e9 / len(awaited)
    now = nxt
    for end, name in [a for a in active if a[0] <= now]:
      ended[name] = end
    active = [a for a in active if a[0] > now]
    while i < len(events) and events[i][0] <= now:
      active.append((events[i][1], events[i][2]))
      i += 1
  return dict(times), busy, (now - events[0][0]) / 1e9
