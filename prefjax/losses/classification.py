"""Class-weighted binary cross-entropy, the loss of the safety (harm) classifier.

A pure function of arrays like every loss in ``prefjax.losses``; callers reduce.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def weighted_binary_cross_entropy(logits: Array, labels: Array, *, pos_weight: float = 1.0,
                                  neg_weight: float = 1.0) -> Array:
  """−[w₊·y·logσ(z) + w₋·(1−y)·logσ(−z)], per element, float32.

  Class weighting as in King & Zeng, "Logistic Regression in Rare Events Data"
  (Political Analysis 2001): w₊ = n₋/n₊ balances a rare positive class. ``labels``
  may be soft (in [0, 1]). Stable for |z| up to 1e4 (``log_sigmoid``).

  Args:
    logits: ``[...]`` harm logits z.
    labels: same shape, 1 = harmful.
    pos_weight, neg_weight: w₊ and w₋.
  """
  z = jnp.asarray(logits, jnp.float32)
  y = jnp.asarray(labels, jnp.float32)
  chex.assert_equal_shape([z, y])  # [N] against [N, 1] would broadcast to [N, N]
  return -(pos_weight * y * jax.nn.log_sigmoid(z)
           + neg_weight * (1.0 - y) * jax.nn.log_sigmoid(-z))
