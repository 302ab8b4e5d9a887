"""How well AI labels agree with human ones, position bias, and annotator agreement (PandaLM).

Agreement on a pair is 1 when the AI's P(A) and the human label are on the same side
of ½, 0 when opposite, ½ when P(A) = ½ exactly; pairs with a human tie are left out.
Intervals are bootstrap percentiles over pairs (``prefjax.evals.stats``), one set of
resamples for every statistic of a report, so they are paired; ``groups`` (see
`stats.prompt_groups`) resamples the pairs of one prompt together.

Position bias is the mean P(first slot wins) − ½ over the questions asked. Before
averaging, that is over both presentations of every pair; the order-averaged label
gives the first slot P(A) in one order and 1 − P(A) in the other, so its bias is 0
by construction (reported as measured). ``order_flip_rate`` is the fraction of pairs
whose decision changes with the order.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from prefjax.evals import stats

_VOTE_OUTCOME = {0: 0.5, 1: 1.0, 2: 0.0}


def agreement_values(p_a: np.ndarray, outcome: np.ndarray) -> np.ndarray:
  """Per pair 1 / ½ / 0 agreement of P(A) with a human outcome (1 = A preferred)."""
  p_a, outcome = np.asarray(p_a, np.float64), np.asarray(outcome, np.float64)
  same = np.sign(p_a - 0.5) == np.sign(outcome - 0.5)
  return np.where(p_a == 0.5, 0.5, same.astype(np.float64))


def _estimate(values: np.ndarray, select: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
  out = stats.weighted_estimate(values, counts, select).as_dict()
  out["num_pairs"] = int(np.sum(select))
  return out


def human_agreement(p_a_first: Sequence[float], p_a_second: Sequence[float],
                    outcome: Sequence[float], *, num_resamples: int = 1000,
                    seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Any]:
  """Agreement for each order and for the average, and the position bias of single orders
  (averaging the two orders removes it by construction, so that is not reported)."""
  first, second = np.asarray(p_a_first, np.float64), np.asarray(p_a_second, np.float64)
  outcome = np.asarray(outcome, np.float64)
  average = 0.5 * (first + second)
  decisive = outcome != 0.5
  counts = stats.resample_counts(first.size, num_resamples, seed, groups)
  report: dict[str, Any] = {"num_pairs": int(first.size), "num_human_ties": int(np.sum(~decisive)),
                            "pairs_sharing_a_prompt": stats.repeated_items(groups)}
  for name, p in (("a_first", first), ("a_second", second), ("average", average)):
    report[f"agreement_{name}"] = _estimate(agreement_values(p, outcome), decisive, counts)
  every = np.ones(first.size, bool)
  # P(first slot wins), averaged over the two presentations of each pair.
  before = 0.5 * (first + (1.0 - second)) - 0.5
  report["position_bias_before"] = _estimate(before, every, counts)
  report["p_first_wins_a_first_order"] = float(np.mean(first))
  report["p_first_wins_b_first_order"] = float(np.mean(1.0 - second))
  flips = (np.sign(first - 0.5) != np.sign(second - 0.5)).astype(np.float64)
  report["order_flip_rate"] = _estimate(flips, every, counts)
  return report


def annotator_agreement(p_a: Sequence[float], votes: Sequence[Sequence[int]], *,
                        num_resamples: int = 1000, seed: int = 0,
                        groups: np.ndarray | None = None) -> dict[str, Any]:
  """PandaLM: the labeller against each annotator, beside each annotator pair's agreement.

  ``votes[i]`` are annotator votes for pair i: 1 = A, 2 = B, 0 = tie. Agreement with
  annotator k is over the pairs k did not call a tie; between annotators j, k over the
  pairs neither called a tie.
  """
  p_a = np.asarray(p_a, np.float64)
  outcomes = np.asarray([[_VOTE_OUTCOME[int(v)] for v in row] for row in votes], np.float64)
  if outcomes.ndim != 2 or outcomes.shape[0] != p_a.size:
    raise ValueError(f"votes must be [num_pairs, num_annotators]; got shape {outcomes.shape} "
                     f"for {p_a.size} pairs")
  counts = stats.resample_counts(p_a.size, num_resamples, seed, groups)
  report: dict[str, Any] = {"num_pairs": int(p_a.size)}
  for k in range(outcomes.shape[1]):
    report[f"labeller_vs_annotator{k + 1}"] = _estimate(
        agreement_values(p_a, outcomes[:, k]), outcomes[:, k] != 0.5, counts)
  for j, k in itertools.combinations(range(outcomes.shape[1]), 2):
    both = (outcomes[:, j] != 0.5) & (outcomes[:, k] != 0.5)
    same = (outcomes[:, j] == outcomes[:, k]).astype(np.float64)
    report[f"annotator{j + 1}_vs_annotator{k + 1}"] = _estimate(same, both, counts)
  return report


def markdown(report: dict[str, Any]) -> str:
  """The agreement report as a two-column Markdown table (value [95% CI], pairs)."""
  lines = ["| statistic | value [95% CI] | pairs |", "|---|---|---|"]
  for key, value in report.items():
    if isinstance(value, dict) and "value" in value:
      lines.append(f"| {key} | {value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}] | "
                   f"{value.get('num_pairs', '')} |")
    elif isinstance(value, (int, float)):
      lines.append(f"| {key} | {value:.4g} | |")
  return "\n".join(lines) + "\n"
