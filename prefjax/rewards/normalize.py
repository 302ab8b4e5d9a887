"""Reward normalisation so that the reference policy scores zero.

Gao, Schulman, Hilton, "Scaling Laws for Reward Model Overoptimization",
arXiv:2210.10760 (2022), report every gold and proxy score relative to the
initial policy: rewards are shifted so that samples from the reference policy
have mean zero. Optionally they are also divided by their reference standard
deviation, which puts proxies trained with different seeds (and the gold
reward) on one scale before they are compared or ensembled.

``RewardNormalizer`` is a pytree (a ``NamedTuple``), so it can be passed into
jitted functions. It works per member: fitted on ``[N]`` it holds scalars,
fitted on ``[N, K]`` it holds ``[K]`` statistics applied member by member.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RewardNormalizer(NamedTuple):
  """Affine map ``r -> (r − mean) / scale`` fitted on reference-policy rewards.

  Attributes:
    mean: reference mean, ``[]`` or ``[K]`` (one per ensemble member).
    scale: reference standard deviation (or ones when only centring), same shape.
  """
  mean: jax.Array
  scale: jax.Array

  @classmethod
  def identity(cls, num_members: int | None = None) -> "RewardNormalizer":
    """The no-op normaliser (scalar, or ``[K]`` when ``num_members`` is given)."""
    shape = () if num_members is None else (num_members,)
    return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32))

  @classmethod
  def fit(cls, reference_rewards: jax.Array | np.ndarray, *, standardize: bool = False,
          weights: jax.Array | np.ndarray | None = None) -> "RewardNormalizer":
    """Fits the normaliser on rewards of reference-policy samples.

    Args:
      reference_rewards: ``[N]`` or ``[N, K]`` rewards of N reference samples.
      standardize: also divide by the reference standard deviation (ddof = 0).
      weights: optional ``[N]`` non-negative sample weights, e.g. π_ref
        probabilities of N candidates when the reference distribution is known
        exactly; they are normalised to sum to one.

    Returns:
      A normaliser whose statistics have shape ``[]`` or ``[K]``.

    Raises:
      ValueError: on empty or non-finite input (naming the first bad row),
        bad weights, or a member with zero reference spread when standardising.
    """
    r = np.asarray(reference_rewards, np.float64)
    if r.ndim not in (1, 2) or r.shape[0] == 0:
      raise ValueError(f"RewardNormalizer.fit: reference_rewards must be [N] or [N, K] "
                       f"with N > 0, got shape {r.shape}")
    bad = ~np.isfinite(r).reshape(r.shape[0], -1).all(axis=1)
    if bad.any():
      raise ValueError(f"RewardNormalizer.fit: reference_rewards row {int(np.argmax(bad))} "
                       f"is not finite ({int(bad.sum())} bad rows)")
    w = _normalized_weights(weights, r.shape[0])
    mean = np.tensordot(w, r, axes=(0, 0))
    if standardize:
      std = np.sqrt(np.tensordot(w, np.square(r - mean), axes=(0, 0)))
      flat = np.atleast_1d(std)
      tiny = flat <= 1e-12 * np.maximum(1.0, np.abs(np.atleast_1d(mean)))
      if tiny.any():
        raise ValueError(f"RewardNormalizer.fit: member {int(np.argmax(tiny))} has zero "
                         "spread under the reference samples; cannot standardise")
    else:
      std = np.ones_like(mean)
    return cls(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))

  def __call__(self, rewards: jax.Array) -> jax.Array:
    """Normalises ``[..., ]`` (scalar fit) or ``[..., K]`` (per-member fit) rewards."""
    rewards = jnp.asarray(rewards)
    if self.mean.ndim == 1 and (rewards.ndim == 0 or rewards.shape[-1] != self.mean.shape[0]):
      raise ValueError(f"RewardNormalizer: fitted on {self.mean.shape[0]} members but "
                       f"rewards have shape {rewards.shape}")
    dtype = jnp.promote_types(rewards.dtype, jnp.float32)
    return (rewards.astype(dtype) - self.mean.astype(dtype)) / self.scale.astype(dtype)

  def inverse(self, normalized: jax.Array) -> jax.Array:
    """Maps normalised rewards back to the raw scale."""
    normalized = jnp.asarray(normalized)
    dtype = jnp.promote_types(normalized.dtype, jnp.float32)
    return normalized.astype(dtype) * self.scale.astype(dtype) + self.mean.astype(dtype)


def _normalized_weights(weights, n: int) -> np.ndarray:
  if weights is None:
    return np.full((n,), 1.0 / n)
  w = np.asarray(weights, np.float64)
  if w.shape != (n,):
    raise ValueError(f"RewardNormalizer.fit: weights must have shape ({n},), got {w.shape}")
  if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
    raise ValueError("RewardNormalizer.fit: weights must be finite, non-negative and "
                     "not all zero")
  return w / w.sum()
