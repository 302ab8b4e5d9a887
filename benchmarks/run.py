r"""Train-step benchmarks: prefjax against the same computation in PyTorch, on one machine.

  python -m benchmarks.run                      # every case, 8 timed steps each
  python -m benchmarks.run --quick              # 3 timed steps (a packed layout's whole
                                                # window: 8), prefjax RM/DPO cases only
  python -m benchmarks.run --cases=rm_step_hh,torch_rm_step_hh --json=/tmp/bench.json

Each case runs in its own subprocess (its own compile cache and peak RSS); prefjax's
train-step cases run with the binaries' malloc setting (``prefjax/xla_cpu.py``), the
others with the caller's environment, and each row's ``glibc_tunables`` says which. A
case takes the workload's first ``1 + steps`` batches (``benchmarks.workloads``),
builds the step and runs it once on every distinct shape among them (``startup_s``),
runs the last batch as a warm-up and times the first ``steps``. A packed layout's steps
round up to whole packing windows (8 batches: ``workloads.whole_windows``), so it times all
of a window, not its fullest batches, and the pairs the padded layouts time (but those its
rows cannot fit, which move to the next window: 2 of 64 in ``rm_step_hh``). ``compile_s``
is the part of ``startup_s`` JAX spent tracing, lowering and compiling (``CompileClock``; the
model's initialisation programs included); ``compile_share_100_steps`` sets it
against a 100-step run, ``startup_s`` plus the remaining steps at the median. Reported per
case: median s/step, real (non-pad) tokens/s, padded-slot %, analytic FLOPs on
computed slots (6·N·slots for the matmul parameters N plus causal attention,
×3 for forward+backward; a reward model's last block counts only its pooled slots,
``pooled_counts``) beside XLA's cost analysis of the compiled step (``xla_tflop_per_step``;
XLA counts a conditional as its costliest branch, so every attention tile of a packed
row counts, skipped or not, and a loop's body once, so scanned-layer cases report none),
the attention pairs per head and layer that count credits
against those prefjax's kernel computes (``attention_pairs_counted``/``_computed``:
whole tiles, masked pairs included; ``mfu_computed_pairs`` credits those instead, as the
matmul count credits padded slots), and MFU = the analytic FLOP/s ÷ this machine's float32
matmul ceiling (``jnp.dot`` 2048², median of 10, measured at start and end,
the higher used: a low reading means something else had the cores, and dividing by
it would inflate MFU); ``mfu_adjacent`` sets the same FLOPs against the same dot probed
right before the first timed step and after each one (``adjacent_mfu``), which follows a
VM whose speed drifts during the run. Also peak RSS, and the number of compiles during
the timed steps (must be 0: XLA compilations of any program, counted by ``jax.monitoring``,
or new entries in the step's jit cache), the 1-minute load average when the case ended
(``load_average_1m_after``: the case itself adds about the core count; more means other
work shared the machine, which slows PyTorch's threads far more than XLA's) and, in
PyTorch and generation rows, ``torch_threads``. Rates (tokens/s, FLOP/s, MFU) are the timed steps' summed work over
their summed time (``total_rate``). ``rm_step_hh``, ``dpo_step_hh_cached`` and ``dpo_step_hh_live``
use the project's fast layout for decoder pair training (``configs/dpo/smollm2_hh.py``'s
default): each pair packed as one ``prompt | chosen | rejected`` sequence
(``share_prompt``) into 2 rows of 1,024. The ``*_padded`` cases pad to the batch's
longest row rounded up to 64 (``PipelineConfig``'s default mode, the layout the
PyTorch cases run), ``rm_step_hh_packed`` packs whole pairs into 3 rows of 1,024 and
``rm_step_hh_fixed512`` pads every row to 512; the ``*_trimmed`` cases are the fast
layout with ``trim_rows`` (a batch whose pairs fit in one row is ``[1, 1024]``). Real
tokens count each pair as two ``prompt + response`` sequences in every layout
(``pair_tokens``), so rows compare pairs per second; ``computed_tokens_per_s`` is what a
step ran on. ``torch_*`` cases need ``torch`` and ``transformers`` (the test extra).

Also: ``rm_step_hh_minilm`` (the encoder RM of ``configs/rm/hh_minilm.py`` at its
HH lengths), ``ref_precompute_hh`` (the DPO reference pass of ``ref_cache``;
``pairs_per_s``), and ``generate_{25m,smollm2}_b{1,16,64}_{greedy,sample}``:
KV-cache generation, 64-token prompts, exactly 128 new tokens, timed against
Hugging Face ``generate`` on the same weights in the same process
(``benchmarks.generation``; at most 3 repeats each, median; ``vs_hf`` is the
tokens/s ratio). ``--cases=generate`` selects every case whose name contains
``generate``. ``rm_step_hh_scan``, ``rm_step_hh_30layers`` and
``rm_step_hh_30layers_scan`` set compile time against step time: the same RM
with its blocks in one ``lax.scan`` (``Decoder.scan_layers``), and with 30 layers
(SmolLM2's depth) unrolled or scanned. ``rm_ensemble4_one_step`` (padded) and
``rm_ensemble4_one_step_shared`` train a 4-member ``DeepEnsemble`` in one step;
``vs_4_sequential`` sets it against 4 steps of the one-model case on the same
batches, when that case ran too (``ENSEMBLE_BASELINES``); the two run minutes apart, so
``benchmarks.ensemble_step`` (interleaved, one process) is the measurement to trust.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

# name: (builder module function, layout, extra description)
CASES: dict[str, dict[str, Any]] = {
    "rm_step_hh": dict(kind="rm", layout="shared"),
    "rm_step_hh_padded": dict(kind="rm", layout="longest"),
    "rm_step_hh_fixed512": dict(kind="rm", layout="fixed"),
    "rm_step_hh_packed": dict(kind="rm", layout="packed"),
    "rm_step_hh_trimmed": dict(kind="rm", layout="shared_trimmed"),
    "dpo_step_hh_cached": dict(kind="dpo_cached", layout="shared"),
    "dpo_step_hh_live": dict(kind="dpo_live", layout="shared"),
    "dpo_step_hh_cached_trimmed": dict(kind="dpo_cached", layout="shared_trimmed"),
    "dpo_step_hh_live_trimmed": dict(kind="dpo_live", layout="shared_trimmed"),
    "dpo_step_hh_cached_padded": dict(kind="dpo_cached", layout="longest"),
    "dpo_step_hh_live_padded": dict(kind="dpo_live", layout="longest"),
    "rm_ensemble4_one_step": dict(kind="rm_ensemble4", layout="longest"),
    "rm_ensemble4_one_step_shared": dict(kind="rm_ensemble4", layout="shared"),
    "torch_rm_step_hh": dict(kind="torch_rm", layout="longest"),
    "torch_dpo_step_hh_cached": dict(kind="torch_dpo_cached", layout="longest"),
    "torch_dpo_step_hh_live": dict(kind="torch_dpo_live", layout="longest"),
    "rm_step_hh_minilm": dict(kind="rm_minilm", layout="minilm"),
    # Compile time against step time: the blocks unrolled (default) or one lax.scan.
    "rm_step_hh_scan": dict(kind="rm", layout="shared", decoder=dict(scan_layers=True)),
    "rm_step_hh_30layers": dict(kind="rm", layout="shared", decoder=dict(num_layers=30)),
    "rm_step_hh_30layers_scan": dict(kind="rm", layout="shared",
                                     decoder=dict(num_layers=30, scan_layers=True)),
    "ref_precompute_hh": dict(kind="ref_precompute", layout="longest"),
}
# KV-cache generation, prefjax and Hugging Face back to back (benchmarks.generation).
CASES.update({f"generate_{m}_b{b}_{mode}": dict(kind="generate", model=m, batch=b,
                                                greedy=mode == "greedy")
              for m in ("25m", "smollm2") for b in (1, 16, 64) for mode in ("greedy", "sample")})
# Static segment count of the packed layouts (``workloads.pipeline_config``).
NUM_SEGMENTS = {"packed": 16, "shared": 24, "shared_trimmed": 24}
QUICK = ("rm_step_hh", "dpo_step_hh_cached", "dpo_step_hh_live")
# Each deep-ensemble case and the one-model case on the same layout and batches.
ENSEMBLE_BASELINES = {"rm_ensemble4_one_step": "rm_step_hh_padded",
                      "rm_ensemble4_one_step_shared": "rm_step_hh"}
# Calls of the 2048² dot probed after each timed step (median): ≈ 0.15 s on this CPU.
ADJACENT_PROBE_REPEATS = 3
GENERATION_REPEATS = 3  # at most, per framework: an HF call at batch 64 takes ~10-100 s here


def _builder(kind: str, num_segments: int | None,
             decoder: dict[str, Any] | None = None) -> tuple[Callable, dict]:
  from benchmarks import steps
  return {
      "rm": lambda: steps.prefjax_rm(num_segments, **(decoder or {})),
      "rm_ensemble4": lambda: steps.prefjax_rm_ensemble(4, num_segments),
      "dpo_cached": lambda: steps.prefjax_dpo("cached", num_segments),
      "dpo_live": lambda: steps.prefjax_dpo("live", num_segments),
      "torch_rm": steps.torch_rm,
      "torch_dpo_cached": lambda: steps.torch_dpo("cached"),
      "torch_dpo_live": lambda: steps.torch_dpo("live"),
      "rm_minilm": steps.prefjax_minilm_rm,
      "ref_precompute": steps.prefjax_ref_precompute,
  }[kind]()


def analytic_flops(rows: int, length: int, *, lm_head: bool, passes: float,
                   attention_pairs: float | None = None, num_layers: int | None = None,
                   config: Any = None, pooled: tuple[float, float] | None = None,
                   lm_head_slots: float | None = None) -> float:
  """Forward+backward FLOPs of ``rows x length`` computed slots: 6·N·slots + attention.

  ``attention_pairs`` counts the (query, key) pairs attention must compute; by
  default each row's causal triangle, ``rows·length²/2`` (padded rows: every slot is
  computed). Packed rows pass ``visible_pairs`` instead: the kernel skips what
  crosses segments, so counting the row's whole triangle would credit it with work
  it does not do. ``passes`` counts full forward+backward equivalents (a frozen
  reference forward is 1/3 of one). With ``lm_head`` the output head counts at
  ``lm_head_slots`` slots (default: all): a DPO step needs logits only at the tokens
  its loss reads (``loss_mask``), whether or not a framework computes the rest.
  ``config``: another ``DecoderConfig`` than the workload's model (``num_layers``
  resizes the workload's). ``pooled = (slots, pairs)``
  (``pooled_counts``): a reward model whose last block runs only at the pooled
  slots (``Decoder.hidden_states(select=...)``); that block's query, output and MLP
  products and its attention count for those slots and their pairs alone.
  """
  from benchmarks import model_throughput
  from benchmarks import workloads
  c = config or workloads.rm_model_config(num_layers=num_layers)
  head = 2 * c.hidden_size * c.vocab_size
  matmul = model_throughput.flops_per_token(c, 0) - head
  head_slots = (rows * length if lm_head_slots is None else lm_head_slots) if lm_head else 0
  if attention_pairs is None:
    attention_pairs = row_triangle_pairs(rows, length)
  attention = model_throughput.attention_flops_per_pair(c)
  total = matmul * rows * length + head * head_slots + attention * attention_pairs
  if pooled is not None:
    slots, pairs = pooled
    block = model_throughput.block_matmul_params(c)
    per_slot = 2 * (block["query_output"] + block["mlp"])
    total -= (per_slot * (rows * length - slots)
              + attention / c.num_layers * (attention_pairs - pairs))
  return passes * 3 * total


def pooled_counts(batch: dict[str, np.ndarray]) -> tuple[float, float]:
  """(slots, visible (query, key) pairs) of the tokens a "last"-pooled reward head
  reads: each sequence's last real token (packed: each segment's)."""
  if "segment_ids" not in batch:
    lengths = batch["attention_mask"].sum(-1)
    return float(len(lengths)), float(lengths.sum())
  segments = batch["segment_ids"]
  prefixes = batch.get("prefix_ids", segments)
  slots = pairs = 0.0
  for seg_row, prefix_row in zip(segments, prefixes):
    for seg in np.unique(seg_row[seg_row > 0]):
      last = np.flatnonzero(seg_row == seg)[-1]
      keys = seg_row[:last + 1]
      slots += 1
      pairs += np.sum((keys == seg) | (keys == prefix_row[last]))
  return slots, pairs


def row_triangle_pairs(rows: int, length: int) -> float:
  """(query, key) pairs credited to padded rows: each row's causal triangle, length²/2."""
  return rows * length * length / 2


