"""Reward-model evaluation on held-out preference pairs.

Everything here works on host NumPy arrays of per-pair rewards, so the same code
scores a single RM, each ensemble member, or an aggregation of ensemble members.
Metrics follow common practice: pairwise accuracy (equal scores count half, as
RewardBench scores its generative judges; its classifier RMs count them wrong), mean margin, Bradley–Terry log-loss, expected calibration error of
σ(Δ) (Guo et al. 2017, "On Calibration of Modern Neural Networks",
arXiv 1706.04599), accuracy by response-length bucket and ``chosen_longer_rate``, the rate
at which the PREFERRED response is the longer (the chosen one, or the rejected where
``outcome`` < ½; length-bias slice; Singhal et al. 2023, arXiv 2310.03716).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from prefjax import files


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def _check_pairs(r_chosen: np.ndarray, r_rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  r_chosen = np.asarray(r_chosen, np.float64)
  r_rejected = np.asarray(r_rejected, np.float64)
  if r_chosen.shape != r_rejected.shape or r_chosen.ndim != 1:
    raise ValueError(f"expected two [B] reward arrays, got {r_chosen.shape} and {r_rejected.shape}")
  if not (np.all(np.isfinite(r_chosen)) and np.all(np.isfinite(r_rejected))):
    raise ValueError("non-finite rewards in evaluation")
  return r_chosen, r_rejected


def pair_accuracy(signed_margin: np.ndarray) -> np.ndarray:
  """Per-pair correctness from margins oriented so positive = preferred side higher (0.5 on equality)."""
  signed_margin = np.asarray(signed_margin, np.float64)
  return np.where(signed_margin > 0, 1.0, np.where(signed_margin == 0, 0.5, 0.0))


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, num_bins: int = 10,
                               weights: np.ndarray | None = None):
  """ECE = Σ_b (n_b / n)·|mean(label)_b − mean(prob)_b| over equal-width probability bins.

  Written as Σ_b |Σ_{i∈b} (label_i − prob_i)| / n, so ``weights`` ``[R, N]`` (e.g.
  bootstrap resample counts) give R weighted ECEs in one product; the result is then
  an ``[R]`` array, otherwise a float.
  """
  prob = np.asarray(prob, np.float64)
  label = np.asarray(label, np.float64)
  bins = np.clip((prob * num_bins).astype(int), 0, num_bins - 1)
  gaps = np.zeros((prob.size, num_bins))
  np.add.at(gaps, (np.arange(prob.size), bins), label - prob)
  if weights is None:
    return float(np.abs(gaps.sum(axis=0)).sum() / prob.size)
  weights = np.asarray(weights, np.float64)
  return np.abs(weights @ gaps).sum(axis=1) / weights.sum(axis=1)


def reliability_diagram(prob: np.ndarray, label: np.ndarray, num_bins: int = 10) -> dict[str, list]:
  """Per-bin (confidence, observed frequency, count) for a reliability plot."""
  prob = np.asarray(prob, np.float64)
  label = np.asarray(label, np.float64)
  bins = np.clip((prob * num_bins).astype(int), 0, num_bins - 1)
  conf, freq, count = [], [], []
  for b in range(num_bins):
    sel = bins == b
    count.append(int(sel.sum()))
    conf.append(float(prob[sel].mean()) if sel.any() else float((b + 0.5) / num_bins))
    freq.append(float(label[sel].mean()) if sel.any() else float("nan"))
  return {"confidence": conf, "frequency": freq, "count": count,
          "edges": list(np.linspace(0.0, 1.0, num_bins + 1))}


def length_bucket_accuracy(correct: np.ndarray, chosen_len: np.ndarray, rejected_len: np.ndarray,
                           edges: Sequence[int] = (64, 128, 256, 512)) -> dict[str, float]:
  """Accuracy by mean response length (tokens) bucket, keyed ``len_lt_64``, ``len64-128``, ...,
  ``len_ge_512`` (names TensorBoard keeps as they are, like every metric name)."""
  mean_len = (np.asarray(chosen_len) + np.asarray(rejected_len)) / 2
  bounds = [0, *edges, np.inf]
  out = {}
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    sel = (mean_len >= lo) & (mean_len < hi)
    if not sel.any():
      continue
    key = f"len_lt_{hi}" if lo == 0 else (f"len_ge_{lo}" if np.isinf(hi) else f"len{lo}-{hi}")
    out[key] = float(np.mean(np.asarray(correct)[sel]))
  return out


def both_orders(signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """P(a ≻ b) = σ(r_a − r_b) and its label for both orders (a, b) and (b, a) of each pair,
  from ``signed`` margins (> 0: the preferred side scored higher): ``[2B]`` each.

  With the preferred side first every label is 1, and the ECE of σ(Δ) alone would reward
  overconfidence; both orders balance the labels.
  """
  prob = 1.0 / (1.0 + np.exp(-np.asarray(signed, np.float64)))
  return np.concatenate([prob, 1.0 - prob]), np.concatenate([np.ones_like(prob),
                                                              np.zeros_like(prob)])


@dataclasses.dataclass
class PreferenceEval:
  """Result of ``evaluate_preferences``; ``metrics`` is flat and JSON-ready."""
  metrics: dict[str, float]
  reliability: dict[str, list]


def evaluate_preferences(r_chosen: np.ndarray, r_rejected: np.ndarray, *,
                         outcome: np.ndarray | None = None,
                         chosen_len: np.ndarray | None = None,
                         rejected_len: np.ndarray | None = None,
                         subsets: Sequence[str] | None = None,
                         num_bins: int = 10) -> PreferenceEval:
  """Scores per-pair rewards against labels.

  Args:
    r_chosen, r_rejected: [B] rewards of the two sides.
    outcome: optional [B] labels (1 chosen preferred, 0 rejected preferred, 0.5 tie);
      default all 1. Ties are excluded from accuracy/ECE and counted.
    chosen_len, rejected_len: optional [B] response lengths for the length-bias slice.
    subsets: optional [B] subset names for per-subset accuracy (RewardBench style).

  ``ece`` and ``reliability`` score P(a ≻ b) = σ(r_a − r_b) over both orders of each
  pair (as ``eval_rm`` and ``train_rm``'s evaluator report it); ``ece_chosen_first`` over
  the (chosen, rejected) order alone, labelled by ``outcome`` (all 1 with the default).
  """
  r_chosen, r_rejected = _check_pairs(r_chosen, r_rejected)
  margin = r_chosen - r_rejected
  outcome = np.ones_like(margin) if outcome is None else np.asarray(outcome, np.float64)
  if outcome.shape != margin.shape:
    raise ValueError(f"outcome has shape {outcome.shape}; the rewards have {margin.shape}")
  decisive = outcome != 0.5
  signed = np.where(outcome >= 0.5, margin, -margin)[decisive]
  correct = pair_accuracy(signed)
  prob = 1.0 / (1.0 + np.exp(-margin[decisive]))
  label = (outcome[decisive] >= 0.5).astype(np.float64)
  both_prob, both_label = both_orders(signed)
  metrics = {
      "accuracy": float(correct.mean()) if correct.size else float("nan"),
      "mean_margin": float(signed.mean()) if signed.size else float("nan"),
      "bt_log_loss": float(-_log_sigmoid(signed).mean()) if signed.size else float("nan"),
      "ece": expected_calibration_error(both_prob, both_label, num_bins),
      "ece_chosen_first": expected_calibration_error(prob, label, num_bins),
      "num_pairs": float(margin.size),
      "num_ties": float((~decisive).sum()),
      "reward_mean": float(np.concatenate([r_chosen, r_rejected]).mean()),
      "reward_std": float(np.concatenate([r_chosen, r_rejected]).std()),
  }
  if chosen_len is not None and rejected_len is not None:
    c_len = np.asarray(chosen_len)[decisive]
    r_len = np.asarray(rejected_len)[decisive]
    preferred_len = np.where(label > 0, c_len, r_len)
    other_len = np.where(label > 0, r_len, c_len)
    # The preferred side's (named for the usual outcome 1; reward_eval's preferred_longer_rate).
    metrics["chosen_longer_rate"] = float(np.mean(preferred_len > other_len))
    metrics["length_baseline_accuracy"] = float(np.mean(pair_accuracy(preferred_len - other_len)))
    for key, acc in length_bucket_accuracy(correct, c_len, r_len).items():
      metrics[f"accuracy/{key}"] = acc
  if subsets is not None:
    names = np.asarray(subsets)[decisive]
    for name in sorted(set(names.tolist())):
      metrics[f"accuracy/subset/{name}"] = float(correct[names == name].mean())
  return PreferenceEval(metrics, reliability_diagram(both_prob, both_label, num_bins))


def ensemble_disagreement(member_margins: np.ndarray) -> Mapping[str, float]:
  """Disagreement of K members on [B, K] margins: mean std of margins, and sign-disagreement rate."""
  m = np.asarray(member_margins, np.float64)
  if m.ndim != 2:
    raise ValueError(f"member_margins must be [B, K], got {m.shape}")
  signs = np.sign(m)
  disagree = np.any(signs != signs[:, :1], axis=1)
  return {"member_margin_std": float(m.std(axis=1).mean()),
          "member_sign_disagreement": float(disagree.mean())}


def plot_reliability(curves: Mapping[str, Mapping[str, list]], path: str, title: str = "", *,
                     xlabel: str = "predicted P(chosen ≻ rejected) = σ(Δ)") -> None:
  """Writes a reliability diagram PNG: one line per ``{label: reliability_diagram(...)}``.

  Each bin's bar is the binomial SE a calibrated scorer's frequency would have there,
  √(p(1 − p)/n) at the bin's mean confidence p over its n predictions: a point beyond
  two bars is miscalibration, one within them may be noise of a sparse bin."""
  from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
  fig = mpl_figure.Figure(figsize=(4.8, 4.5))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  for name, reliability in curves.items():
    count = np.asarray(reliability["count"], np.float64)
    ok = count > 0
    p = np.asarray(reliability["confidence"], np.float64)[ok]
    ax.errorbar(p, np.asarray(reliability["frequency"], dtype=float)[ok],
                yerr=np.sqrt(p * (1 - p) / count[ok]), fmt="o-", markersize=3, capsize=2,
                lw=1, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("observed frequency (±1 SE if calibrated)")
  ax.set_title(title or "reliability", fontsize=9)
  ax.legend(loc="upper left", fontsize=7)
  files.save_figure(fig, path)
