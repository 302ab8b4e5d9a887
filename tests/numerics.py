"""Shared numerical checks for tests: finite differences in float64, dtype/shape checks."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np


def central_difference_grad(f: Callable[..., float], args: Sequence[np.ndarray],
                            argnum: int = 0, eps: float = 1e-6) -> np.ndarray:
  """d f / d args[argnum] by central differences; ``f`` must accept float64 NumPy arrays."""
  args = [np.asarray(a, np.float64) for a in args]
  x = args[argnum]
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    plus, minus = x.copy(), x.copy()
    plus[idx] += eps
    minus[idx] -= eps
    hi = f(*args[:argnum], plus, *args[argnum + 1:])
    lo = f(*args[:argnum], minus, *args[argnum + 1:])
    grad[idx] = (float(hi) - float(lo)) / (2 * eps)
  return grad


def jax_grad_f64(f: Callable[..., jax.Array], args: Sequence[np.ndarray],
                 argnum: int = 0) -> np.ndarray:
  """Gradient of ``f(*args).sum()`` computed by JAX with x64 enabled (for FD comparisons)."""
  with jax.enable_x64(True):
    args64 = [jax.numpy.asarray(a, jax.numpy.float64) for a in args]
    g = jax.grad(lambda *a: f(*a).sum(), argnums=argnum)(*args64)
    return np.asarray(g, np.float64)


def check_grad(f: Callable[..., jax.Array], args: Sequence[np.ndarray], argnum: int = 0,
               rtol: float = 1e-5, atol: float = 1e-7, eps: float = 1e-6) -> None:
  """Asserts JAX's gradient of sum(f) equals central finite differences (both in float64)."""
  def f_np(*a):
    with jax.enable_x64(True):
      return float(np.asarray(f(*[jax.numpy.asarray(x, jax.numpy.float64) for x in a])).sum())
  numeric = central_difference_grad(f_np, args, argnum, eps)
  analytic = jax_grad_f64(f, args, argnum)
  np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)