def visible_pairs(batch: dict[str, np.ndarray]) -> float:
  """(query, key) pairs a packed batch's attention must compute: each real token sees
  the keys of its segment up to itself, plus its whole prompt segment (``prefix_ids``)."""
  segments = batch["segment_ids"]
  prefixes = batch.get("prefix_ids", segments)
  total = 0.0
  for seg_row, prefix_row in zip(segments, prefixes):
    ids, lengths = np.unique(seg_row[seg_row > 0], return_counts=True)
    size = dict(zip(ids.tolist(), lengths.tolist()))
    total += sum(n * (n + 1) / 2 for n in lengths)
    for seg, prefix in set(zip(seg_row.tolist(), prefix_row.tolist())):
      if seg > 0 and prefix != seg:
        total += size[seg] * size[prefix]
  return total


def attention_pair_counts(batches: list[dict[str, np.ndarray]]
                          ) -> tuple[list[float], list[float]]:
  """Per batch, (query, key) pairs per head and layer of prefjax's decoder steps:
  those ``analytic_flops`` credits (visible pairs; padded rows: each row's triangle) and
  those the kernel computes (``attention.computed_pairs``: block-causal on padded rows,
  tiles on packed ones, as ``Decoder`` runs them on CPU)."""
  from prefjax.models import attention
  counted, computed = [], []
  for b in batches:
    if "segment_ids" in b:
      counted.append(visible_pairs(b))
      computed.append(attention.computed_pairs(b["segment_ids"], b.get("prefix_ids"),
                                               tiled=True))
    else:
      counted.append(row_triangle_pairs(*b["tokens"].shape))
      computed.append(attention.computed_pairs(b["attention_mask"]))
  return counted, [float(c) for c in computed]


