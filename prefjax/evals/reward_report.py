"""Outputs of ``eval_rm``: ``report.md``, figures, ``scores.jsonl``, and the compare table.

``report.json`` holds the sections of ``prefjax.evals.reward_eval``; this module
renders them. ``scores.jsonl`` has one line per evaluated pair and dataset,
``{dataset, index, id, outcome, chosen_chars, rejected_chars, subset, scores:
{column: [r_chosen, r_rejected]}}`` (``subset`` is ``(none)`` for a row without one
where others have one), enough to redraw any figure without rescoring; a non-finite
score is the string ``"nan"``/``"inf"``/``"-inf"`` (``prefjax.files.standard_json``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

from matplotlib import figure as mpl_figure
import numpy as np

from prefjax import files
from prefjax.evals import preference
from prefjax.rm import evaluation as rm_evaluation


def _number(x: Any) -> float:
  """A float, or NaN for None and report.json's "nan" strings."""
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def _ci(e: Mapping[str, float] | None) -> str:
  """``value [low, high]``; ``value [n/a]`` where the bootstrap could draw no interval."""
  if not e or not math.isfinite(_number(e.get("value"))):
    return "–"
  low, high = _number(e.get("low")), _number(e.get("high"))
  bounds = f"[{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else "[n/a]"
  return f"{_number(e['value']):.3f} {bounds}"


def scorer_table(section: Mapping[str, Any]) -> list[str]:
  lines = ["| scorer | accuracy [95% CI] | length-controlled | BT log-loss | ECE | "
           "mean margin | reward mean ± std |", "|---|---|---|---|---|---|---|"]
  for name, m in section["metrics"].items():
    lines.append(f"| {name} | {_ci(m['accuracy'])} | {_ci(m['length_controlled_accuracy'])} | "
                 f"{_ci(m.get('bt_log_loss'))} | {_ci(m.get('ece'))} | "
                 f"{_ci(m['mean_margin'])} | {m['reward_mean']:.3g} ± {m['reward_std']:.3g} |")
  return lines


