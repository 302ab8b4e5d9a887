"""Device meshes from configs.

Axes are ``("data", "fsdp", "tensor")``, optionally preceded by ``"ensemble"``
(reward-model ensemble members on separate device groups). ``tensor`` is the
innermost (fastest-varying) axis so that tensor-parallel groups are neighbouring
devices; ``jax.make_mesh`` then picks a topology-aware device order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from prefjax.parallel import distributed

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
ENSEMBLE_AXIS = "ensemble"
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def resolve_shape(shape: Sequence[int], num_devices: int,
                  axis_names: Sequence[str] | None = None) -> tuple[int, ...]:
  """Replaces a single ``-1`` by the number of remaining devices and validates the shape.

  Args:
    shape: sizes per axis; at most one may be -1.
    num_devices: devices the mesh must cover exactly.
    axis_names: only used in error messages.

  Returns:
    the concrete shape, whose product is ``num_devices``.

  Raises:
    ValueError: more than one -1, a size < 1, or a product that does not
      match (or, with -1, does not divide) the device count.
  """
  shape = tuple(int(s) for s in shape)
  names = f" over axes {tuple(axis_names)}" if axis_names is not None else ""
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}{names} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}{names} has a size < 1 (only -1 is allowed)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
          f"mesh shape {shape}{names}: the product of the fixed sizes ({known}) does not "
          f"divide the device count ({num_devices})")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  elif known != num_devices:
    raise ValueError(
        f"mesh shape {shape}{names} has {known} devices but {num_devices} are available; "
        "use -1 for one axis to take all remaining devices")
  return shape


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with every axis of type ``Auto`` (jax 0.10's default is ``Explicit``).

  Args:
    shape: sizes per axis; one may be -1 (all remaining devices).
    axis_names: one name per axis.
    devices: defaults to ``jax.devices()``.
  """
  axis_names = tuple(axis_names)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} and axis names {axis_names} differ in length")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"duplicate mesh axis names {axis_names}")
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(shape, len(devices), axis_names)
  return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def mesh_from_config(mesh_cfg: Any, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh described by a config (ml_collections ConfigDict, dict or object).

  Accepted forms of ``mesh_cfg.shape``:
    * a sequence over ``("data", "fsdp", "tensor")``, e.g. ``(-1, 1, 1)``;
    * a sequence of 4 over ``("ensemble", "data", "fsdp", "tensor")``;
    * a mapping ``{axis: size}``; missing standard axes get size 1 and the axes
      are put in the canonical order.
  ``mesh_cfg.axis_names`` overrides the names of a sequence shape, and an
  integer ``mesh_cfg.ensemble`` > 1 prepends an ``ensemble`` axis of that size.

  Examples: ``{"shape": (-1, 1, 1)}`` is pure data parallelism;
  ``{"shape": (2, 2, 2)}`` on 8 devices; ``{"shape": (-1, 1, 1), "ensemble": 4}``.
  """
  shape = _get(mesh_cfg, "shape")
  if shape is None:
    raise ValueError(f"mesh config has no 'shape': {mesh_cfg!r}")
  names = _get(mesh_cfg, "axis_names")
  if isinstance(shape, Mapping) or hasattr(shape, "items"):  # dict or ConfigDict
    sizes = dict(shape.items())
    unknown = set(sizes) - set(MESH_AXES) - {ENSEMBLE_AXIS}
    if unknown and names is None:
      raise ValueError(f"mesh config shape has unknown axes {sorted(unknown)}; known: "
                       f"{(ENSEMBLE_AXIS,) + MESH_AXES} (or set mesh.axis_names)")
    order = tuple(names) if names is not None else (
        ((ENSEMBLE_AXIS,) if ENSEMBLE_AXIS in sizes else ()) + MESH_AXES)
    shape = [sizes.get(a, 1) for a in order]
    names = order
  else:
    shape = list(shape)
    if names is None:
      if len(shape) == len(MESH_AXES):
        names = MESH_AXES
      elif len(shape) == len(MESH_AXES) + 1:
        names = (ENSEMBLE_AXIS,) + MESH_AXES
      else:
        raise ValueError(f"mesh config shape {tuple(shape)} must have 3 entries "
                         f"{MESH_AXES} or 4 with a leading '{ENSEMBLE_AXIS}', or set "
                         "mesh.axis_names")
  ensemble = _get(mesh_cfg, "ensemble")
  if ensemble is not None and int(ensemble) < 0:
    raise ValueError(f"mesh.ensemble={ensemble}: 0 or 1 (no ensemble axis) or its size")
  if ensemble is not None and int(ensemble) > 1:
    if ENSEMBLE_AXIS in names:
      raise ValueError("mesh config gives the ensemble axis twice (shape and 'ensemble')")
    shape, names = [int(ensemble)] + shape, (ENSEMBLE_AXIS,) + tuple(names)
  return make_mesh(shape, names, devices=devices)


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
  """Product of the sizes of ``axes`` in ``mesh`` (None -> 1)."""
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def data_shards(process_of_device: np.ndarray, axis_names: Sequence[str]
                ) -> dict[int, tuple[int, int]]:
  """Each process's ``(shard index, shard count)`` of the data, for a mesh whose devices
  (in mesh layout) belong to the processes ``process_of_device``.

  A batch is split over the mesh's batch axes (``BATCH_AXES``) only; processes whose
  devices sit at the same positions along them hold the same rows of it, so they must
  read the same data shard (an ``ensemble`` or ``tensor`` axis across processes). Shards
  are numbered in the order of their positions, the order in which
  ``jax.make_array_from_process_local_data`` joins the processes' rows.
  """
  grid = np.asarray(process_of_device)
  batch = [i for i, name in enumerate(axis_names) if name in BATCH_AXES]
  sizes = [grid.shape[i] for i in batch]
  positions: dict[int, set[int]] = {}
  for index in np.ndindex(grid.shape):
    flat = int(np.ravel_multi_index([index[i] for i in batch], sizes)) if batch else 0
    positions.setdefault(int(grid[index]), set()).add(flat)
  slices = sorted({frozenset(p) for p in positions.values()}, key=min)
  if sum(map(len, slices)) != len(frozenset().union(*slices)) or any(
      max(s) - min(s) + 1 != len(s) for s in slices):
    raise ValueError(f"processes hold overlapping or interleaved parts of the batch axes "
                     f"({[sorted(s) for s in slices]} of {math.prod(sizes)} positions): lay "
                     "the mesh out so that each process holds one contiguous block of them")
  return {p: (slices.index(frozenset(pos)), len(slices)) for p, pos in positions.items()}


def first_holder_of_data_shard(mesh: Mesh | None) -> bool:
  """Whether this process is the lowest-numbered one reading its data shard, so that counts
  of the data (tokens) summed over such processes count every row once. True for one
  process or no mesh."""
  if mesh is None or jax.process_count() == 1:
    return True
  shards = _process_shards(mesh)
  mine = shards[jax.process_index()][0]
  return jax.process_index() == min(p for p, (index, _) in shards.items() if index == mine)


def summed_counts(counts: Mapping[str, int], mesh: Mesh | None,
                  per_step: Sequence[str] = ()) -> dict[str, int]:
  """Counts of the data (rows read, dropped, tokens) summed over processes, each data
  shard once (``first_holder_of_data_shard``): each process counts only its own rows.
  ``per_step`` keys (``batches``) count steps every process takes: their largest value.
  A collective every process must enter; one process: ``counts``."""
  if jax.process_count() == 1:
    return dict(counts)
  total: dict[str, int] = {}
  for counted, part in distributed.gather_json([first_holder_of_data_shard(mesh),
                                                {k: int(v) for k, v in counts.items()}]):
    for key, value in part.items():
      if key in per_step:
        total[key] = max(total.get(key, 0), value)
      else:
        total[key] = total.get(key, 0) + (value if counted else 0)
  return total


def data_shard(mesh: Mesh) -> tuple[int, int]:
  """This process's ``(shard index, shard count)`` of the data on ``mesh`` (``data_shards``):
  ``(process_index, process_count)`` when the batch axes span the processes."""
  return _process_shards(mesh)[jax.process_index()]


def local_batch_multiple(mesh: Mesh) -> int:
  """What the rows of this process's batch must be a multiple of to split over ``mesh``'s
  batch axes: their size, divided by the number of data shards when several processes each
  pass their own shard's rows (2 hosts x 4 devices: 4 rows a host, not 8)."""
  size = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
  return size // data_shard(mesh)[1] if jax.process_count() > 1 else size


def _process_shards(mesh: Mesh) -> dict[int, tuple[int, int]]:
  """``data_shards`` of the processes owning ``mesh``'s devices."""
  owners = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  return data_shards(owners, mesh.axis_names)
