"""Supervised warm start of a policy inside an RL / best-of-n run (tiny worlds).

A randomly initialised byte-level decoder emits arbitrary bytes; a few hundred
teacher-forced steps on reference responses (e.g. ``TinyWorld.sample_response``
strings, uniform over the alphabet) turn it into a reference policy that emits
well-formed responses ending in EOS, with every alphabet character (the
planted exploit character included) reachable. The loss is the mean negative
log-likelihood of the response tokens (prompt tokens are context only).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from prefjax.models import sampling

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids incl. EOS)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded ``tokens``/``attention_mask``/``loss_mask`` ``[B, T]`` int32."""
  rows = [list(p) + list(r) for p, r in examples]
  length = max(len(r) for r in rows)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  attention = np.zeros_like(tokens)
  loss_mask = np.zeros_like(tokens)
  for i, ((prompt, _), row) in enumerate(zip(examples, rows)):
    tokens[i, :len(row)], attention[i, :len(row)] = row, 1
    loss_mask[i, len(prompt):len(row)] = 1
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss_mask}


def nll(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean negative log-likelihood per response token."""
  _, per_token = sampling.sequence_logps(model, batch["tokens"], batch["loss_mask"],
                                         attention_mask=batch["attention_mask"])
  return -jnp.sum(per_token) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"))
def _step(graphdef, params, opt_state, batch, *, tx):
  loss, grads = jax.value_and_grad(lambda p: nll(nnx.merge(graphdef, p), batch))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  return optax.adam(learning_rate)  # cached: the jitted step is reused across runs


def warm_start(model: nnx.Module, sample_examples: Callable[[np.random.Generator, int],
                                                             Sequence[Example]], *,
               steps: int, batch_size: int, learning_rate: float, pad_id: int,
               seed: int = 0) -> list[float]:
  """Trains ``model`` in place with Adam for ``steps`` steps; returns the loss curve."""
  if steps <= 0:
    return []
  tx = _adam(float(learning_rate))
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  losses = []
  logging.info("warm start: %d SFT steps of %d examples ...", steps, batch_size)
  for step in range(steps):
    batch = collate(sample_examples(rng, batch_size), pad_id)
    params, opt_state, loss = _step(graphdef, params, opt_state, batch, tx=tx)
    losses.append(loss)
  losses = [float(x) for x in jax.device_get(losses)]
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"warm start diverged: losses {losses[-5:]}")
  nnx.update(model, params)
  logging.info("warm start: %d steps, NLL %.3f -> %.3f", steps, losses[0], losses[-1])
  return losses
