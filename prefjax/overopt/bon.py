"""Best-of-n from samples: the analytic KL, the unbiased estimator, bootstrap errors.

Best-of-n (BoN) draws n responses from the reference policy π_ref and keeps
the one the proxy reward scores highest. This module estimates, from N ≥ n
samples per prompt that were already drawn and scored, the expected proxy and
gold scores of BoN for every n ≤ N at once, as in Nakano et al. (WebGPT,
arXiv:2112.09332) and Gao et al., "Scaling Laws for Reward Model
Overoptimization", arXiv:2210.10760. Exact best-of-n over a finite candidate
set with a known π_ref lives in ``prefjax.overopt.exact``.

The estimators are float64 NumPy/SciPy: they are evaluation tools, and the
binomial weights overflow any float32 computation for N in the thousands.
``select_best_of_n`` is the jit-safe selection step used when actually
generating with best-of-n.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from scipy import special

_WEIGHT_CHUNK_ELEMENTS = 1 << 22


def bon_kl(n: ArrayLike) -> np.ndarray:
  """Analytic KL of best-of-n from the reference policy: ``log n − (n − 1)/n``.

  This is the KL for a continuous (tie-free) reward distribution, used by
  Stiennon et al., "Learning to summarize from human feedback",
  arXiv:2009.01325 and Gao et al., arXiv:2210.10760. Beirami et al., "Theoretical
  guarantees on the best-of-n alignment policy", arXiv:2401.01879, prove it is
  an UPPER BOUND on the true KL, which is strictly smaller when the reference
  distribution has atoms (finite candidate sets, repeated samples); use
  ``prefjax.overopt.exact`` for the exact value there.

  Args:
    n: number of samples, scalar or array, n ≥ 1 (real n is accepted).

  Returns:
    float64 KL in nats, same shape as ``n``.
  """
  n = np.asarray(n, np.float64)
  if np.any(~np.isfinite(n)) or np.any(n < 1):
    raise ValueError(f"bon_kl: n must be finite and >= 1, got {n}")
  return np.log(n) - (n - 1.0) / n


def select_best_of_n(rewards: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """Index of the highest-reward candidate per prompt, ``[..., n] -> [...]`` int32.

  With ``key``, ties are broken uniformly at random, the convention under which
  ``unbiased_bon_scores`` and ``exact_bon_scores`` are exact; without it the
  first maximum wins. Pure and jit-safe; the rewards must be finite, which
  ``prefjax.rewards`` guarantees: a row holding a NaN gets an arbitrary index (the
  NaN's without ``key``, 0 with it).
  """
  rewards = jnp.asarray(rewards)
  if key is None:
    return jnp.argmax(rewards, axis=-1).astype(jnp.int32)
  is_max = rewards == jnp.max(rewards, axis=-1, keepdims=True)
  noise = jax.random.uniform(key, rewards.shape)
  return jnp.argmax(jnp.where(is_max, noise, -1.0), axis=-1).astype(jnp.int32)


def log_spaced_ns(n_max: int, num: int) -> np.ndarray:
  """Distinct integers from 1 to ``n_max`` spaced (about) log-uniformly; at most ``num``."""
  if n_max < 1 or num < 1:
    raise ValueError(f"log_spaced_ns: need n_max >= 1 and num >= 1, got {n_max}, {num}")
  grid = np.round(np.logspace(0.0, np.log10(n_max), num)).astype(np.int64)
  return np.unique(np.clip(grid, 1, n_max))


def unbiased_bon_weights(num_samples: int, ns: ArrayLike) -> np.ndarray:
  """Probability that the i-th smallest of N samples is the best of a random n-subset.

  ``W[s, i − 1] = C(i − 1, n_s − 1) / C(N, n_s)`` for i ≥ n_s and 0 otherwise,
  computed with ``gammaln`` in float64 (no overflow for any N). Each row sums
  to one.

  Args:
    num_samples: N, the number of samples per prompt.
    ns: ``[S]`` integers in [1, N].

  Returns:
    ``[S, N]`` float64 weights over samples sorted in ascending proxy order.
  """
  ns = _check_ns(ns, num_samples)
  i = np.arange(1, num_samples + 1, dtype=np.float64)[None, :]
  n = ns.astype(np.float64)[:, None]
  big_n = float(num_samples)
  log_total = special.gammaln(big_n + 1) - special.gammaln(n + 1) - special.gammaln(big_n - n + 1)
  valid = i >= n
  safe_i = np.where(valid, i, n)
  log_w = (special.gammaln(safe_i) - special.gammaln(n) - special.gammaln(safe_i - n + 1)
           - log_total)
  return np.where(valid, np.exp(log_w), 0.0)


def tie_averaged_scores(sorted_proxy: np.ndarray, sorted_scores: np.ndarray) -> np.ndarray:
  """Replaces each score by the mean score of its group of tied proxy values.

  When several samples of a random subset share the maximal proxy value, best-of-n
  is taken to break the tie uniformly at random among them. By symmetry each tied
  sample is then equally likely to be kept, so the expected score of the group
  is its plain mean; the probability that the group holds the maximum is the sum
  of the order-statistic weights of its positions. Inputs are ``[P, N]`` sorted by
  proxy along the last axis.
  """
  p, n = sorted_proxy.shape
  starts = np.ones((p, n), bool)
  starts[:, 1:] = sorted_proxy[:, 1:] != sorted_proxy[:, :-1]
  if starts.all():
    return sorted_scores
  group = np.cumsum(starts, axis=1) - 1 + n * np.arange(p)[:, None]
  sums = np.bincount(group.ravel(), weights=sorted_scores.ravel(), minlength=p * n)
  counts = np.bincount(group.ravel(), minlength=p * n)
  return (sums / np.maximum(counts, 1))[group]


class BonScores(NamedTuple):
  """Per-prompt expected best-of-n scores, ``[P, S]`` float64 each."""
  proxy: np.ndarray
  gold: np.ndarray


def unbiased_bon_scores(proxy: ArrayLike, gold: ArrayLike,
                        ns: ArrayLike | None = None) -> BonScores:
  """Unbiased best-of-n estimates of the expected proxy and gold scores, per prompt.

  For N samples of a prompt sorted by proxy (ascending), the i-th smallest is the
  best of a uniformly random n-subset (drawn without replacement) with
  probability C(i − 1, n − 1) / C(N, n), so
  E[score of best-of-n] = Σ_i C(i − 1, n − 1) / C(N, n) · score_(i),
  an unbiased estimate of best-of-n under the sampling distribution, for every
  n ≤ N at once (Nakano et al., arXiv:2112.09332, Appendix; Gao et al.,
  arXiv:2210.10760). Ties in the proxy are broken uniformly at random (see
  ``tie_averaged_scores``).

  Args:
    proxy: ``[P, N]`` (or ``[N]``) proxy rewards of N samples per prompt.
    gold: same shape, gold rewards of the same samples.
    ns: ``[S]`` integers in [1, N] (default: every n from 1 to N).

  Returns:
    ``BonScores`` of shape ``[P, S]`` (``[S]`` for 1-D input).
  """
  proxy, gold, squeeze = _check_scores(proxy, gold)
  num_samples = proxy.shape[1]
  ns = np.arange(1, num_samples + 1) if ns is None else ns
  ns = _check_ns(ns, num_samples)
  order = np.argsort(proxy, axis=1, kind="stable")
  sorted_proxy = np.take_along_axis(proxy, order, axis=1)
  sorted_gold = tie_averaged_scores(sorted_proxy, np.take_along_axis(gold, order, axis=1))
  # The weight matrix is [S, N]; build it in row chunks so that every n ≤ N of a
  # large N (S = N = 10⁴ would be 800 MB) stays within a few tens of MB.
  chunk = max(1, _WEIGHT_CHUNK_ELEMENTS // num_samples)
  proxy_out, gold_out = [], []
  for start in range(0, len(ns), chunk):
    weights = unbiased_bon_weights(num_samples, ns[start:start + chunk])
    proxy_out.append(sorted_proxy @ weights.T)
    gold_out.append(sorted_gold @ weights.T)
  result = BonScores(np.concatenate(proxy_out, axis=1), np.concatenate(gold_out, axis=1))
  return BonScores(*(x[0] for x in result)) if squeeze else result


class Curve(NamedTuple):
  """Scores and KL along an optimisation knob, averaged over prompts.

  ``knob`` is n for best-of-n and β for the RL path. Means are over prompts;
  ``*_se`` are bootstrap standard errors over prompts; ``per_prompt_*`` hold the
  ``[P, S]`` values they came from (for seed/world averaging and custom errors).
  """
  knob: np.ndarray
  kl: np.ndarray
  proxy: np.ndarray
  gold: np.ndarray
  kl_se: np.ndarray
  proxy_se: np.ndarray
  gold_se: np.ndarray
  per_prompt_kl: np.ndarray
  per_prompt_proxy: np.ndarray
  per_prompt_gold: np.ndarray


def bootstrap_mean_se(per_prompt: ArrayLike, num_bootstrap: int = 1000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Mean over prompts and its bootstrap standard error (prompts resampled with replacement).

  Args:
    per_prompt: ``[P, ...]`` values, one row per prompt.
    num_bootstrap: number of bootstrap resamples B (≥ 2).
    seed: NumPy seed of the resampling.

  Returns:
    ``(mean, se)``, each of shape ``[...]``, float64. With a single prompt the
    standard error is NaN (it cannot be estimated), never a fake zero.
  """
  values = np.asarray(per_prompt, np.float64)
  if values.ndim == 0 or values.shape[0] == 0:
    raise ValueError(f"bootstrap_mean_se: need [P, ...] with P >= 1, got {values.shape}")
  if num_bootstrap < 2:
    raise ValueError(f"bootstrap_mean_se: num_bootstrap must be >= 2, got {num_bootstrap}")
  p = values.shape[0]
  flat = values.reshape(p, -1)
  mean = flat.mean(axis=0)
  if p == 1:
    return mean.reshape(values.shape[1:]), np.full(values.shape[1:], np.nan)
  rng = np.random.default_rng(seed)
  # Multinomial counts instead of index arrays: memory B·P + B·S, not B·P·S.
  counts = rng.multinomial(p, np.full(p, 1.0 / p), size=num_bootstrap).astype(np.float64)
  resampled = counts @ flat / p
  se = resampled.std(axis=0, ddof=1)
  return mean.reshape(values.shape[1:]), se.reshape(values.shape[1:])


class Decline(NamedTuple):
  """How far a curve ``[P, S]`` falls from its peak to its last point, and whether that is
  evidence of a decline once the peak's choice is accounted for.

  ``z = drop / se`` reads as a z-score only for a peak fixed in advance. Here the peak
  is the curve's own argmax, so with many points a flat curve's noise alone clears
  ``z ≥ 2`` far more often than 2.3% of the time (11 noisy points: 11–14%). The test
  is therefore ``z ≥ critical_z``: the bootstrap-t max critical value over every point
  that could have been the peak (Romano & Wolf, "Exact and approximate stepdown methods
  for multiple hypothesis testing", JASA 2005), never below the single-test level.
  """
  drop: float  # mean over prompts of gold[peak] − gold[last]
  se: float  # SE of that paired per-prompt difference: its SD (ddof 1) / √P
  peak: int  # argmax of the mean curve
  critical_z: float  # what z must reach; NaN when it cannot be estimated (< 5 prompts or so)

  @property
  def z(self) -> float:
    return self.drop / max(self.se, 1e-12)

  def describe(self, where: str = "") -> str:
    """"drop to it 0.123 = 3.1 SE (2.7 needed for a peak picked from the curve)"; "no drop"
    when the peak is the last point."""
    if self.drop == 0 and self.se == 0:
      return "no drop"
    z = f"{self.z:.1f}" if self.se > 0 else "inf"
    needed = ("too few prompts to test it for a peak picked from the curve"
              if math.isnan(self.critical_z) else
              f"{self.critical_z:.1f} needed for a peak picked from the curve")
    return f"drop{' ' + where if where else ''} {self.drop:.3f} = {z} SE ({needed})"

  @property
  def significant(self) -> bool:
    """The drop clears the selection-adjusted level (whether the peak is interior is the
    caller's rule)."""
    return bool(self.z >= self.critical_z)


def peak_drop(per_prompt: ArrayLike, num_bootstrap: int = 1000, seed: int = 0, *,
              z_level: float = 2.0) -> Decline:
  """The drop from the peak of ``per_prompt`` ``[P, S]`` (argmax of the mean over prompts)
  to its last point, with its SE and its selection-adjusted critical z (see ``Decline``).

  For every candidate peak k < S − 1 the paired differences ``x[:, k] − x[:, -1]`` are
  resampled over prompts (B = ``num_bootstrap``) and studentised by each resample's own
  SE, centred at their observed mean (a bootstrap-t, which carries the t-like tails of a
  z whose SE is estimated from few prompts); ``critical_z`` is the ``norm.cdf(z_level)``
  quantile of the maximum over k, or ``z_level`` if that is larger. The peak's own z is at
  most that maximum, so under "no point above the last" the test rejects with probability
  at most ``norm.sf(z_level)`` (2.3% at the default), whichever point the data pick.
  Flat curves of 11 points with independent noise, 600 draws each: 0.3% / 2.0% / 2.2% /
  2.5% at 8 / 16 / 32 / 64 prompts; studentised by one fixed bootstrap SE instead (the
  rule before 2026-12-07), 10.0% / 5.3% / 4.3% / 3.3%.
  """
  values = np.asarray(per_prompt, np.float64)
  if values.ndim != 2 or values.shape[1] < 1:
    raise ValueError(f"peak_drop: need [P, S] values with S >= 1, got {values.shape}")
  peak = int(np.argmax(values.mean(axis=0)))
  diffs = values[:, :-1] - values[:, -1:]  # [P, S − 1], one column per candidate peak
  p = values.shape[0]
  if peak == values.shape[1] - 1:
    drop, se = 0.0, 0.0
  else:
    drop = float(diffs[:, peak].mean())
    se = float(diffs[:, peak].std(ddof=1) / np.sqrt(p)) if p > 1 else 0.0
  return Decline(drop, se, peak, _critical_z(diffs, num_bootstrap, seed, z_level))


def _critical_z(diffs: np.ndarray, num_bootstrap: int, seed: int, z_level: float) -> float:
  """Bootstrap-t max critical value of ``diffs`` ``[P, K]`` (see ``peak_drop``)."""
  p = diffs.shape[0]
  if p < 2:
    return float("nan")
  varying = diffs.std(axis=0) > 0  # a candidate equal to the last point everywhere cannot be picked
  if not varying.any():
    return float(z_level)
  x = diffs[:, varying]
  counts = np.random.default_rng(seed).multinomial(
      p, np.full(p, 1.0 / p), size=num_bootstrap).astype(np.float64)
  mean = counts @ x / p  # [B, K]
  var = np.maximum(counts @ (x * x) / p - mean * mean, 0.0) * p / (p - 1)
  deviation = mean - x.mean(axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one repeated prompt
    t = np.where(var > 0, deviation / np.sqrt(var / p),
                 np.where(deviation == 0, 0.0, np.sign(deviation) * np.inf))
  with np.errstate(invalid="ignore"):  # interpolating between infinities
    quantile = float(np.quantile(t.max(axis=1), special.ndtr(z_level)))
  if not np.isfinite(quantile):  # so few prompts that resamples of one prompt reach the tail
    return float("nan")
  return max(float(z_level), quantile)


def argmax_spread(per_prompt: ArrayLike, num_bootstrap: int = 1000, seed: int = 0
                  ) -> np.ndarray:
  """``[S]`` share of prompt resamples whose mean curve peaks at each point: how firmly a
  curve ``per_prompt`` ``[P, S]`` locates its maximum (the argmax of a noisy curve moves)."""
  values = np.asarray(per_prompt, np.float64)
  if values.ndim != 2 or num_bootstrap < 2:
    raise ValueError(f"argmax_spread: need [P, S] values and num_bootstrap >= 2, got "
                     f"{values.shape} and {num_bootstrap}")
  p = values.shape[0]
  counts = np.random.default_rng(seed).multinomial(p, np.full(p, 1.0 / p), size=num_bootstrap)
  peaks = np.argmax(counts.astype(np.float64) @ values, axis=1)
  return np.bincount(peaks, minlength=values.shape[1]) / num_bootstrap


def summarize(knob: ArrayLike, per_prompt_kl: ArrayLike, per_prompt_proxy: ArrayLike,
              per_prompt_gold: ArrayLike, *,
              num_bootstrap: int = 1000, seed: int = 0) -> Curve:
  """Builds a ``Curve`` from ``[P, S]`` per-prompt values (same resamples for all three)."""
  stats = [bootstrap_mean_se(np.atleast_2d(x), num_bootstrap, seed)
           for x in (per_prompt_kl, per_prompt_proxy, per_prompt_gold)]
  (kl, kl_se), (proxy, proxy_se), (gold, gold_se) = stats
  return Curve(np.asarray(knob), kl, proxy, gold, kl_se, proxy_se, gold_se,
               np.atleast_2d(per_prompt_kl), np.atleast_2d(per_prompt_proxy),
               np.atleast_2d(per_prompt_gold))


def unbiased_best_of_n(proxy: ArrayLike, gold: ArrayLike, ns: ArrayLike | None = None, *,
                       num_bootstrap: int = 1000,
                       seed: int = 0) -> Curve:
  """Best-of-n curve from N samples per prompt: unbiased scores, ``bon_kl``, bootstrap SEs.

  Args:
    proxy: ``[P, N]`` proxy rewards of N reference-policy samples per prompt.
    gold: ``[P, N]`` gold rewards of the same samples.
    ns: ``[S]`` integers in [1, N] (default every n ≤ N).
    num_bootstrap: bootstrap resamples over prompts for the standard errors.
    seed: bootstrap seed.

  Returns:
    A ``Curve`` with ``knob = n`` and ``kl = bon_kl(n)`` (the analytic value; it
    is identical for every prompt, so its SE is 0 up to rounding; NaN from a single
    prompt, as every bootstrap SE).
  """
  proxy, gold, _ = _check_scores(proxy, gold)
  ns = np.arange(1, proxy.shape[1] + 1) if ns is None else _check_ns(ns, proxy.shape[1])
  scores = unbiased_bon_scores(proxy, gold, ns)
  kl = np.broadcast_to(bon_kl(ns), scores.proxy.shape)
  return summarize(ns, kl, scores.proxy, scores.gold, num_bootstrap=num_bootstrap, seed=seed)


def _check_ns(ns: ArrayLike, num_samples: int) -> np.ndarray:
  ns_arr = np.asarray(ns)
  if ns_arr.ndim != 1 or ns_arr.size == 0:
    raise ValueError(f"ns must be a non-empty 1-D array of integers, got shape {ns_arr.shape}")
  if not np.all(np.equal(np.mod(ns_arr, 1), 0)):
    raise ValueError(f"ns must hold integers, got {ns_arr}")
  ns_arr = ns_arr.astype(np.int64)
  if ns_arr.min() < 1 or ns_arr.max() > num_samples:
    raise ValueError(f"ns must lie in [1, N={num_samples}] (an unbiased estimate of "
                     f"best-of-n needs at least n samples), got min {ns_arr.min()}, "
                     f"max {ns_arr.max()}")
  return ns_arr


def _check_scores(proxy: ArrayLike, gold: ArrayLike) -> tuple[np.ndarray, np.ndarray, bool]:
  proxy = np.asarray(proxy, np.float64)
  gold = np.asarray(gold, np.float64)
  if proxy.shape != gold.shape:
    raise ValueError(f"proxy shape {proxy.shape} does not match gold shape {gold.shape}")
  squeeze = proxy.ndim == 1
  if squeeze:
    proxy, gold = proxy[None], gold[None]
  if proxy.ndim != 2 or proxy.shape[1] == 0:
    raise ValueError(f"scores must be [P, N] (or [N]) with N >= 1, got {proxy.shape}")
  for name, x in (("proxy", proxy), ("gold", gold)):
    bad = ~np.isfinite(x)
    if bad.any():
      prompt, sample = np.argwhere(bad)[0]
      raise ValueError(f"{name} score is not finite at prompt {prompt}, sample {sample} "
                       f"({int(bad.sum())} non-finite values)")
  return proxy, gold, squeeze
