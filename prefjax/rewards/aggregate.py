"""Aggregations of K-member reward ensembles into one reward.

Every aggregation maps member rewards ``[..., K]`` (members on the LAST axis) to
one conservative scalar reward ``[...]``. All are pure ``jax.numpy`` functions,
safe under ``jit``, ``vmap`` and ``grad`` (each is jitted, so eager calls
compile once per shape instead of dispatching op by op).

* ``mean``: r̄ = (1/K) Σ_k r_k.
* ``wco`` (worst-case optimisation): min_k r_k.
* ``uwo`` (uncertainty-weighted optimisation): r̄ − λ·(1/K) Σ_k (r_k − r̄)², the
  population (ddof = 0) variance across members.

Reference: Coste, Anwar, Kirk, Krueger, "Reward Model Ensembles Help Mitigate
Overoptimization", arXiv:2310.02743 (2023). Members should be on a common scale
(see ``prefjax.rewards.normalize``) before they are aggregated, otherwise the
minimum and the variance are dominated by the member with the largest offset.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable

import jax
import jax.numpy as jnp


@jax.jit
def ensemble_mean(rewards: jax.Array, lam: float = 0.0) -> jax.Array:
  """Mean over members: ``[..., K] -> [...]`` (``lam`` is ignored)."""
  del lam
  return jnp.mean(rewards, axis=-1)


@jax.jit
def worst_case(rewards: jax.Array, lam: float = 0.0) -> jax.Array:
  """WCO, minimum over members: ``[..., K] -> [...]`` (``lam`` is ignored)."""
  del lam
  return jnp.min(rewards, axis=-1)


@jax.jit
def uncertainty_weighted(rewards: jax.Array, lam: float = 0.0) -> jax.Array:
  """UWO, mean − λ·population variance over members: ``[..., K] -> [...]``."""
  mean = jnp.mean(rewards, axis=-1)
  variance = jnp.mean(jnp.square(rewards - mean[..., None]), axis=-1)
  return mean - lam * variance


AGGREGATIONS: dict[str, Callable[..., jax.Array]] = {
    "mean": ensemble_mean,
    "wco": worst_case,
    "uwo": uncertainty_weighted,
}


def aggregate(rewards: jax.Array, method: str = "mean", lam: float = 0.0) -> jax.Array:
  """Aggregates member rewards ``[..., K]`` into ``[...]`` (one of ``AGGREGATIONS``).

  Args:
    rewards: member rewards, members on the last axis (K ≥ 1).
    method: one of ``AGGREGATIONS`` (``"mean"``, ``"wco"``, ``"uwo"``); static
      under ``jit`` (close over it or mark it static).
    lam: the UWO variance penalty λ ≥ 0 (ignored by ``mean`` and ``wco``; 0, the
      default, makes ``uwo`` the mean, with a warning); may be a traced scalar.

  Returns:
    The aggregated reward, float32 for float32 or lower-precision input.
  """
  if method not in AGGREGATIONS:
    raise ValueError(f"unknown ensemble aggregation {method!r}; expected one of "
                     f"{sorted(AGGREGATIONS)}")
  if isinstance(lam, numbers.Real) and not lam >= 0:
    raise ValueError(f"the UWO penalty lam={lam} must be >= 0 (a negative one rewards the "
                     "members' disagreement)")
  if method == "uwo" and isinstance(lam, numbers.Real) and lam == 0:
    warnings.warn("aggregate(..., 'uwo', lam=0) is the ensemble mean: pass the variance "
                  "penalty lam > 0", stacklevel=2)
  rewards = jnp.asarray(rewards)
  if rewards.ndim == 0:
    raise ValueError("aggregate: rewards must have a trailing member axis [..., K], "
                     "got a scalar")
  if rewards.shape[-1] == 0:
    raise ValueError(f"aggregate: rewards has zero members (shape {rewards.shape})")
  rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
  return AGGREGATIONS[method](rewards, jnp.asarray(lam, rewards.dtype))
