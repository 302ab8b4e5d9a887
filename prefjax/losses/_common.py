"""Small helpers shared by the loss modules: dtype promotion and shape checks.

Every loss computes in float32 (float64 when the caller passes float64 under
``jax.enable_x64``) whatever the input dtype, so bfloat16 activations never
lose precision inside a log-sigmoid.
"""

from __future__ import annotations

import numbers
from typing import Any

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = Any  # jax.Array, np.ndarray or a Python number.


def as_float(x: ArrayLike) -> Array:
  """``x`` in the loss compute dtype: float32, or float64 for float64 under x64.

  bf16/f16/int inputs are promoted to float32; NumPy float64 inputs without
  x64 are canonicalised to float32 by ``jnp.asarray`` first (no warning).
  A Python number stays weakly typed, so a hyperparameter such as ``beta=0.1``
  leaves float32 inputs in float32 under x64 too.
  """
  x = jnp.asarray(x)
  if x.weak_type:
    return x + 0.0  # Weak int -> weak float; ``astype`` would make it strong.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def broadcast_leading(value: ArrayLike, like: Array, name: str) -> Array:
  """Broadcasts a scalar or per-example ``value`` against ``like``.

  ``value`` may be a scalar, or shaped like the leading dimensions of ``like``
  (e.g. a per-pair margin ``[B]`` against ensemble rewards ``[B, K]``); it is
  padded with trailing singleton axes so that it broadcasts per example.

  Raises:
    ValueError: naming ``name`` when the shapes are incompatible.
  """
  value = as_float(value)
  if value.ndim > like.ndim or value.shape != like.shape[:value.ndim]:
    raise ValueError(
        f"{name} has shape {value.shape}; expected a scalar or a shape that "
        f"prefixes {like.shape}")
  return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def check_same_shape(names: str, *arrays: Array) -> None:
  """chex shape check with the tensor names in the error message."""
  chex.assert_equal_shape(arrays, custom_message=f"shapes of {names} must match")


def check_rank(name: str, x: Array, rank: int | set[int]) -> None:
  chex.assert_rank(x, rank, custom_message=f"bad rank for {name}")


def check_static_range(name: str, value: ArrayLike, low: float, high: float,
                       *, closed_low: bool = True, closed_high: bool = True) -> None:
  """Validates a hyperparameter when it is a concrete Python number.

  Traced or array-valued hyperparameters (schedules, per-example values) are
  left unchecked, since their values are unknown at trace time.
  """
  if not isinstance(value, numbers.Real):
    return
  ok_low = value >= low if closed_low else value > low
  ok_high = value <= high if closed_high else value < high
  if not (ok_low and ok_high):
    lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")
    raise ValueError(f"{name}={value} is outside {lo}{low}, {high}{hi}")


def check_config_label_smoothing(where: str, value: Any) -> None:
  """A run-wide ε (a config's, not a pair's soft label 1 − p) must lie in [0, 0.5): at 0.5
  no preference is left, and above it every pair teaches its rejected side."""
  if isinstance(value, numbers.Real) and not 0.0 <= value < 0.5:
    raise ValueError(f"{where}={value} must be in [0, 0.5): ε is the rate at which labels "
                     "are taken as flipped, so at 0.5 no preference is left and above it the "
                     "rejected side is taught (a pair's own soft label is its outcome)")


def smoothed_logistic(z: Array, label_smoothing: ArrayLike) -> Array:
  """−(1−ε)·logσ(z) − ε·logσ(−z): the logistic loss with labels flipped at rate ε."""
  eps = as_float(label_smoothing)
  return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def soft_label_smoothing(label_smoothing: ArrayLike, outcome: ArrayLike) -> Array:
  """Per-pair ε of a soft preference: 1 − [(1−ε)·o + ε·(1−o)] for outcome o ∈ [0, 1].

  Written as ε + (1−2ε)(1−o) so that o = 1 gives exactly ε; a tie (o = ½) gives ½.
  """
  eps = as_float(label_smoothing)
  return eps + (1.0 - 2.0 * eps) * (1.0 - as_float(outcome))
