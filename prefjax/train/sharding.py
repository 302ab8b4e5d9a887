"""Shardings of the train state and batches on a ``("data", "fsdp", "tensor")`` mesh.

Parameters follow the model's regex partition rules (via ``prefjax.parallel``);
optimizer-state leaves that mirror a parameter (Adam moments, momentum) get
that parameter's sharding, found by matching the end of their pytree path and
their shape; everything else (counters, RNG key, non-parameter model state) is
replicated. Batches are split over ``("data", "fsdp")`` along the example axis
(axis 1 for batches that carry a leading microbatch axis).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from prefjax.train import state as state_lib

DATA_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, P]]


def _param_shardings(mesh: jax.sharding.Mesh, rules: Rules, params: Any) -> Any:
  try:
    from prefjax import parallel  # pylint: disable=g-import-not-at-top
    named_shardings = parallel.named_shardings
  except (ImportError, AttributeError):
    named_shardings = _local_named_shardings
  return named_shardings(mesh, rules, params)


def _local_named_shardings(mesh, rules, tree):
  """Stand-in for ``prefjax.parallel.named_shardings`` (first ``re.search`` match wins)."""
  def spec(path, _):
    name = state_lib.path_str(path)
    for pattern, pspec in rules:
      if re.search(pattern, name):
        return NamedSharding(mesh, pspec)
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(state: state_lib.TrainState, mesh: jax.sharding.Mesh,
                    rules: Rules) -> state_lib.TrainState:
  """A ``TrainState``-shaped tree of ``NamedSharding`` for ``state``."""
  replicated = NamedSharding(mesh, P())
  param_sh = _param_shardings(mesh, rules, state.params)
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                    jax.tree.leaves(param_sh)):
    by_path[tuple(state_lib.path_str(path).split("/"))] = (tuple(leaf.shape), sharding)

  def opt_sharding(path, leaf):
    parts = tuple(state_lib.path_str(path).split("/"))
    for start in range(len(parts)):
      match = by_path.get(parts[start:])
      if match is not None and match[0] == tuple(leaf.shape):
        return match[1]
    return replicated

  return state.replace(
      step=replicated, params=param_sh,
      extra=jax.tree.map(lambda _: replicated, state.extra),
      opt_state=jax.tree_util.tree_map_with_path(opt_sharding, state.opt_state),
      rng=replicated, skipped_steps=replicated, consecutive_skipped=replicated)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, *, presplit: bool = False) -> Any:
  """Per-leaf shardings: the example axis over ``("data", "fsdp")``.

  Leaves whose example axis is not divisible by the data-parallel size (or
  scalars) are replicated.
  """
  axis = 1 if presplit else 0
  size = data_parallel_size(mesh)
  axes = tuple(a for a in DATA_AXES if a in mesh.shape)

  def sharding(x):
    shape = getattr(x, "shape", ())
    if len(shape) <= axis or shape[axis] % size:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*([None] * axis), axes))
  return jax.tree.map(sharding, batch)
