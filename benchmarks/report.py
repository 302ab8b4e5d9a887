"""What ``benchmarks.run`` prints: the tables, the ensemble ratios, a drift warning."""

from __future__ import annotations

from typing import Any


def table(rows: list[dict[str, Any]]) -> str:
  head = ("| case | s/step | real tok/s | padded % | compile s (of 100 steps) | TFLOP/step "
          "analytic (XLA) | GFLOP/s | MFU (adjacent) | attention pairs computed ÷ counted | "
          "MFU crediting them (adjacent) | peak RSS MB | compiles in timed steps |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    if "hf_tokens_per_s" in r:
      continue
    if "error" in r:
      lines.append(f"| {r['case']} | error: {r['error'][0]} ||||||||||")
      continue
    share = 100 * r["compile_share_100_steps"]
    lines.append(f"| {r['case']} | {r['s_per_step']:.2f} | {r['real_tokens_per_s']:.0f} | "
                 f"{r['padded_slot_pct']:.0f} | {r['compile_s']:.1f} ({share:.1f}%) | "
                 f"{flop_cell(r)} | {r['achieved_gflop_s']:.0f} | "
                 f"{mfu_cell(r.get('mfu'), r['mfu_adjacent'])} | {pairs_cell(r)} | "
                 f"{mfu_cell(r.get('mfu_computed_pairs'), r.get('mfu_adjacent_computed_pairs'))}"
                 f" | {r['peak_rss_mb']} | {r['compiles_during_timed_steps']} |")
  generation = [r for r in rows if "hf_tokens_per_s" in r]
  if generation:
    lines += ["", "| case | prefjax tok/s | HF tok/s | vs HF | prefjax s/call | HF s/call | "
              "roofline s/call | max vs HF | compile s | greedy agreement | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['real_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | "
              f"{r['vs_hf']:.2f}× | {r['s_per_step']:.2f} | {r['hf_s_per_call']:.2f} | "
              f"{r['roofline_s']:.2f} | {r['max_vs_hf']:.2f}× | "
              f"{r['compile_s']:.0f} | {r.get('greedy_token_agreement', '')} | {r['peak_rss_mb']} |"
              for r in generation]
    rates = generation[-1]["stream_gb_s"]
    lines.append("roofline: each decode step at the slower of its FLOPs at the jnp.dot "
                 "ceiling and its weight + KV bytes at the best matrix-vector read rate ("
                 + ", ".join(f"{k} {v:.0f} GB/s" for k, v in rates.items()) + ")")
  return "\n".join(lines)


def flop_cell(r: dict[str, Any]) -> str:
  xla = r.get("xla_tflop_per_step")
  return f"{r['analytic_tflop_per_step']:.3f}" + (f" ({xla:.3f})" if xla else "")


def mfu_cell(mfu: float | None, adjacent: float | None) -> str:
  return "" if mfu is None else f"{100 * mfu:.0f}% ({100 * adjacent:.0f}%)"


def pairs_cell(r: dict[str, Any]) -> str:
  counted, computed = r.get("attention_pairs_counted"), r.get("attention_pairs_computed")
  return f"{computed / counted:.2f}×" if counted else ""


def ensemble_speedups(rows: list[dict[str, Any]], baselines: dict[str, str]
                      ) -> dict[str, dict[str, float | None]]:
  """Per deep-ensemble case whose one-model case ran too: how much faster one step of the
  4 members is than 4 steps of one model on the same batches (``baselines``: ensemble
  case -> one-model case).

  ``vs_4_sequential``: summed time over summed time (4 × the ensemble's real tokens/s
  over the one model's). The two cases run minutes apart, so a VM whose speed drifts
  in between moves this ratio; ``vs_4_sequential_adjacent`` scales it by the ratio of
  the dot ceilings probed around each case's steps (the one model's over the
  ensemble's), which removes the part of the drift the probe sees. Neither replaces an
  interleaved comparison in one process (``benchmarks.ensemble_step``)."""
  by_case = {r["case"]: r for r in rows if "error" not in r}
  speedups = {}
  for case, single in baselines.items():
    if case not in by_case or single not in by_case:
      continue
    ensemble, one = by_case[case], by_case[single]
    raw = 4 * ensemble["real_tokens_per_s"] / one["real_tokens_per_s"]
    ceilings = (one.get("adjacent_ceiling_gflop_s"), ensemble.get("adjacent_ceiling_gflop_s"))
    speedups[case] = {"vs_4_sequential": round(raw, 3),
                      "vs_4_sequential_adjacent": (round(raw * ceilings[0] / ceilings[1], 3)
                                                   if all(ceilings) else None)}
  return speedups


def drift_warning(ceiling_start: float, ceiling_end: float, limit: float = 1.15) -> str:
  """A line to print when the dot ceiling moved by more than ``limit`` × over the run."""
  low, high = sorted((ceiling_start, ceiling_end))
  if high <= limit * low:
    return ""
  return (f"warning: the f32 dot ceiling moved {ceiling_start / 1e9:.0f} → "
          f"{ceiling_end / 1e9:.0f} GFLOP/s during the run: this machine's speed drifted, "
          "so ratios between cases (and MFU against the run's ceiling) are unreliable; "
          "read the adjacent columns, or compare within one process")


def load_warning(rows: list[dict], cores: int) -> str:
  """A line naming the cases that ended with more load than their own (about ``cores``)."""
  busy = [f"{r['case']} ({r['load_average_1m_after']:.1f})" for r in rows
          if r.get("load_average_1m_after", 0) > cores + 0.5]
  if not busy:
    return ""
  return (f"warning: other work shared this {cores}-core machine during {', '.join(busy)} "
          "(1-minute load average when each ended): PyTorch's and Hugging Face's threads "
          "slow far more than XLA's under such load, so their ratios are unreliable")


def ensemble_line(case: str, speedup: dict[str, float | None], baseline: str) -> str:
  adjacent = speedup["vs_4_sequential_adjacent"]
  return (f"{case}: {speedup['vs_4_sequential']:.2f}× the speed of 4 steps of {baseline}"
          + (f" ({adjacent:.2f}× scaled by the ceilings probed around each)" if adjacent else ""))
