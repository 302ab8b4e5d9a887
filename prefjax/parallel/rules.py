"""Regex partition rules -> PartitionSpecs / NamedShardings for pytrees and NNX modules.

A rule set is a list of ``(regex, PartitionSpec)``. Each leaf of a pytree gets
the spec of the FIRST rule whose regex ``re.search``-matches the leaf's
"/"-joined path (``layers/3/attn/q_proj/kernel``); unmatched leaves are
replicated (``P()``). Because the match is a search, the same rules also shard
optimizer states (``opt_state/0/mu/layers/3/attn/q_proj/kernel``).

A spec axis that does not divide the dimension it shards (e.g. 8 heads over a
``tensor`` axis of 3) falls back to replication on that dimension with a
logged warning naming the parameter, or raises with ``strict=True``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from prefjax.parallel.mesh import BATCH_AXES, local_batch_multiple

logger = logging.getLogger(__name__)

Rules = Sequence[tuple[str, P]]
PyTree = Any


def _key_str(key: Any) -> str:
  if isinstance(key, DictKey):
    return str(key.key)
  if isinstance(key, GetAttrKey):
    return key.name
  if isinstance(key, SequenceKey):
    return str(key.idx)
  if isinstance(key, FlattenedIndexKey):
    return str(key.key)
  return str(key)  # nnx flat-state paths are plain str/int tuples


def path_str(path: Sequence[Any]) -> str:
  """"/"-joined keys of a pytree key path or an NNX state path.

  Handles ``DictKey``, ``GetAttrKey``, ``SequenceKey``, ``FlattenedIndexKey``
  and plain ``str``/``int`` keys (``nnx.to_flat_state``). The trailing
  ``.value`` attribute of an ``nnx.Variable`` is dropped, so the kernel of
  ``model.layers[3].attn.q_proj`` is ``layers/3/attn/q_proj/kernel`` whether it
  is reached through ``nnx.state(model)`` or a plain dict.
  """
  path = tuple(path)
  if path and isinstance(path[-1], GetAttrKey) and path[-1].name in ("value", "raw_value"):
    path = path[:-1]
  return "/".join(_key_str(k) for k in path)


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _fit_spec(spec: P, name: str, pattern: str, shape: tuple[int, ...], mesh: Mesh | None,
              strict: bool) -> P:
  """Validates ``spec`` for a leaf of ``shape``; replicates dims the mesh cannot divide."""
  if len(spec) > len(shape):
    raise ValueError(f"partition rule {pattern!r} gives {spec} ({len(spec)} dims) to "
                     f"'{name}' of shape {shape} ({len(shape)} dims)")
  used = [a for entry in spec for a in _spec_axes(entry)]
  if len(used) != len(set(used)):
    raise ValueError(f"partition rule {pattern!r} uses a mesh axis twice in {spec} for '{name}'")
  if mesh is None:
    return spec
  fitted = []
  for dim, entry in enumerate(spec):
    axes = _spec_axes(entry)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
      msg = (f"'{name}': partition rule {pattern!r} names mesh axes {missing} that the mesh "
             f"{dict(mesh.shape)} lacks")
      if strict:
        raise ValueError(msg)
      logger.warning("%s; replicating dim %d", msg, dim)
      fitted.append(None)
      continue
    size = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % size:
      msg = (f"'{name}' of shape {shape}: dim {dim} (size {shape[dim]}) is not divisible by "
             f"mesh axes {axes} (size {size}) from rule {pattern!r}")
      if strict:
        raise ValueError(msg)
      logger.warning("%s; replicating that dim", msg)
      fitted.append(None)
      continue
    fitted.append(entry)
  return P(*fitted)


def match_partition_specs(rules: Rules, tree: PyTree, *, mesh: Mesh | None = None,
                          strict: bool = False) -> PyTree:
  """A PartitionSpec for every array leaf of ``tree`` (same structure).

  Args:
    rules: ``[(regex, PartitionSpec), ...]``; first ``re.search`` match wins.
    tree: any pytree of arrays / ``jax.ShapeDtypeStruct`` (dicts, lists,
      dataclasses, ``nnx.State``); non-array leaves get ``P()``.
    mesh: when given, specs are checked against the mesh (axes present,
      dimensions divisible) and fall back to replication where they do not fit.
    strict: raise instead of falling back.

  Returns:
    a pytree of ``PartitionSpec`` shaped like ``tree``.

  Raises:
    ValueError: a rule gives more dims than the leaf has, repeats a mesh axis,
      or (strict) does not fit the mesh; the message names the leaf and rule.
  """
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def spec_for(path, leaf):
    shape = getattr(leaf, "shape", None)
    if shape is None:
      return P()
    name = path_str(path)
    for regex, spec in compiled:
      if regex.search(name):
        return _fit_spec(spec, name, regex.pattern, tuple(shape), mesh, strict)
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def named_shardings(mesh: Mesh, rules: Rules, tree: PyTree, *, strict: bool = False) -> PyTree:
  """``NamedSharding(mesh, spec)`` for every array leaf (specs from ``match_partition_specs``)."""
  specs = match_partition_specs(rules, tree, mesh=mesh, strict=strict)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_tree(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places ``tree`` according to a matching pytree of shardings (``jax.device_put``)."""
  return jax.device_put(tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules, *, strict: bool = False) -> PyTree:
  """Shards every variable of an NNX module in place (nnx.state -> device_put -> nnx.update).

  Returns:
    the ``nnx.State`` of ``NamedSharding`` that was applied (for
    ``jit_sharded`` in/out shardings).
  """
  state = nnx.state(model)
  shardings = named_shardings(mesh, rules, state, strict=strict)
  nnx.update(model, jax.device_put(state, shardings))
  return shardings