def computed_shape(batch: dict[str, np.ndarray], torch: bool) -> tuple[int, int]:
  """(rows, length) a step computes: PyTorch cuts rows to the exact longest real row."""
  rows, length = batch["tokens"].shape
  return rows, int(batch["attention_mask"].sum(-1).max()) if torch else length


class CompileClock:
  """Within ``with``: ``seconds`` JAX spends tracing, lowering and compiling programs.

  Sums JAX's own duration events (``jax.monitoring``), which it records for top-level
  programs only, so nested traces are not counted twice.
  """

  EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                      "/jax/core/compile/jaxpr_to_mlir_module_duration",
                      "/jax/core/compile/backend_compile_duration"})

  def __init__(self):
    self.seconds = 0.0
    self.backend_compiles = 0  # XLA compilations of any program, this step's or another's

  def _record(self, event: str, duration: float, **_: Any) -> None:
    if event in self.EVENTS:
      self.seconds += duration
    if event == "/jax/core/compile/backend_compile_duration":
      self.backend_compiles += 1

  def __enter__(self) -> "CompileClock":
    import jax
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc: Any) -> None:
    import jax
    jax.monitoring.unregister_event_duration_listener(self._record)


def run_case(name: str, steps: int) -> dict[str, Any]:
  """Runs one case in this process; returns its row."""
  import jax
  from benchmarks import steps as steps_lib
  from benchmarks import workloads
  spec = CASES[name]
  if spec["kind"] == "generate":
    from benchmarks import generation
    row = generation.run_generation(spec["model"], spec["batch"], spec["greedy"],
                                    min(steps, GENERATION_REPEATS))
    return {**row, "jax_backend": jax.default_backend()}
  kind, layout = spec["kind"], spec["layout"]
  steps = workloads.whole_windows(layout, steps)
  # The first `steps` batches are timed, after a warm-up on the next one: packed layouts
  # reorder pairs within a window of batches, so whole windows time the same pairs as the
  # unpacked layouts (PyTorch's included) and not only a window's fullest batches.
  batches = workloads.layout_batches(layout, steps + 1)
  if "cached" in kind:
    batches = [steps_lib.with_cached_reference(b) for b in batches]
  num_segments = NUM_SEGMENTS.get(layout)
  start = time.perf_counter()
  seen = set()
  with CompileClock() as clock:
    step, info = _builder(kind, num_segments, spec.get("decoder"))
    compiles = info.get("compiles")
    if compiles is not None:  # compile every shape first: run one step per distinct shape
      for b in batches:
        if b["tokens"].shape not in seen:
          seen.add(b["tokens"].shape)
          step(b)
  startup_s = time.perf_counter() - start
  timed, warm_up = batches[:-1], batches[-1]
  step(warm_up)
  probe = steps_lib.matmul_probe()
  ceilings = [probe(ADJACENT_PROBE_REPEATS)]
  before = compiles() if compiles else 0
  times = []
  with CompileClock() as timed_clock:
    for b in timed:
      t0 = time.perf_counter()
      loss = step(b)
      times.append(time.perf_counter() - t0)
      ceilings.append(probe(ADJACENT_PROBE_REPEATS))
      if not np.isfinite(loss):
        raise RuntimeError(f"{name}: non-finite loss {loss}")
  real, computed, pair_count = per_step_counts(timed)
  torch = kind.startswith("torch")
  shapes = [computed_shape(b, torch) for b in timed]
  slots = [r * t for r, t in shapes]
  flops, flops_computed, pair_counts = step_flops(name, info, timed, shapes)
  counted_pairs, computed_pairs = pair_counts or (None, None)
  s_per_step = statistics.median(times)
  # XLA's cost analysis counts a loop's body once: a scanned decoder's blocks count as one.
  scanned = (spec.get("decoder") or {}).get("scan_layers", False)
  xla = (steps_lib.xla_flops_per_batch(info["train_step"], info["state"](), timed)
         if "train_step" in info and not scanned else [None])
  mean = lambda values, scale=1.0: (None if values is None or None in values
                                    else round(float(np.mean(values)) / scale, 4))
  return {
      "case": name, "framework": "torch" if torch else "prefjax",
      "layout": layout, "steps": len(times), "params": info["params"],
      "compile_s": round(clock.seconds, 2), "startup_s": round(startup_s, 2),
      "compile_share_100_steps": round(
          clock.seconds / (startup_s + (100 - len(seen)) * s_per_step), 4),
      "s_per_step": round(s_per_step, 3),
      "step_times": [round(t, 3) for t in times],
      "real_tokens_per_step": round(float(np.mean(real)), 1),
      "real_tokens_per_s": round(total_rate(real, times), 1),
      "computed_tokens_per_s": round(total_rate(computed, times), 1),
      "padded_slot_pct": round(100 * (1 - sum(computed) / sum(slots)), 1),
      "analytic_tflop_per_step": mean(flops, 1e12),
      "analytic_tflop_per_step_computed_pairs": mean(flops_computed, 1e12),
      "xla_tflop_per_step": mean(xla, 1e12),
      "attention_pairs_counted": mean(counted_pairs),
      "attention_pairs_computed": mean(computed_pairs),
      "achieved_gflop_s": round(total_rate(flops, times) / 1e9, 1),
      "achieved_gflop_s_computed_pairs": (round(total_rate(flops_computed, times) / 1e9, 1)
                                          if flops_computed else None),
      "mfu_adjacent": round(adjacent_mfu(flops, times, ceilings), 3),
      "mfu_adjacent_computed_pairs": (round(adjacent_mfu(flops_computed, times, ceilings), 3)
                                      if flops_computed else None),
      "adjacent_ceilings_gflop_s": [round(c / 1e9, 1) for c in ceilings],
      "adjacent_ceiling_gflop_s": round(adjacent_ceiling(times, ceilings) / 1e9, 1),
      "pairs_per_s": round(total_rate(pair_count, times), 2),
      "peak_rss_mb": steps_lib.peak_rss_mb(),
      "compiles_during_timed_steps": max((compiles() - before) if compiles else 0,
                                         timed_clock.backend_compiles),
      "jax_backend": jax.default_backend(),
      "cpu_async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch"),
  }


