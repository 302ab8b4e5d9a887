"""Which way an eval metric ranks checkpoints: the direction its name implies."""

from __future__ import annotations

import difflib
import re

from prefjax import configlib

HIGHER_IS_BETTER = frozenset({"accuracy", "accuracies", "acc", "auc", "auroc", "f1",
                              "precision", "recall", "agreement", "spearman", "kendall",
                              "pearson", "win", "winrate"})
LOWER_IS_BETTER = frozenset({"loss", "nll", "error", "err", "kl", "perplexity", "ppl", "ece",
                             "brier", "mse", "mae", "rmse"})


def best_mode_for(metric: str, mode: str | None = None) -> str:
  """``mode`` if given, else the direction the name of eval metric ``metric`` implies:
  ``max`` for accuracy-like words (accuracy, auc, f1, win, ...), ``min`` for loss-like
  ones (loss, nll, error, kl, mse, ...), reversed by a ``neg`` word (``neg_mse``).

  Raises ``ConfigError`` when ``mode`` is not min/max, or is None and the name
  says neither or both.
  """
  if mode is not None:
    if mode not in ("min", "max"):
      raise configlib.ConfigError(f"loop.best_mode={mode!r}; expected 'min' or 'max'")
    return mode
  words = set(re.split(r"[^a-z0-9]+", metric.lower()))
  higher, lower = bool(words & HIGHER_IS_BETTER), bool(words & LOWER_IS_BETTER)
  if higher == lower:
    near = sorted({m for w in words for m in difflib.get_close_matches(
        w, HIGHER_IS_BETTER | LOWER_IS_BETTER, n=1, cutoff=0.8)})
    typo = f"a typo of {' or '.join(map(repr, near))}? Else " if near else ""
    raise configlib.ConfigError(
        f"loop.best_metric={metric!r}: {typo}set loop.best_mode to 'min' or 'max' (the name "
        "does not say whether lower or higher is better)")
  return "max" if higher != ("neg" in words) else "min"