def init_sharded(model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, *,
                 strict: bool = False) -> tuple[nnx.Module, PyTree]:
  """Builds an NNX module directly in its sharded layout (no full copy on one device).

  ``model_fn`` (no arguments, creating its own ``nnx.Rngs``) is first traced
  abstractly (``nnx.eval_shape``) to get parameter paths and shapes, then run
  under ``jax.jit`` with the rule-derived ``out_shardings``, so every device
  only ever materialises its own shards. Same values as ``model_fn()`` followed
  by :func:`shard_model`.

  Returns:
    ``(model, state_shardings)``.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(model_fn))
  shardings = named_shardings(mesh, rules, abstract_state, strict=strict)

  def init_state():
    return nnx.state(model_fn())

  with jax.set_mesh(mesh):
    state = jax.jit(init_state, out_shardings=shardings)()
  return nnx.merge(graphdef, state), shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dim over the batch axes ``("data", "fsdp")`` present in ``mesh``; rest replicated."""
  if ndim == 0:
    return NamedSharding(mesh, P())
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes if axes else None, *([None] * (ndim - 1))))


# Per-example fields of pair/sequence batches; row fields [n*B, ...] are response-major.
EXAMPLE_MASK_FIELDS = ("pair_mask", "example_mask")
# Packed-batch fields holding row indices into one process's batch.
ROW_INDEX_FIELDS = ("chosen_index", "rejected_index", "sequence_index")


def check_joinable_across_processes(fields: Iterable[str]) -> None:
  """Raises when a batch with these fields cannot be joined over this job's processes:
  a packed batch's row indices point into one process's own rows."""
  packed = sorted(set(fields) & set(ROW_INDEX_FIELDS))
  if packed and jax.process_count() > 1:
    raise ValueError(
        f"packed batches ({packed} index rows of one process's batch) cannot be joined "
        f"over {jax.process_count()} processes: use --config.data.pipeline.mode=padded "
        "--config.data.pipeline.share_prompt=False")


def _examples_per_process(batch: PyTree) -> int | None:
  if isinstance(batch, dict):
    for key in EXAMPLE_MASK_FIELDS:
      if key in batch:
        return int(np.shape(batch[key])[0])
  return None


