"""Which data shard each process reads, from where its devices sit on the mesh.

A batch is split over the batch axes (``data``, ``fsdp``) only. A 2-process job whose
``ensemble`` axis spans the processes read process p's rows for member p: each member
trained on its own half of the data (the docs say members see the same batches), and
the evaluator joined the two processes' rows as one batch of twice the size and
crashed. Processes at the same batch-axis positions now read the same shard.
"""

import types

import numpy as np
import pytest
from jax.experimental import multihost_utils

from prefjax import experiment
from prefjax import parallel

AXES4 = ("ensemble", "data", "fsdp", "tensor")
AXES3 = ("data", "fsdp", "tensor")


@pytest.mark.parametrize("owners, axes, expected", [
    ([0, 1], AXES3, {0: (0, 2), 1: (1, 2)}),  # data over the processes: the usual split
    ([[0, 1]], ("data", "tensor"), {0: (0, 1), 1: (0, 1)}),  # tensor over the processes
    ([0, 1], AXES4, {0: (0, 1), 1: (0, 1)}),  # ensemble members over the processes
    ([[0, 0], [1, 1]], ("ensemble", "data"), {0: (0, 1), 1: (0, 1)}),
    ([[0, 1], [2, 3]], ("ensemble", "data"), {0: (0, 2), 1: (1, 2), 2: (0, 2), 3: (1, 2)}),
    ([[1, 0]], ("fsdp", "data"), {1: (0, 2), 0: (1, 2)}),  # shard order is device order
])
def test_processes_at_the_same_batch_positions_read_the_same_shard(owners, axes, expected):
  owners = np.asarray(owners)
  grid = owners.reshape(owners.shape + (1,) * (len(axes) - owners.ndim))
  assert parallel.data_shards(grid, axes) == expected


def test_a_mesh_splitting_batch_positions_between_processes_is_refused():
  with pytest.raises(ValueError, match="processes hold overlapping parts of the batch axes"):
    # Batch position 0 on devices of both processes, position 1 on process 0's only.
    parallel.data_shards(np.array([[0, 1], [0, 0]]), ("data", "tensor"))


def _fake_mesh(owners, axes):
  devices = np.vectorize(lambda p: types.SimpleNamespace(process_index=int(p)),
                         otypes=[object])(np.asarray(owners))
  return types.SimpleNamespace(devices=devices.reshape(devices.shape + (1,) * (
      len(axes) - devices.ndim)), axis_names=axes)


def test_the_pipeline_and_the_evaluator_s_rows_follow_the_shards(monkeypatch):
  mesh = _fake_mesh([0, 1], AXES4)  # two processes, one ensemble member each
  monkeypatch.setattr("jax.process_count", lambda: 2)
  monkeypatch.setattr("jax.process_index", lambda: 1)
  pcfg = experiment.pipeline_config({"pipeline": {"batch_size": 4}}, mesh=mesh)
  assert pcfg.shard() == (0, 1)
  pinned = experiment.pipeline_config({"pipeline": {"batch_size": 4, "shard_index": 1,
                                                    "shard_count": 2}}, mesh=mesh)
  assert pinned.shard() == (1, 2)  # set in the config: kept
  rows = {0: np.array([10, 11]), 1: np.array([10, 11])}  # both read shard 0
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x, tiled=False: np.stack([rows[0], rows[1]]))
  np.testing.assert_array_equal(parallel.gather_rows(rows[1], mesh), [10, 11])
  split = _fake_mesh([0, 1], AXES3)  # the data axis over the processes: both shards
  rows = {0: np.array([10, 11]), 1: np.array([20, 21])}
  np.testing.assert_array_equal(parallel.gather_rows(rows[1], split), [10, 11, 20, 21])
