"""Shardings of the train state and batches on a ``("data", "fsdp", "tensor")`` mesh.

Parameters follow the model's regex partition rules (via ``prefjax.parallel``);
optimizer-state leaves that mirror a parameter (Adam moments, momentum) get
that parameter's sharding, found by matching the end of their pytree path and
their shape. Non-trained model variables (frozen reference weights) follow the
same rules; everything else (counters, RNG keys) is replicated. Batches are split over ``("data", "fsdp")`` along the example axis
(axis 1 for batches that carry a leading microbatch axis).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from prefjax import parallel
from prefjax.train import state as state_lib

DATA_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, P]]


def state_shardings(state: state_lib.TrainState, mesh: jax.sharding.Mesh,
                    rules: Rules) -> state_lib.TrainState:
  """A ``TrainState``-shaped tree of ``NamedSharding`` for ``state``."""
  replicated = NamedSharding(mesh, P())
  param_sh = parallel.named_shardings(mesh, rules, state.params)
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                    jax.tree.leaves(param_sh)):
    by_path[tuple(parallel.path_str(path).split("/"))] = (tuple(leaf.shape), sharding)

  def opt_sharding(path, leaf):
    parts = tuple(parallel.path_str(path).split("/"))
    for start in range(len(parts)):
      match = by_path.get(parts[start:])
      if match is not None and match[0] == tuple(leaf.shape):
        return match[1]
    return replicated

  return state.replace(
      step=replicated, params=param_sh,
      extra=parallel.named_shardings(mesh, rules, state.extra),
      opt_state=jax.tree_util.tree_map_with_path(opt_sharding, state.opt_state),
      rng=replicated, skipped_steps=replicated, consecutive_skipped=replicated)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def check_batch_shapes(dataset: Any, mesh: jax.sharding.Mesh | None, *,
                       accum_steps: int = 1) -> None:
  """Fails before training when a batch ``dataset`` can yield (``batch_shapes()``)
  would not split over the mesh's data-parallel devices (each of its ``accum_steps``
  microbatches), or is packed in a multi-process run, as the train step would at the
  first such batch, which with bucketing or ``trim_rows`` can come late."""
  size = 1 if mesh is None else parallel.local_batch_multiple(mesh)  # rows per process
  feeds = " this process feeds" if jax.process_count() > 1 else ""
  for shapes in dataset.batch_shapes():
    parallel.check_joinable_across_processes(shapes)
    index_fields = [k for k in parallel.rules.ROW_INDEX_FIELDS if k in shapes]
    if accum_steps > 1 and index_fields:
      raise ValueError(
          f"{dataset} yields packed batches, whose {index_fields} index rows of the whole "
          f"batch, so loop.accum_steps={accum_steps} cannot split them into microbatches: "
          "use accum_steps=1 with a larger batch, or data.pipeline.mode='padded'")
    for key, shape in shapes.items():
      if shape[0] % (size * accum_steps):
        where = f" in each of {accum_steps} microbatches" if accum_steps > 1 else ""
        raise ValueError(
            f"{dataset} can yield '{key}' of shape {shape}, whose leading dim does not "
            f"divide over the {size} data-parallel devices{feeds}{where} (mesh "
            f"{dict(mesh.shape) if mesh is not None else {}}): make data.pipeline's "
            f"batch_size, pack_rows and row_multiple multiples of {size * accum_steps}")


def put_batch(batch: Any, mesh: jax.sharding.Mesh | None, *, presplit: bool = False) -> Any:
  """Host batch -> device arrays, the example axis split over ``("data", "fsdp")``.

  Without a mesh the batch goes to the default device. With one, non-presplit
  batches use ``prefjax.parallel.shard_batch`` (multi-process aware; clear
  error when the leading dim does not divide the data-parallel size).
  """
  batch = jax.tree.map(np.asarray, batch)
  if mesh is None:
    return jax.device_put(batch)
  if not presplit:
    return parallel.shard_batch(batch, mesh)
  multiple = parallel.local_batch_multiple(mesh)  # each process passes its own rows
  _check_rows(batch, multiple, axis=1)
  shardings = batch_shardings(batch, mesh, presplit=True, rows_multiple=multiple)
  if jax.process_count() > 1:
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, batch)
  return jax.device_put(batch, shardings)


def micro_batch_shardings(microbatch: Any, mesh: jax.sharding.Mesh) -> Any:
  """``batch_shardings`` of one microbatch of a gradient-accumulation step, whose rows
  must split over the data-parallel devices."""
  _check_rows(microbatch, data_parallel_size(mesh), axis=0)
  return batch_shardings(microbatch, mesh)


def _check_rows(batch: Any, size: int, *, axis: int) -> None:
  """Microbatch leaves (``[rows, ...]``, or ``[M, rows, ...]`` presplit: ``axis``) must split
  their rows over the data-parallel devices (else each device would hold every row and
  run the whole microbatch: no error, no speed-up)."""
  for path, x in jax.tree_util.tree_leaves_with_path(batch):
    if x.ndim > axis and x.shape[axis] % size:
      raise ValueError(f"batch key {jax.tree_util.keystr(path)}: {x.shape[axis]} rows per "
                       f"microbatch (shape {x.shape}) are not divisible by the {size} "
                       "data-parallel devices of the mesh; make the batch size a multiple "
                       "of accum_steps x the data-parallel size, or change the mesh")


def batch_shardings(batch: Any, mesh: jax.sharding.Mesh, *, presplit: bool = False,
                    rows_multiple: int | None = None) -> Any:
  """Per-leaf shardings: the example axis over ``("data", "fsdp")``.

  Leaves whose example axis is not divisible by the data-parallel size (or
  ``rows_multiple``: ``local_batch_multiple`` for one process's rows) or scalars are
  replicated.
  """
  axis = 1 if presplit else 0
  size = data_parallel_size(mesh) if rows_multiple is None else rows_multiple
  axes = tuple(a for a in DATA_AXES if a in mesh.shape)

  def sharding(x):
    shape = getattr(x, "shape", ())
    if len(shape) <= axis or shape[axis] % size:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*([None] * axis), axes))
  return jax.tree.map(sharding, batch)