def step_flops(name: str, info: dict[str, Any], timed: list[dict[str, np.ndarray]],
               shapes: list[tuple[int, int]]) -> tuple[list, list | None, tuple | None]:
  """Per timed batch: analytic FLOPs (``analytic_flops``); the same with attention
  credited for the pairs the kernel computes rather than the visible ones (prefjax's
  decoder steps; else None); and those two pair counts (``attention_pair_counts``)."""
  spec = CASES[name]
  kind, torch = spec["kind"], spec["kind"].startswith("torch")
  passes = {"dpo_live": 4 / 3, "torch_dpo_live": 4 / 3, "rm_ensemble4": 4.0,
            "ref_precompute": 1 / 3}.get(kind, 1.0)
  if "flops_per_token" in info:
    return [passes * 3 * info["flops_per_token"](t) * r * t for r, t in shapes], None, None
  reads_logits = "dpo" in kind or kind == "ref_precompute"
  count = functools.partial(analytic_flops, lm_head=reads_logits, passes=passes,
                            num_layers=spec.get("decoder", {}).get("num_layers"))
  # The same credit for the same rows in either framework: PyTorch runs its last block at
  # every slot, but an RM needs it at the pooled slots only (as prefjax computes it).
  pooled = [pooled_counts(b) if kind.startswith(("rm", "torch_rm")) else None for b in timed]
  heads = [float(np.count_nonzero(b["loss_mask"])) if reads_logits else None for b in timed]
  if torch:  # rows cut to the longest: each row's triangle (analytic_flops' default)
    return [count(r, t, pooled=q, lm_head_slots=h)
            for (r, t), q, h in zip(shapes, pooled, heads)], None, None
  counted, computed = attention_pair_counts(timed)
  flops, flops_computed = ([count(r, t, attention_pairs=p, pooled=q, lm_head_slots=h)
                            for (r, t), p, q, h in zip(shapes, pairs, pooled, heads)]
                           for pairs in (counted, computed))
  return flops, flops_computed, (counted, computed)


