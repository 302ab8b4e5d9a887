"""Figures shared by the binaries: gold and proxy scores against √KL (overoptimization curves).

Gao et al. (2022), "Scaling Laws for Reward Model Overoptimization"
(arXiv 2210.10760) plot the gold and proxy reward of optimised policies
against d = √KL(π‖π_ref); best-of-n and RL runs here draw the same figure.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

COLORS = {"proxy": "tab:orange", "gold": "tab:blue"}


def plot_scores_vs_sqrt_kl(sqrt_kl: Sequence[float],
                           scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                           path: str, *, xlabel: str, ylabel: str, title: str) -> None:
  """Writes a PNG of each score (mean ± one standard error) against √KL, in step order.

  Args:
    sqrt_kl: x values, ``[P]``.
    scores: name (e.g. ``proxy``, ``gold``) -> (means ``[P]``, standard errors ``[P]``).
    path: output PNG; its directory is created.
    xlabel, ylabel, title: axis labels and title.
  """
  x = np.asarray(sqrt_kl, np.float64)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, (mean, se) in scores.items():
    y, se = np.asarray(mean, np.float64), np.asarray(se, np.float64)
    # Error bars, not bands: an RL run's KL need not grow monotonically with the step.
    ax.errorbar(x, y, yerr=se, fmt="o-", color=COLORS.get(name), label=name, markersize=3,
                capsize=2)
  ax.axhline(0.0, color="gray", lw=0.5)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
