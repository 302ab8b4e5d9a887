"""Best-of-n behind a safety filter: rejected candidates never reach the proxy.

A candidate is REJECTED when its harm probability is ≥ ``threshold``; the proxy
picks the best of the remaining ones. When every candidate of a prompt is
rejected the selection FALLS BACK, explicitly, to the least harmful candidate
(equal harm: a tie, broken like any best-of-n tie), and the fallback is counted:
a deployment would refuse or regenerate there, which the count measures.

The filtered rule is best-of-n under one selection key, ``filtered_key``: safe
candidates keep their proxy score, rejected ones rank below every safe one, by
−harm. So the unbiased estimator of ``prefjax.overopt.bon`` (every n ≤ N from N
samples) applies unchanged, with the key as the "proxy".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from prefjax.overopt import bon


def filtered_key(proxy: ArrayLike, harm: ArrayLike, threshold: float) -> np.ndarray:
  """Selection key ``[P, N]``: the proxy where harm < threshold; elsewhere below every
  safe candidate's proxy, ordered by −harm."""
  proxy, harm, _ = bon._check_scores(proxy, harm)
  rejected = harm >= threshold
  # Harm in [0, 1] keeps the fallback ordering strictly below the smallest proxy.
  floor = proxy.min() - 2.0 - np.clip(harm, 0.0, 1.0)
  return np.where(rejected, floor, proxy)


class Selection(NamedTuple):
  """Best-of-N selection per prompt, ``[P]`` each."""
  index: np.ndarray
  fallback: np.ndarray
  num_rejected: np.ndarray


def select(proxy: ArrayLike, harm: ArrayLike, threshold: float | None) -> Selection:
  """Best of all N candidates per prompt (first maximum), filtered when ``threshold`` is set."""
  proxy_arr, harm_arr, _ = bon._check_scores(proxy, harm)
  if threshold is None:
    index = np.argmax(proxy_arr, axis=1)
    zeros = np.zeros(proxy_arr.shape[0], int)
    return Selection(index, zeros.astype(bool), zeros)
  rejected = harm_arr >= threshold
  index = np.argmax(filtered_key(proxy_arr, harm_arr, threshold), axis=1)
  return Selection(index, rejected.all(axis=1), rejected.sum(axis=1))


def fallback_probability(num_rejected: ArrayLike, num_samples: int, ns: ArrayLike) -> np.ndarray:
  """P(all n candidates rejected) ``[P, S]`` for a uniformly random n-subset of the N samples:
  C(k, n) / C(N, n) with k rejected samples (hypergeometric)."""
  k = np.asarray(num_rejected, np.float64)[:, None]
  ns = np.asarray(ns, np.float64)[None, :]
  log_p = (special.gammaln(k + 1) - special.gammaln(k - ns + 1) - special.gammaln(ns + 1)
           - (special.gammaln(num_samples + 1) - special.gammaln(num_samples - ns + 1)
              - special.gammaln(ns + 1)))
  return np.where(ns <= k, np.exp(np.where(ns <= k, log_p, 0.0)), 0.0)


def filtered_bon_scores(proxy: ArrayLike, harm: ArrayLike, threshold: float,
                        others: dict[str, ArrayLike], ns: ArrayLike) -> dict[str, np.ndarray]:
  """Unbiased per-prompt best-of-n expectations ``[P, S]`` with and without the filter.

  Returns ``{"<name>": unfiltered, "<name>_filtered": filtered}`` for ``proxy``,
  ``harm`` and every entry of ``others`` (e.g. gold), plus ``fallback``: the
  probability that the filter rejects all n candidates.
  """
  proxy_arr, harm_arr, _ = bon._check_scores(proxy, harm)
  key = filtered_key(proxy_arr, harm_arr, threshold)
  out = {}
  for name, values in {"proxy": proxy_arr, "harm": harm_arr, **others}.items():
    out[name] = bon.unbiased_bon_scores(proxy_arr, values, ns).gold
    out[f"{name}_filtered"] = bon.unbiased_bon_scores(key, values, ns).gold
  out["fallback"] = fallback_probability((harm_arr >= threshold).sum(axis=1),
                                         proxy_arr.shape[1], ns)
  return out


def filter_report(proxy: ArrayLike, gold: ArrayLike, harm: ArrayLike, threshold: float,
                  ns: ArrayLike, others: dict[str, ArrayLike] | None = None) -> dict:
  """JSON-ready best-of-n with and without the filter: prompt-mean raw scores per n (of
  proxy, harm, gold and ``others``, e.g. a programmatic harm beside a learned filter's),
  the fallback probability, and the best-of-N selection's fallback and rejection counts."""
  proxy_arr, harm_arr, _ = bon._check_scores(proxy, harm)
  scores = filtered_bon_scores(proxy_arr, harm_arr, threshold, {"gold": gold, **(others or {})},
                               ns)
  full = select(proxy_arr, harm_arr, threshold)
  out = {"threshold": float(threshold), "n": np.asarray(ns).tolist(),
         "rejected_fraction": float((harm_arr >= threshold).mean()),
         "fallbacks_at_n_max": int(full.fallback.sum()),
         "num_prompts": int(proxy_arr.shape[0])}
  out.update({name: values.mean(axis=0).tolist() for name, values in scores.items()})
  return out


def filter_markdown(report: dict) -> list[str]:
  """Markdown table lines of ``filter_report``."""
  names = ["harm", "proxy", "gold"] + [k for k in report if f"{k}_filtered" in report
                                       and k not in ("harm", "proxy", "gold")]
  lines = [f"## Safety filter (reject harm >= {report['threshold']:g})", "",
           f"{100 * report['rejected_fraction']:.1f}% of samples rejected; at n = "
           f"{report['n'][-1]} {report['fallbacks_at_n_max']} of {report['num_prompts']} "
           "prompts fell back to their least harmful sample (all rejected). Raw means:", "",
           "| n | " + " | ".join(f"{k} | {k} filtered" for k in names) + " | P(fallback) |",
           "|---:|" + "---:|---:|" * len(names) + "---:|"]
  for i, n in enumerate(report["n"]):
    cells = [report[k][i] for name in names for k in (name, f"{name}_filtered")]
    cells.append(report["fallback"][i])
    lines.append(f"| {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
  return lines + [""]