def adjacent_mfu(flops, times, ceilings) -> float:
  """MFU against the ceiling probed around each step: ``Σ flops / Σ time·ceiling``.

  A VM whose speed drifts slows a step and its probes together, so this ratio drifts
  less than one against the run's start and end."""
  if len(flops) != len(times):
    raise ValueError(f"{len(times)} times, {len(flops)} FLOP counts")
  return total_rate(flops, times) / adjacent_ceiling(times, ceilings)


def adjacent_ceiling(times, ceilings) -> float:
  """The ceiling around the timed steps, weighted by their time: ``Σ time·c / Σ time``,
  each step's ``c`` the mean of the probes just before and after it (``ceilings`` holds
  one more probe than there are steps)."""
  if len(ceilings) != len(times) + 1:
    raise ValueError(f"need one probe more than steps: {len(ceilings)} probes, "
                     f"{len(times)} times")
  around = (np.asarray(ceilings[:-1], np.float64) + np.asarray(ceilings[1:], np.float64)) / 2
  times = np.asarray(times, np.float64)
  return float(np.sum(times * around) / np.sum(times))


def per_step_counts(batches: list[dict[str, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per batch: real tokens (``pair_tokens``), real slots computed, and pairs."""
  return (np.array([pair_tokens(b) for b in batches], np.float64),
          np.array([np.count_nonzero(real_slots(b)) for b in batches], np.float64),
          np.array([b["pair_mask"].sum() for b in batches], np.float64))


def total_rate(amounts, times) -> float:
  """Amount (tokens, FLOPs) per second over the timed steps: summed amounts over summed times.

  Batches padded to their longest row differ in size from step to step; the mean
  amount over the median time would set a small batch's time against the average
  batch's work. A slow step (another tenant on the VM) counts with its full time.
  """
  return float(np.sum(np.asarray(amounts, np.float64)) / np.sum(np.asarray(times, np.float64)))


def real_slots(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Slots holding a real token (packed: segment id > 0; padded: the attention mask)."""
  return batch["segment_ids" if "segment_ids" in batch else "attention_mask"] > 0


def pair_tokens(batch: dict[str, np.ndarray]) -> int:
  """Real tokens of the batch's pairs as two ``prompt + response`` sequences each.

  This is what every layout and PyTorch compute for the same pairs, except the
  shared-prompt layout, which computes each prompt once: its prompt tokens are
  counted twice here, so ``real_tokens_per_s`` compares the same pairs across
  layouts (``computed_tokens_per_s`` is what the step ran on).
  """
  real = real_slots(batch)
  if "prefix_ids" in batch:
    prompts = real & (batch["segment_ids"] == batch["prefix_ids"])
    return int(np.count_nonzero(real) + np.count_nonzero(prompts))
  return int(np.count_nonzero(real))


def process_settings() -> dict[str, str]:
  """The XLA flags and glibc tunables this process runs with, for a result row."""
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def write_json(path: str, rows: Any) -> None:
  """Writes a script's result rows to ``path`` (nothing when it is empty) as standard JSON:
  a non-finite number as the string "nan"/"inf" (``prefjax.files.dumps``)."""
  if path:
    # Imported here: this module must not import jax before a case sets its XLA flags.
    from prefjax import files  # pylint: disable=g-import-not-at-top
    with open(path, "w") as f:
      f.write(files.dumps(rows, indent=1))


def _child(name: str, steps: int) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, "--steps", str(steps)]
  env = _child_environment(name)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    return {"case": name, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  return {**row, "glibc_tunables": env.get("GLIBC_TUNABLES", ""),
          "load_average_1m_after": round(os.getloadavg()[0], 2)}


def _child_environment(name: str) -> dict[str, str]:
  """The train binaries' malloc setting (``xla_cpu.malloc_tunables``) for the cases that
  :func:`runs_as_train_binary`; the plain environment for the others."""
  from prefjax import xla_cpu
  env = dict(os.environ)
  tunables = xla_cpu.malloc_tunables(env)
  if tunables and runs_as_train_binary(name):
    env["GLIBC_TUNABLES"] = tunables
  return env


def runs_as_train_binary(name: str) -> bool:
  """Whether case ``name`` runs with the train binaries' malloc setting and keeps freed
  memory (``xla_cpu.apply_malloc_defaults``): prefjax's train steps and reference scoring.
  Not PyTorch's cases (their steps ran 2–9% slower with it), nor generation, where prefjax
  and Hugging Face alternate in one process and huge pages slowed prefjax."""
  kind = CASES.get(name, {}).get("kind", "generate")
  return kind != "generate" and not kind.startswith("torch")


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name and widest vector ISA, e.g. ``AMD EPYC (2 cores, AVX-512)``:
  ratios against PyTorch move with the CPU (its matmul library picks kernels by vendor)."""
  info = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or platform.machine()
  flags = info.get("flags", "").split()
  isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
  return f"{info.get('model name', platform.machine())} ({os.cpu_count()} cores, {isa})"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="3 timed steps (8 in a packed layout), prefjax RM/DPO only")
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
  parser.add_argument("--json", default="", help="write the rows here")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  from prefjax import xla_cpu
  xla_cpu.apply_cpu_defaults()  # the binaries' CPU defaults; PREFJAX_XLA_CPU_DEFAULTS=0: XLA's own
  steps = args.steps or (3 if args.quick else 8)
  if args.child:
    if runs_as_train_binary(args.child):
      xla_cpu.keep_freed_memory()
    row = run_case(args.child, steps)
    if "torch" in sys.modules:  # a PyTorch or HF case: its threads collapse under other load
      row["torch_threads"] = sys.modules["torch"].get_num_threads()
    print(json.dumps(row))
    return
  names = [n for c in args.cases.split(",") if c
           for n in ([c] if c in CASES else [n for n in CASES if c in n] or [c])]
  names = names or list(QUICK if args.quick else CASES)
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"unknown cases {unknown}; known: {sorted(CASES)}")
  from benchmarks import report, steps as steps_lib
  ceiling_start = steps_lib.matmul_ceiling()
  rows = []
  for name in names:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    rows.append(_child(name, steps))
  ceiling_end = steps_lib.matmul_ceiling()
  ceiling = max(ceiling_start, ceiling_end)
  cpu = cpu_description()
  for r in rows:
    r["cpu"] = cpu
    if "error" not in r:
      r["mfu"] = round(r["achieved_gflop_s"] * 1e9 / ceiling, 3)
      if r.get("achieved_gflop_s_computed_pairs"):
        r["mfu_computed_pairs"] = round(r["achieved_gflop_s_computed_pairs"] * 1e9 / ceiling, 3)
      r["matmul_ceiling_gflop_s"] = round(ceiling / 1e9, 1)
  print(f"CPU: {cpu}")
  print(f"f32 matmul ceiling: {ceiling_start / 1e9:.0f} GFLOP/s at start, "
        f"{ceiling_end / 1e9:.0f} at end; load average {os.getloadavg()[0]:.2f}")
  print(report.table(rows))
  for case, speedup in report.ensemble_speedups(rows, ENSEMBLE_BASELINES).items():
    next(r for r in rows if r["case"] == case).update(speedup)
    print(report.ensemble_line(case, speedup, ENSEMBLE_BASELINES[case]))
  if warning := report.drift_warning(ceiling_start, ceiling_end):
    print(warning)
  if warning := report.load_warning(rows, os.cpu_count() or 1):
    print(warning)
  write_json(args.json, rows)


if __name__ == "__main__":
  main()
