"""Gradient accumulation keeps float64 parameters' gradients in float64 (x64 mode).

The accumulator was float32 whatever the parameters: float64 references run through the
train step (finite differences, hand-computed losses) lost 9 digits under accum_steps > 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefjax import train


class _Quadratic(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.asarray(np.linspace(-1.0, 1.0, 5), jnp.float64))

  def __call__(self, x):
    return jnp.tanh(x @ self.w)


def _loss(model, batch, rng):
  del rng
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def _one_step(accum_steps, batch):
  tx = optax.sgd(1.0)
  graphdef, state = train.create_train_state(_Quadratic(), tx, 0)
  fn = train.make_train_step(graphdef, _loss, tx, accum_steps=accum_steps)
  return jax.jit(fn)(state, batch)[0].params["w"]


def test_accumulated_float64_gradients_stay_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 5)), "y": rng.normal(size=8) * 1e-3}
    big, accumulated = _one_step(1, batch), _one_step(4, batch)
    assert accumulated.dtype == jnp.float64
    init = np.linspace(-1.0, 1.0, 5)
    assert np.abs(np.asarray(big) - init).max() > 1e-2  # the step moved the parameters
    np.testing.assert_allclose(accumulated, big, rtol=0, atol=1e-13)
