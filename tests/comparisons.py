"""Comparisons of two training runs that hold on any x86-64 CPU.

Two runs whose reductions are ordered differently (another mesh, another
microbatching, a cached instead of a live reference) differ by float32
round-off in every gradient. Those differences are well-conditioned in the
losses and in the gradients at the same parameters, but Adam divides each
update by the gradient's running RMS: where a gradient is near zero, a 1-ulp
difference flips the sign of a full-size (≈ learning rate) update, and which
elements that hits depends on the CPU's vector width. So parameters after
Adam steps are compared statistically: almost every element agrees tightly,
and none differs by more than the updates could have moved it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def assert_same_first_step(a: Sequence[dict], b: Sequence[dict], *, rtol: float = 1e-5) -> None:
  """Step 1 runs at identical parameters: its loss and gradient norm must agree tightly."""
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(a[0][key], b[0][key], rtol=rtol, err_msg=f"step-1 {key}")


def assert_losses_close(a: Sequence[float], b: Sequence[float], *, rtol: float = 1e-4) -> None:
  """Per-step losses: smooth in the parameters, so Adam's flipped near-zero updates barely move them."""
  assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
  np.testing.assert_allclose(a, b, rtol=rtol)


def assert_params_close_after_adam(a: Any, b: Any, *, learning_rate: float, steps: int,
                                   tight: float = 1e-5, min_fraction: float = 0.99) -> None:
  """Parameters after ``steps`` Adam(W) steps from the same initialisation.

  At least ``min_fraction`` of all elements agree to ``tight`` (absolute plus the
  same relative), and every element agrees to ``2·learning_rate·steps``: the most
  two Adam trajectories can separate when each update is bounded by ≈ lr.
  """
  xs = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  ys = np.concatenate([np.ravel(np.asarray(y, np.float64)) for y in jax.tree.leaves(b)])
  assert xs.shape == ys.shape, (xs.shape, ys.shape)
  diff = np.abs(xs - ys)
  close = diff <= tight * (1.0 + np.abs(ys))
  assert close.mean() >= min_fraction, (
      f"only {close.mean():.4%} of {xs.size} parameters agree to {tight:g}; "
      f"largest differences {np.sort(diff)[-5:]}")
  bound = 2.0 * learning_rate * steps
  assert diff.max() <= bound, f"max |Δparam| {diff.max():.3g} exceeds 2·lr·steps = {bound:.3g}"


def assert_same_accuracy(value: float, expected: float, margins: Sequence[float], *,
                         tie_tol: float = 1e-4, atol: float = 1e-9) -> None:
  """A pair accuracy computed by another program than ``expected``'s (another batch size,
  graph or head): equal to ``atol`` (a float32 metric: 1e-6), except that each pair whose
  margin lies within ``tie_tol`` of 0 may count on either side, since round-off decides
  its sign (1/n of accuracy each)."""
  margins = np.abs(np.asarray(margins, np.float64))
  near_ties = int(np.sum(margins <= tie_tol))
  assert abs(value - expected) <= near_ties / margins.size + atol, (
      f"accuracy {value} against {expected}: {near_ties} of {margins.size} margins within "
      f"{tie_tol} of 0")