def _put_response_major(x: np.ndarray, responses: int, mesh: Mesh) -> jax.Array:
  """Local ``[n*B, ...]`` rows (response i of example b at ``i*B + b``) -> the global
  ``[n*P*B, ...]`` array in the same response-major layout over all processes."""
  local = x.reshape(responses, -1, *x.shape[1:])
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  split = NamedSharding(mesh, P(None, axes, *([None] * (x.ndim - 1))))
  global_ = jax.make_array_from_process_local_data(split, local)
  merge = jax.jit(lambda a: a.reshape(-1, *a.shape[2:]),
                  out_shardings=batch_sharding(mesh, x.ndim))
  return merge(global_)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Shards every array of ``batch`` along its leading dim over ``("data", "fsdp")``.

  Single process: ``jax.device_put``. Multiple processes: each process passes
  its LOCAL slice and the global batch is their concatenation
  (``jax.make_array_from_process_local_data``), except for the row fields of
  pair batches (``[n*B, ...]`` for ``B`` = len(``pair_mask``/``example_mask``),
  response-major: the n responses of example b at rows ``b, B+b, ...``), whose
  global array keeps that layout over all ``P*B`` examples (chosen rows first,
  then rejected), as the losses expect.

  Raises:
    ValueError: a leading dim not divisible by the batch-axis size (names the key).
  """
  batch_size = local_batch_multiple(mesh)
  multi_process = jax.process_count() > 1
  examples = _examples_per_process(batch) if multi_process else None
  if isinstance(batch, dict):
    check_joinable_across_processes(batch)

  def put(path, x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if x.ndim and x.shape[0] % batch_size:
      local = " (per-process)" if multi_process else ""
      raise ValueError(f"batch field '{path_str(path)}' has leading dim {x.shape[0]}{local}, "
                       f"not divisible by the {batch_size} devices of mesh axes {BATCH_AXES}"
                       f"{' this process feeds' if multi_process else ''}")
    if multi_process:
      responses = x.shape[0] // examples if examples and x.ndim else 1
      if responses > 1 and x.shape[0] == responses * examples:
        return _put_response_major(np.asarray(x), responses, mesh)
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)


def gather_rows(x: np.ndarray, mesh: Mesh) -> np.ndarray:
  """Host rows ``x`` (``[B, ...]`` per process) of every process, joined as
  :func:`shard_batch` joins a batch's rows: the global batch's values, in its order (one
  copy of rows that several processes hold). Call it in every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  x = np.asarray(x)
  global_ = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return np.asarray(multihost_utils.process_allgather(global_, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """Inverse of :func:`shard_batch` for per-example outputs ``[P*B, ...]``: this process's
  own ``B`` rows as NumPy (all rows on a single process)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  shards = {}
  for shard in x.addressable_shards:  # Replicas (e.g. over "tensor") hold the same rows.
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def jit_sharded(fn: Callable[..., Any], in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = (), **jit_kwargs: Any) -> Callable[..., Any]:
  """``jax.jit`` with explicit in/out shardings (pjit is jit since jax 0.4.x)."""
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums, **jit_kwargs)


def _leaf_spec(x: Any) -> P | None:
  sharding = x if isinstance(x, NamedSharding) else getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return sharding.spec
  return x if isinstance(x, P) else None


def _human_bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def describe_shardings(tree: PyTree) -> str:
  """One line per leaf: path, shape, dtype, PartitionSpec and per-device shard shape.

  Leaves may be arrays, ``ShapeDtypeStruct``, ``NamedSharding`` or
  ``PartitionSpec``. The last line totals the elements and the bytes each
  device holds for the sharded arrays.
  """
  lines = []
  total_elems = 0
  per_device_bytes = 0
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, (P, NamedSharding)))[0]
  for path, leaf in leaves:
    spec = _leaf_spec(leaf)
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    parts = [path_str(path) or "<root>"]
    if shape is not None and dtype is not None:
      parts.append(f"{tuple(shape)} {dtype}")  # str(): also typed PRNG keys (key<fry>)
      total_elems += math.prod(shape)
      sharding = getattr(leaf, "sharding", None)
      shard_shape = tuple(sharding.shard_shape(tuple(shape))) if sharding is not None else shape
      per_device_bytes += math.prod(shard_shape) * getattr(dtype, "itemsize", 0)
      if tuple(shard_shape) != tuple(shape):
        parts.append(f"shard {tuple(shard_shape)}")
    parts.append(str(spec) if spec is not None else "unsharded")
    lines.append("  ".join(parts))
  lines.append(f"total: {total_elems:,} elements, {_human_bytes(per_device_bytes)} per device")
  return "\n".join(lines)
