"""A tiny regression problem for the tests that run ``train.train_loop`` end to end."""

import grain
import jax.numpy as jnp
import numpy as np
from flax import nnx

IN = 4


class Net(nnx.Module):
  """A tanh MLP with one hidden layer of ``WIDTH`` units."""
  WIDTH = 16

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, self.WIDTH, rngs=rngs)
    self.out = nnx.Linear(self.WIDTH, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))[:, 0]


def loss_fn(model, batch, rng):
  del rng
  return jnp.mean((model(batch["x"]) - batch["y"])**2), {}


def batches(num_examples=32, seed=1):
  """Shuffled, repeated batches of 8 examples ``y = sin(sum(x))``, read without prefetch
  threads: grain's default 16 would read 500 batches ahead in Python, holding the GIL
  against a loop of a few steps."""
  x = np.random.default_rng(0).normal(size=(num_examples, IN)).astype(np.float32)
  y = np.sin(x.sum(-1))
  examples = [{"x": x[i], "y": y[i]} for i in range(num_examples)]
  dataset = grain.MapDataset.source(examples).shuffle(seed=seed).repeat().batch(8)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)))
