"""Train state: split NNX model parameters, optimizer state, step and RNG.

The model is split once into a static ``graphdef`` (kept by the caller) and
pure-dict pytrees of its ``nnx.Param`` variables (``params``) and of everything
else (``extra``: RNG stream counters, batch statistics). Pure dicts keep the
state a plain pytree: it jits with shardings, donates, and round-trips through
orbax without Flax-specific handlers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from prefjax.parallel import rules

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: number of train steps taken (including skipped non-finite steps);
      equals the number of batches consumed from the train iterator.
    params: pure dict of the trained variables (by default every ``nnx.Param``).
    extra: pure dict of the model's other variables (RNG counters, frozen
      weights, ...); updated by the forward pass but never by gradients.
    opt_state: optax state for ``params``.
    rng: base PRNG key; step ``s`` uses ``fold_in(rng, s)``.
    skipped_steps: total steps whose update was skipped (non-finite).
    consecutive_skipped: skipped steps since the last applied update.
  """
  step: jax.Array
  params: PyTree
  extra: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  skipped_steps: jax.Array
  consecutive_skipped: jax.Array

  @property
  def applied_steps(self) -> jax.Array:
    """Number of optimizer updates actually applied."""
    return self.step - self.skipped_steps


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param,
                ) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Returns ``(graphdef, params, extra)`` with params/extra as pure dicts.

  ``trainable`` is an NNX filter selecting the variables that get gradients
  (default every ``nnx.Param``); e.g. ``nnx.All(nnx.Param,
  nnx.Not(nnx.PathContains("reference")))`` keeps a frozen DPO reference model
  inside the same module, in ``extra``.
  """
  graphdef, params, extra = nnx.split(model, trainable, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(extra)


def merge_model(graphdef: nnx.GraphDef, params: PyTree, extra: PyTree) -> nnx.Module:
  """Inverse of :func:`split_model`."""
  return nnx.merge(graphdef, params, extra)


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array | int,
    *,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and initialises the optimizer; returns ``(graphdef, state)``.

  ``trainable`` selects the trained variables (see :func:`split_model`).
  """
  graphdef, params, extra = split_model(model, trainable)
  low = sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)
                if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32})
  if low:
    logging.warning("trainable parameters in %s: an update below its resolution (2^-8 of "
                    "the weight for bfloat16) is lost, so small learning rates stall; keep "
                    "param_dtype float32 (the default) and set the compute dtype instead",
                    ", ".join(low))
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero, params=params, extra=extra, opt_state=tx.init(params),
                     rng=rng, skipped_steps=zero, consecutive_skipped=zero)
  return graphdef, unalias(state)


def unalias(tree: PyTree) -> PyTree:
  """Copies leaves that share a buffer with an earlier leaf (donation needs distinct buffers)."""
  seen: set[int] = set()
  def fresh(x):
    if not isinstance(x, jax.Array):
      return x
    if id(x) in seen:
      return jnp.array(x, copy=True)
    seen.add(id(x))
    return x
  return jax.tree.map(fresh, tree)


def _host_array(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x))


def params_sha256(params: PyTree) -> str:
  """SHA-256 over the leaves' raw bytes, leaves taken in sorted path order.

  The digest depends only on the values (and their dtype width), not on how
  the arrays are sharded, so sharded and single-device runs can be compared.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  digest = hashlib.sha256()
  for _, leaf in sorted(leaves, key=lambda kv: rules.path_str(kv[0])):
    digest.update(_host_array(leaf).tobytes())
  return digest.hexdigest()


def count_params(params: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
