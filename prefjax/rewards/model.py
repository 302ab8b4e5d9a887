"""``ModelReward``: a reward computed by a (learned) reward model.

The wrapped model is duck-typed: anything callable as
``model(tokens, attention_mask=mask)`` returning ``[N]`` (a scalar reward head)
or ``[N, K]`` (a K-member ensemble head). Flax NNX modules are called through
``nnx.jit`` so that later parameter updates are seen by the compiled call;
other callables go through ``jax.jit``. Either way the call compiles once per
input shape; with ``batch_size`` set, inputs are split into fixed-size chunks
(the last one padded by repeating a real row) so that one compilation serves
any N.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from prefjax.rewards import base
from prefjax.rewards.base import MaybeArray
from prefjax.rewards.base import Texts


def _apply_module(model: nnx.Module, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
  return model(tokens, attention_mask=attention_mask)


_apply_module_jit = nnx.jit(_apply_module)


class ModelReward(base.RewardFn):
  """Rewards from a reward model ``model(tokens, attention_mask=...) -> [N] | [N, K]``.

  Args:
    model: the reward model (an NNX module or any callable).
    name: identifier for logs and errors.
    num_members: K when the model is an ensemble head returning ``[N, K]``;
      default: the model's own ``num_members`` attribute if it has one, else 1.
    batch_size: if set, score in chunks of this many rows (one compilation).
    encode: ``texts -> (tokens, attention_mask)`` to accept texts.
    jit: compile the call (disable for models that are not traceable).
  """

  def __init__(self, model: Callable[..., Any], *, name: str = "reward_model",
               num_members: int | None = None, batch_size: int | None = None,
               encode: base.Encoder | None = None, jit: bool = True):
    if num_members is None:
      num_members = int(getattr(model, "num_members", 1))
    if num_members < 1:
      raise ValueError(f"ModelReward: num_members must be >= 1, got {num_members}")
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"ModelReward: batch_size must be >= 1, got {batch_size}")
    self.model, self.name, self.num_members = model, name, num_members
    self.batch_size, self._encode = batch_size, encode
    if not jit:
      self._apply = lambda t, m: model(t, attention_mask=m)
    elif isinstance(model, nnx.Module):
      self._apply = lambda t, m: _apply_module_jit(model, t, m)
    else:
      self._apply = jax.jit(lambda t, m: model(t, attention_mask=m))

  def __call__(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
               texts: Texts | None = None) -> jax.Array:
    tokens, attention_mask = base.resolve_tokens(tokens, attention_mask, texts, self._encode,
                                                 self.name)
    n = tokens.shape[0]
    if self.batch_size is None or n == 0:
      rewards = self._apply(tokens, attention_mask)
    else:
      rewards = self._chunked(tokens, attention_mask)
    return base.check_rewards(rewards, num_rows=n, num_members=self.num_members,
                              name=self.name)

  def _chunked(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    n, size = tokens.shape[0], self.batch_size
    padded = -(-n // size) * size
    # Pad with copies of the last real row: an all-masked row could make the
    # model produce NaN, which is harmless here but would trip debug_nans.
    pad_index = jnp.concatenate([jnp.arange(n), jnp.full((padded - n,), n - 1)])
    tokens, attention_mask = tokens[pad_index], attention_mask[pad_index]
    chunks = [self._apply(tokens[i:i + size], attention_mask[i:i + size])
              for i in range(0, padded, size)]
    return jnp.concatenate([jnp.asarray(c) for c in chunks], axis=0)[:n]
