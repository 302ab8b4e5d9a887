"""Figures shared by the binaries: gold and proxy scores against √KL (overoptimization curves).

Gao et al. (2022), "Scaling Laws for Reward Model Overoptimization"
(arXiv 2210.10760) plot the gold and proxy reward of optimised policies
against d = √KL(π‖π_ref); best-of-n and RL runs here draw the same figure.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib import figure as mpl_figure
import numpy as np

from prefjax import files

COLORS = {"proxy": "tab:orange", "gold": "tab:blue"}


def plot_scores_vs_sqrt_kl(sqrt_kl: Sequence[float],
                           scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                           path: str, *, xlabel: str, ylabel: str, title: str,
                           steps: Sequence[int] | None = None,
                           sqrt_kl_se: Sequence[float] | None = None) -> None:
  """Writes a PNG of each score (mean ± one standard error) against √KL, one panel each.

  Each score gets its own y axis: a reward model's proxy and a gold score are in different
  units, and on a shared axis the smaller one looks flat. With ``steps`` (an RL run, whose
  KL need not grow with the step) the points are coloured by step and a second column
  draws each score against the step, so a curve that folds back reads as it ran.

  Args:
    sqrt_kl: x values, ``[P]``.
    scores: name (e.g. ``proxy``, ``gold``) -> (means ``[P]``, standard errors ``[P]``).
    path: output PNG; its directory is created.
    xlabel, ylabel, title: the √KL axis label, the y label (prefixed by each score's
      name) and the title.
    steps: ``[P]`` training steps of the points, or None (best-of-n: x grows with n).
    sqrt_kl_se: ``[P]`` standard errors of √KL, drawn as horizontal bars.
  """
  x = np.asarray(sqrt_kl, np.float64)
  columns = 1 if steps is None else 2
  fig = mpl_figure.Figure(figsize=(5.5 * columns, 3.2 * len(scores)))
  axes = fig.subplots(len(scores), columns, squeeze=False, sharex="col")
  for row, (name, (mean, se)) in enumerate(scores.items()):
    y, se = np.asarray(mean, np.float64), np.asarray(se, np.float64)
    ax = axes[row, 0]
    # Error bars, not bands: an RL run's KL need not grow monotonically with the step.
    ax.errorbar(x, y, yerr=se, xerr=sqrt_kl_se, fmt="-", color=COLORS.get(name), lw=0.8,
                alpha=0.6, capsize=2)
    if steps is None:
      ax.plot(x, y, "o", color=COLORS.get(name), markersize=3)
    else:
      dots = ax.scatter(x, y, c=np.asarray(steps), cmap="viridis", s=16, zorder=3)
      axes[row, 1].errorbar(steps, y, yerr=se, fmt="o-", color=COLORS.get(name),
                            markersize=3, capsize=2)
      fig.colorbar(dots, ax=ax, label="step")
    for a in axes[row]:
      a.axhline(0.0, color="gray", lw=0.5)
      a.set_ylabel(f"{name}: {ylabel}")
      a.grid(alpha=0.3)
  axes[-1, 0].set_xlabel(xlabel)
  if steps is not None:
    axes[-1, 1].set_xlabel("training step")
  fig.suptitle(title)
  files.save_figure(fig, path)
