"""Functional-form fits of gold reward vs distance from the reference policy.

Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization"
(arXiv:2210.10760), Eq. 1–2, with d = √KL(π ‖ π_ref) in nats^½:

* best-of-n:  R_bon(d) = d·(α − β·d)          peak at d* = α/(2β),        R* = α²/(4β)
* RL:         R_RL(d)  = d·(α − β·log d)      peak at d* = exp(α/β − 1),  R* = β·d*
* baseline:   R(KL)    = α·KL − β·KL²          peak at KL* = α/(2β),       R* = α²/(4β)

The baseline is a quadratic in KL with no intercept: like the Gao forms it has
two parameters and passes through the reference policy (R(0) = 0, the study
shifts every curve so that π_ref scores 0), so comparing RMSEs compares shapes,
not parameter counts. Writing it as α·KL − β·KL² keeps the sign convention
of the other forms (β > 0 means the curve turns over).

All three are linear in (α, β), so the fit is ordinary (or, with ``se``,
weighted by 1/SE²) least squares on a two-column design matrix, solved in
float64 with ``np.linalg.lstsq``; no iterative optimiser. For the RL form the
column d·log d is taken as 0 at d = 0 (its limit).

Confidence intervals:

* with ``per_prompt_gold`` ``[P, S]`` (and optionally ``per_prompt_kl``), percentile
  bootstrap intervals over prompts: prompts are resampled with replacement, the
  curve is re-averaged (x from the resampled mean KL, as the study's curves are
  built) and refitted. Use these for the points of one best-of-n or RL curve:
  they share their samples, so their errors are correlated;
* otherwise least-squares t-intervals (Student t with S − 2 degrees of freedom on
  the weighted residual variance), which hold for independent errors only. On
  best-of-n points that share samples they are far too narrow (95% intervals
  covered α 22% of the time in a simulation of 64 prompts), so such a fit warns.

``se`` weights the points by 1/SE², which is right for independent points of known
error. A best-of-n curve's SEs grow with n (30× from n = 2 to 256 on
``configs/bon/tiny.py``), so the weighting hands a misspecified form to its small-n
points; and the reference point's SE is zero up to rounding, which is refused.

``r2`` = 1 − SS_res/SS_tot and ``rmse`` = √(mean residual²) are unweighted, so
that fits of different forms (or weightings) of the same points compare
directly. Host-side float64 NumPy, like the rest of ``prefjax.overopt``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

FORMS = ("bon", "rl", "quadratic_kl")


class Fit(NamedTuple):
  """A fitted functional form; ``predict(fit, d)`` evaluates it at d = √KL."""
  form: str                          # "bon" | "rl" | "quadratic_kl"
  alpha: float
  beta: float
  alpha_ci: tuple[float, float]      # interval of level ``ci`` (see the module docstring)
  beta_ci: tuple[float, float]
  r2: float                          # unweighted 1 − SS_res/SS_tot
  rmse: float                        # unweighted √(mean residual²), in gold units
  peak_d: float                      # argmax over d ≥ 0 of the fit; inf if unbounded
  peak_value: float                  # fitted value at peak_d (inf if unbounded)
  n_points: int


def fit_bon(d: ArrayLike, gold: ArrayLike, *, se: ArrayLike | None = None,
            per_prompt_gold: ArrayLike | None = None,
            per_prompt_kl: ArrayLike | None = None, num_bootstrap: int = 1000,
            ci: float = 0.95, seed: int = 0) -> Fit:
  """Fits R_bon(d) = d·(α − β·d) (Gao et al. 2022, arXiv:2210.10760, best-of-n).

  Args:
    d: ``[S]`` √KL of each point (≥ 0, finite).
    gold: ``[S]`` mean gold score of each point (π_ref shifted to 0).
    se: optional ``[S]`` standard errors of independent ``gold`` points; weights 1/SE²
      (see the module docstring before weighting a best-of-n curve).
    per_prompt_gold: optional ``[P, S]`` per-prompt gold whose mean over prompts is
      ``gold``; switches the bootstrap to resampling prompts.
    per_prompt_kl: optional ``[P, S]`` per-prompt KL (nats) whose mean is d²; the
      bootstrap then recomputes d = √(mean KL) per resample (else d stays fixed).
    num_bootstrap: prompt resamples B (0: no intervals, CIs are NaN).
    ci: level of the percentile intervals.
    seed: NumPy seed of the bootstrap.

  Returns:
    A ``Fit``; ``peak_d`` = α/(2β) when β > 0 (clipped at 0).
  """
  return _fit("bon", d, gold, se, per_prompt_gold, per_prompt_kl, num_bootstrap, ci, seed)


def fit_rl(d: ArrayLike, gold: ArrayLike, *, se: ArrayLike | None = None,
           per_prompt_gold: ArrayLike | None = None,
           per_prompt_kl: ArrayLike | None = None, num_bootstrap: int = 1000,
           ci: float = 0.95, seed: int = 0) -> Fit:
  """Fits R_RL(d) = d·(α − β·log d) (Gao et al. 2022, arXiv:2210.10760, RL).

  Arguments as ``fit_bon``; d = 0 points are allowed (d·log d → 0). ``peak_d`` =
  exp(α/β − 1) when β > 0.
  """
  return _fit("rl", d, gold, se, per_prompt_gold, per_prompt_kl, num_bootstrap, ci, seed)


def fit_quadratic_kl(kl: ArrayLike, gold: ArrayLike, *, se: ArrayLike | None = None,
                     per_prompt_gold: ArrayLike | None = None,
                     per_prompt_kl: ArrayLike | None = None, num_bootstrap: int = 1000,
                     ci: float = 0.95, seed: int = 0) -> Fit:
  """Fits the baseline R(KL) = α·KL − β·KL² (two parameters, through the origin).

  Arguments as ``fit_bon`` except that the first is ``[S]`` KL in nats (not √KL).
  ``peak_d`` = √(α/(2β)) when β > 0; ``predict`` takes d like the other forms.
  """
  return _fit("quadratic_kl", kl, gold, se, per_prompt_gold, per_prompt_kl, num_bootstrap,
              ci, seed)


def predict(fit: Fit, d: ArrayLike) -> np.ndarray:
  """The fitted curve at d = √KL (any shape, d ≥ 0), float64."""
  d = np.asarray(d, np.float64)
  if not np.isfinite(d).all() or (d < 0).any():
    raise ValueError(f"predict: d must be finite and >= 0, got {d}")
  x = d * d if fit.form == "quadratic_kl" else d
  design = _design(fit.form, x.ravel())
  return (design @ np.array([fit.alpha, fit.beta])).reshape(d.shape)


def _design(form: str, x: np.ndarray) -> np.ndarray:
  """``[..., S, 2]`` columns whose combination with (α, β) is the form at x."""
  if form == "bon":
    second = -x * x
  elif form == "rl":
    with np.errstate(divide="ignore", invalid="ignore"):
      second = np.where(x > 0, -x * np.log(np.where(x > 0, x, 1.0)), 0.0)
  elif form == "quadratic_kl":
    second = -x * x
  else:
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
  return np.stack([x, second], axis=-1)


def _peak(form: str, alpha: float, beta: float) -> tuple[float, float]:
  """(argmax over d ≥ 0, max value): inf where the curve grows without bound."""
  if beta < 0 or (beta == 0 and alpha > 0):
    return float("inf"), float("inf")
  if beta == 0:
    return (0.0, 0.0) if alpha < 0 else (float("nan"), float("nan"))
  if form == "rl":
    peak_d = float(np.exp(alpha / beta - 1.0))
    return peak_d, beta * peak_d
  peak_x = max(alpha / (2.0 * beta), 0.0)           # d for bon, KL for quadratic_kl
  value = alpha * peak_x - beta * peak_x * peak_x
  return (peak_x if form == "bon" else float(np.sqrt(peak_x))), float(value)


def _solve(design: np.ndarray, y: np.ndarray, sqrt_w: np.ndarray) -> np.ndarray:
  coef, _, rank, _ = np.linalg.lstsq(design * sqrt_w[:, None], y * sqrt_w, rcond=None)
  if rank < 2:
    raise ValueError("the points do not determine (α, β): the design matrix has rank "
                     f"{rank} < 2 (need at least two distinct non-zero x values)")
  return coef


def _fit(form, x, gold, se, per_prompt_gold, per_prompt_kl, num_bootstrap, ci, seed) -> Fit:
  x, gold, sqrt_w, per_prompt_gold, per_prompt_kl = _check(
      form, x, gold, se, per_prompt_gold, per_prompt_kl)
  if num_bootstrap < 0 or num_bootstrap == 1:
    raise ValueError(f"num_bootstrap must be 0 or >= 2, got {num_bootstrap}")
  if not 0.0 < ci < 1.0:
    raise ValueError(f"ci must lie in (0, 1), got {ci}")
  _warn_unless_through_origin(form, x, gold)
  design = _design(form, x)
  coef = _solve(design, gold, sqrt_w)
  fitted = design @ coef
  residual = gold - fitted
  ss_res = float(residual @ residual)
  centred = gold - gold.mean()
  ss_tot = float(centred @ centred)
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("-inf"))
  rmse = float(np.sqrt(ss_res / len(gold)))
  if num_bootstrap == 0:
    alpha_ci = beta_ci = (float("nan"), float("nan"))
  else:
    rng = np.random.default_rng(seed)
    if per_prompt_gold is not None:
      samples = _prompt_bootstrap(form, x, per_prompt_gold, per_prompt_kl, sqrt_w,
                                  num_bootstrap, rng)
      tail = 100.0 * (1.0 - ci) / 2.0
      lo, hi = np.nanpercentile(samples, [tail, 100.0 - tail], axis=0)
    else:
      warnings.warn(f"fit_{form}: intervals from the points alone (t-intervals) assume "
                    "independent errors; the points of one best-of-n or RL curve share "
                    "their samples: pass per_prompt_gold for intervals over prompts",
                    stacklevel=3)
      lo, hi = _t_intervals(design, residual, sqrt_w, coef, ci)
    alpha_ci, beta_ci = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
  alpha, beta = float(coef[0]), float(coef[1])
  peak_d, peak_value = _peak(form, alpha, beta)
  return Fit(form, alpha, beta, alpha_ci, beta_ci, float(r2), rmse, peak_d, peak_value,
             len(gold))


def _warn_unless_through_origin(form: str, x: np.ndarray, gold: np.ndarray) -> None:
  """Every form is 0 at d = 0: a curve whose π_ref point is far from 0 (over 5% of its
  largest |gold|; sampling noise in a measured reference point stays below) was not
  shifted."""
  at_zero = gold[x == 0]
  if at_zero.size and np.abs(at_zero).max() > 0.05 * float(np.abs(gold).max()):
    warnings.warn(f"fit_{form}: gold at d = 0 is {float(at_zero[0]):.4g}, but the form is 0 "
                  "there: shift each prompt's curve so that π_ref scores 0 (subtract its "
                  "d = 0 value, as overopt.curves does) before fitting", stacklevel=4)


def _batched_solve(design: np.ndarray, y: np.ndarray, sqrt_w: np.ndarray) -> np.ndarray:
  """Least squares for a stack: design ``[B, S, 2]``, y ``[B, S]`` → ``[B, 2]``."""
  a = design * sqrt_w[..., None]
  # pinv (SVD) keeps a rank-deficient resample finite instead of raising.
  return np.einsum("bks,bs->bk", np.linalg.pinv(a), y * sqrt_w)


def _t_intervals(design, residual, sqrt_w, coef, ci) -> tuple[np.ndarray, np.ndarray]:
  """Least-squares intervals: coef ± t_{S−2} · √diag(σ̂² (AᵀA)⁻¹), A the weighted design.

  S counts the points the fit can miss: a point at d = 0 (the reference policy) has
  an all-zero design row, so its residual is 0 whatever α and β; counted, it would
  narrow the intervals (α covered 0.88 instead of 0.95 with it among 5 points).
  """
  a = design * sqrt_w[:, None]
  dof = int(np.any(a != 0, axis=1).sum()) - 2
  if dof < 1:
    raise ValueError(f"{dof + 2} points away from d = 0 cannot give intervals for 2 "
                     "parameters: at least 3 are needed")
  sigma2 = float(np.sum((residual * sqrt_w) ** 2)) / dof
  covariance = sigma2 * np.linalg.pinv(a.T @ a)
  half = stats.t.ppf(0.5 + ci / 2.0, dof) * np.sqrt(np.diag(covariance))
  return coef - half, coef + half


def _prompt_bootstrap(form, x, per_prompt_gold, per_prompt_kl, sqrt_w, num_bootstrap,
                      rng) -> np.ndarray:
  p = per_prompt_gold.shape[0]
  counts = rng.multinomial(p, np.full(p, 1.0 / p), size=num_bootstrap).astype(np.float64)
  gold_b = counts @ per_prompt_gold / p                       # [B, S]
  if per_prompt_kl is None:
    x_b = np.broadcast_to(x, gold_b.shape)
  else:
    kl_b = np.maximum(counts @ per_prompt_kl / p, 0.0)
    x_b = kl_b if form == "quadratic_kl" else np.sqrt(kl_b)
  return _batched_solve(_design(form, x_b), gold_b, np.broadcast_to(sqrt_w, gold_b.shape))


def _check(form, x, gold, se, per_prompt_gold, per_prompt_kl):
  name = "kl" if form == "quadratic_kl" else "d"
  x = np.asarray(x, np.float64)
  gold = np.asarray(gold, np.float64)
  if x.ndim != 1 or x.shape != gold.shape:
    raise ValueError(f"fit_{form}: {name} {x.shape} and gold {gold.shape} must be equal "
                     "1-D shapes [S]")
  if len(x) < 3:
    raise ValueError(f"fit_{form}: need at least 3 points to fit 2 parameters, got {len(x)}")
  for label, v in ((name, x), ("gold", gold)):
    if not np.isfinite(v).all():
      raise ValueError(f"fit_{form}: {label} has non-finite values at indices "
                       f"{np.flatnonzero(~np.isfinite(v)).tolist()}")
  if (x < 0).any():
    raise ValueError(f"fit_{form}: {name} must be >= 0, got min {x.min()}")
  if se is None:
    sqrt_w = np.ones_like(x)
  else:
    se = np.asarray(se, np.float64)
    if se.shape != x.shape or not np.isfinite(se).all() or (se <= 0).any():
      raise ValueError(f"fit_{form}: se must be finite, > 0 and shaped {x.shape}, got "
                       f"shape {se.shape}")
    tiny = np.flatnonzero(se <= 1e-9 * max(float(np.abs(gold).max()), 1e-12))
    if tiny.size:
      raise ValueError(f"fit_{form}: se at points {tiny.tolist()} is zero up to rounding "
                       f"({se[tiny].tolist()}; the reference point?): it would weigh "
                       "~1/se² against the rest; leave it out of a weighted fit")
    sqrt_w = 1.0 / se
  if per_prompt_kl is not None and per_prompt_gold is None:
    raise ValueError(f"fit_{form}: per_prompt_kl needs per_prompt_gold")
  if per_prompt_gold is not None:
    per_prompt_gold = _check_per_prompt(form, "per_prompt_gold", per_prompt_gold, x.shape)
    mean = per_prompt_gold.mean(axis=0)
    if not np.allclose(mean, gold, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(gold).max())):
      raise ValueError(f"fit_{form}: gold is not the mean over prompts of per_prompt_gold "
                       f"(max difference {np.abs(mean - gold).max():.3g})")
  if per_prompt_kl is not None:
    per_prompt_kl = _check_per_prompt(form, "per_prompt_kl", per_prompt_kl,
                                      per_prompt_gold.shape)
    if (per_prompt_kl < 0).any():
      raise ValueError(f"fit_{form}: per_prompt_kl must be >= 0 (clip tiny negatives)")
    mean_kl = per_prompt_kl.mean(axis=0)
    implied = mean_kl if form == "quadratic_kl" else np.sqrt(mean_kl)
    if not np.allclose(implied, x, rtol=1e-6, atol=1e-9):
      raise ValueError(f"fit_{form}: {name} does not match per_prompt_kl (mean over prompts"
                       f"{'' if form == 'quadratic_kl' else ', square-rooted'}); max "
                       f"difference {np.abs(implied - x).max():.3g}")
  return x, gold, sqrt_w, per_prompt_gold, per_prompt_kl


def _check_per_prompt(form: str, label: str, values: ArrayLike, shape: tuple) -> np.ndarray:
  values = np.asarray(values, np.float64)
  want = f"[P, {shape[-1]}]" if len(shape) == 1 else str(list(shape))
  if values.ndim != 2 or values.shape[1] != shape[-1] or (
      len(shape) == 2 and values.shape != shape):
    raise ValueError(f"fit_{form}: {label} must be {want}, got {values.shape}")
  if values.shape[0] < 2:
    raise ValueError(f"fit_{form}: {label} needs at least 2 prompts to bootstrap")
  if not np.isfinite(values).all():
    raise ValueError(f"fit_{form}: {label} has non-finite values")
  return values
