"""Shared numerical checks for tests: finite differences in float64, dtype/shape checks."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from prefjax.losses import registry


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


# Modules of your own (comma-separated) whose registered losses the loss tests cover, and
# where they find each one's float64 reference (``ref_<name>``, ``ref_pair_<name>``).
TEST_IMPORTS = "PREFJAX_TEST_IMPORTS"


def user_modules() -> list[ModuleType]:
  """The modules ``PREFJAX_TEST_IMPORTS`` names, imported (their losses registered)."""
  names = [m.strip() for m in os.environ.get(TEST_IMPORTS, "").split(",") if m.strip()]
  return [importlib.import_module(m) for m in names]


def user_reference(name: str) -> Any:
  """``name`` (a reference function) from the first of those modules defining it."""
  return next((getattr(m, name) for m in user_modules() if hasattr(m, name)), None)


def per_example_losses(table: Mapping[str, Callable[..., Any]], kind: str,
                       name: str) -> Callable[..., Any]:
  """The loss ``name`` registered in ``table`` (``kind``: "direct" or "preference"), giving
  its per-example losses also when it returns ``(losses, metrics)`` (README, "Adding a
  loss")."""
  fn = table[name]
  return lambda *args, **kwargs: registry.split_loss_output(fn(*args, **kwargs), kind,
                                                            name)[0]