def _keyed_table(section: Mapping[str, Any], key: str, title: str) -> list[str]:
  names = [n for n, m in section["metrics"].items() if key in m]
  labels = list(dict.fromkeys(label for n in names for label in section["metrics"][n][key]))
  if not names or not labels:
    return []
  lines = [f"| {title} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
  for n in names:
    lines.append(f"| {n} | " + " | ".join(_ci(section["metrics"][n][key].get(label))
                                          for label in labels) + " |")
  return lines


def comparison_table(section: Mapping[str, Any]) -> list[str]:
  if not section["comparisons"]:
    return []
  lines = ["| B vs A | acc(B) − acc(A) [95% CI] | p (paired bootstrap, ≥ sign test) | "
           "agreement |", "|---|---|---|---|"]
  for pair, c in section["comparisons"].items():
    p_value = _number(c["p_value"])
    lines.append(f"| {pair} | {_ci(c['difference'])} | "
                 f"{f'{p_value:.3g}' if math.isfinite(p_value) else 'n/a'} | "
                 f"{c['agreement']:.3f} |")
  return lines


def markdown(report: Mapping[str, Any]) -> str:
  """The whole ``report.md``."""
  out = ["# Reward-model evaluation", "", f"Command: `{report['command']}`", "",
         f"Scorers: {', '.join(report['scorers'])}. Bootstrap: {report['num_resamples']} "
         "paired resamples of prompts, each with all its pairs; intervals are 95% percentile "
         "intervals, except ECE's: the "
         "basic bootstrap interval [2v − q97.5, 2v − q2.5] floored at 0, as binned ECE is "
         "biased upward (it can lie below the plug-in value v). Accuracy counts "
         "a zero margin as half; length-controlled accuracy = ½·acc(preferred longer) + "
         "½·acc(preferred shorter) (lengths in characters; a pure length scorer gets 0.5).", ""]
  if any(name.endswith("/wco") for section in report["datasets"] for name in section["metrics"]):
    how = {"standardize": "standardized (mean 0, SD 1)", "center": "centred (mean 0)",
           "none": "raw"}[report.get("ensemble_normalization", "none")]
    out += [f"Ensembles: `/wco` (minimum) and `/uwo` (mean − λ·population variance, λ = "
            f"{report.get('uwo_lambda', float('nan')):g}) take the members' rewards {how} over "
            "each dataset's responses, both sides (so their margins are not log-odds: no "
            "BT log-loss or ECE); the plain column is the members' raw mean.",
            ""]
  if report.get("checkpoints"):
    out += ["Checkpoints: " + "; ".join(f"{name} = `{c['path']}` step {c['step']}"
                                        for name, c in report["checkpoints"].items()) + ".", ""]
  for section in report["datasets"]:
    out += [f"## {section['dataset']}", "", rows_line(section), ""]
    if section.get("run_data"):
      warn = "**Warning:** " if section["run_data"]["status"] != "same" else ""
      out += [f"{warn}Data: {section['run_data']['message']}.", ""]
    for key, text in (("dropped_by_pipeline", "Dropped by a scorer's pipeline"),
                      ("unavailable", "Not available")):
      if section[key]:
        out += [f"{text}: {json.dumps(section[key])}.", ""]
    out += scorer_table(section) + [""]
    bins = _keyed_table(section, "length_bins",
                        "accuracy by (len_pref − len_other)/max_len")
    subsets = _keyed_table(section, "subsets", "accuracy by subset")
    if subsets:
      means = ", ".join(f"{n} {_ci(m['subset_mean'])}" for n, m in section["metrics"].items()
                        if "subset_mean" in m)
      subsets += ["", f"Category-weighted mean (each subset counts once): {means}."]
      if section.get("pairs_without_subset"):
        subsets += ["", f"**Warning:** {section['pairs_without_subset']} of "
                    f"{section['pairs_scored']} pairs have no meta.{section['subset_field']}: "
                    f"they are the subset {rm_evaluation.NO_SUBSET}, left out of the "
                    "category-weighted mean."]
    for block in (bins, subsets, comparison_table(section)):
      out += block + ([""] if block else [])
    for figure in section.get("figures", []):
      out += [f"![{figure}]({figure})", ""]
  return "\n".join(out)


_CUT = {"truncated_prompt": "the prompt", "truncated_response": "a response"}


def rows_line(section: Mapping[str, Any]) -> str:
  """Where every row went: read, skipped as bad (by reason), scored, ties, decisive."""
  counts = section.get("source_counts") or {}
  parts = []
  if counts:
    parts.append(f"{counts['rows_read']} read")
    if counts["rows_skipped"]:
      reasons = ", ".join(f"{k} {v}" for k, v in counts["skipped_by_reason"].items())
      first = next(iter(counts["skipped_examples"].values()))[0].split(": ", 1)[0]
      parts.append(f"{counts['rows_skipped']} skipped as bad rows (on_bad_row=skip: "
                   f"{reasons}; first at {first})")
    if counts["rows_in_other_splits"]:
      parts.append(f"{counts['rows_in_other_splits']} in sibling resplit_* splits")
    parts.append(f"{counts['rows_built']} built")
    if counts["rows_selected"] != counts["rows_built"]:
      parts.append(f"{counts['rows_selected']} selected by the split's slice")
  unscored = section["rows"] - section["pairs_scored"]
  if unscored:
    parts.append(f"{unscored} not scored by every scorer")
  for scorer, cut in (section.get("truncated_by_pipeline") or {}).items():
    what = " and ".join(f"{n} pairs with {_CUT[k]} cut" for k, n in cut.items())
    parts.append(f"{scorer} scored {what} to fit its max_length")
  ties = section["ties_left_out"]
  parts.append(f"{section['pairs_scored']} pairs scored, {ties} tie{'' if ties == 1 else 's'} "
               f"left out: {section['pairs_decisive']} decisive pairs in the metrics")
  prompts = section.get("decisive_prompts", section["pairs_decisive"])
  if prompts == 1 < section["pairs_decisive"]:
    parts.append("they come from one prompt, so every resample is the same: no interval or "
                 "p-value (n/a)")
  elif prompts < section["pairs_decisive"]:
    parts.append(f"they come from {prompts} prompts, which the intervals resample with all "
                 "their pairs")
  repeats = section.get("decisive_pairs_repeating_text", 0)
  if repeats:
    parts.append(f"{repeats} of them repeat another's text (same prompt and responses, "
                 "either order)")
  return (f"Rows: {'; '.join(parts)} (preferred response longer in "
          f"{section['preferred_longer_rate']:.0%}).")


def plot_reliability(signed: Mapping[str, np.ndarray], names: Sequence[str], path: str,
                     title: str, num_bins: int) -> None:
  """Reliability diagram of σ(margin) over both pair orders, one line per scorer."""
  curves = {}
  for name in names:
    prob = 1.0 / (1.0 + np.exp(-signed[name]))
    curves[name] = preference.reliability_diagram(
        np.concatenate([prob, 1 - prob]),
        np.concatenate([np.ones_like(prob), np.zeros_like(prob)]), num_bins)
  preference.plot_reliability(curves, path, title, xlabel="predicted P(a ≻ b) = σ(r_a − r_b)")


def plot_length_bins(section: Mapping[str, Any], names: Sequence[str], path: str) -> None:
  """Accuracy (95% CI) per length-difference bin, one series per scorer."""
  labels = [b for b, n in section["length_bin_counts"].items() if n]
  fig = mpl_figure.Figure(figsize=(8, 4))
  ax = fig.subplots()
  width = 0.8 / max(len(names), 1)
  for k, name in enumerate(names):
    bins = section["metrics"][name]["length_bins"]
    x = np.array([i for i, b in enumerate(labels) if b in bins]) + (k - len(names) / 2) * width
    e = [bins[b] for b in labels if b in bins]
    y = np.array([v["value"] for v in e])
    err = np.array([[v["value"] - v["low"] for v in e], [v["high"] - v["value"] for v in e]])
    ax.bar(x, y, width, yerr=err, capsize=2, label=name, align="edge")
  ax.axhline(0.5, color="gray", lw=0.5)
  ax.set_xticks(np.arange(len(labels)))
  ax.set_xticklabels([f"{b}\nn={section['length_bin_counts'][b]}" for b in labels], fontsize=7)
  ax.set_xlabel("(len_preferred − len_other) / max length, characters")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"{section['dataset']}: accuracy (95% CI) by length difference", fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  files.save_figure(fig, path)


def score_lines(dataset: str, arrays: Mapping[str, Any]) -> list[str]:
  """``scores.jsonl`` lines of one dataset (see the module docstring)."""
  table, columns = arrays["table"], arrays["columns"]
  lines = []
  for k, i in enumerate(table.index):
    lines.append(files.dumps({
        "dataset": dataset, "index": int(i), "id": table.ids[k],
        "outcome": float(table.outcome[k]), "chosen_chars": int(table.chosen_chars[k]),
        "rejected_chars": int(table.rejected_chars[k]),
        "subset": table.subsets[k] if table.subsets else None,
        "scores": {n: [float(c[k]), float(r[k])] for n, (c, r) in columns.items()}}))
  return lines


def compare_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
  """One markdown table: rows (dataset, scorer), one column of accuracy [CI] per report."""
  runs = list(reports)
  keys: list[tuple[str, str]] = []
  for report in reports.values():
    for section in report["datasets"]:
      keys += [(section["dataset"], n) for n in section["metrics"]
               if (section["dataset"], n) not in keys]
  header = "| dataset | scorer | " + " | ".join(runs) + " |"
  lines = [header, "|---|---|" + "---|" * len(runs)]
  for dataset, scorer in keys:
    cells = []
    for run in runs:
      sections = {s["dataset"]: s for s in reports[run]["datasets"]}
      m = sections.get(dataset, {}).get("metrics", {}).get(scorer)
      cells.append(_ci(m["accuracy"]) if m else "–")
    lines.append(f"| {dataset} | {scorer} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
