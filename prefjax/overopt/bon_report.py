"""The report of one ``experiments.best_of_n`` run: how firmly its gold curve turns down,
its figure and its ``report.md``."""

from __future__ import annotations

from typing import Any

import numpy as np

from prefjax.evals import plots
from prefjax.overopt import bon
from prefjax.overopt import filtered


def gold_decline(curve: Any, num_bootstrap: int, seed: int) -> dict[str, Any]:
  """How firmly the gold curve turns down: the paired drop from its peak to the largest n
  (mean over prompts ± bootstrap SE) and the share of prompt resamples peaking at each n."""
  decline = bon.peak_drop(curve.per_prompt_gold, num_bootstrap, seed)
  share = bon.argmax_spread(curve.per_prompt_gold, num_bootstrap, seed)
  return {"peak_n": int(curve.knob[decline.peak]), "drop_to_max_n": decline.drop,
          "drop_se": decline.se, "drop_critical_z": decline.critical_z,
          "peak_n_share": {str(int(n)): float(f) for n, f in zip(curve.knob, share) if f > 0}}


def plot(result: dict[str, Any], path: str) -> None:
  plots.plot_scores_vs_sqrt_kl(
      result["sqrt_kl"], {name: (result[name], result[f"{name}_se"])
                          for name in ("proxy", "gold")}, path,
      xlabel="√(log n − (n−1)/n), the analytic upper bound on √KL (nats½)",
      ylabel="score − reference mean",  # each in its own units, on its own axis
      title=f"best-of-n, N={result['num_samples']}, {result['num_prompts']} prompts")


def report_markdown(result: dict[str, Any]) -> str:
  lines = [
      "# Best-of-n overoptimization", "",
      f"proxy `{result['proxy_name']}`, gold `{result['gold_name']}`; "
      f"{result['num_prompts']} prompts × {result['num_samples']} reference samples; "
      "scores are minus the reference mean; ± one bootstrap SE over prompts. "
      f"KL is the {result['kl_note']}. Sampling: "
      + ", ".join(f"{k} {v}" for k, v in sorted(result["sampling"].items())) + ".", "",
      "| n | KL | √KL | proxy | gold |", "|---:|---:|---:|---:|---:|"]
  for i, n in enumerate(result["n"]):
    lines.append(f"| {n} | {result['kl'][i]:.3f} | {result['sqrt_kl'][i]:.3f} | "
                 f"{result['proxy'][i]:+.3f} ± {result['proxy_se'][i]:.3f} | "
                 f"{result['gold'][i]:+.3f} ± {result['gold_se'][i]:.3f} |")
  peak = int(np.argmax(result["gold"]))
  decline = result["gold_decline"]
  shares = sorted(decline["peak_n_share"].items(), key=lambda kv: -kv[1])
  drop = f"a drop of {decline['drop_to_max_n']:.3f} ± {decline['drop_se']:.3f} from the peak"
  if peak == len(result["n"]) - 1:
    drop = "the gold is highest at the largest n: no decline"
  elif decline["drop_se"] > 0:
    drop += (f" (paired over prompts, {decline['drop_to_max_n'] / decline['drop_se']:.1f} SE; "
             f"{decline['drop_critical_z']:.1f} SE is the 2.3% level for a peak picked "
             f"from {len(result['n'])} values of n)")
  else:  # one prompt: no SE
    drop = f"a drop of {decline['drop_to_max_n']:.3f} from the peak (one prompt: no SE)"
  lines += ["", f"Gold peaks at n = {result['n'][peak]} ({result['gold'][peak]:+.3f}); "
            f"at n = {result['n'][-1]} the proxy is {result['proxy'][-1]:+.3f} and the gold "
            f"{result['gold'][-1]:+.3f}: {drop}. Over prompt resamples the peak is at "
            + ", ".join(f"n = {n} in {f:.0%}" for n, f in shares[:4]) + ".", "",
            "![best-of-n](figures/bon.png)", ""]
  if "safety_filter" in result:
    lines += filtered.filter_markdown(result["safety_filter"])
  return "\n".join(lines)
