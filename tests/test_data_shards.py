"""Which data shard each process reads, from where its devices sit on the mesh.

A batch is split over the batch axes (``data``, ``fsdp``) only. A 2-process job whose
``ensemble`` axis spans the processes read process p's rows for member p: each member
trained on its own half of the data (the docs say members see the same batches), and
the evaluator joined the two processes' rows as one batch of twice the size and
crashed. Processes at the same batch-axis positions now read the same shard. (The
evaluator's row gather, ``parallel.gather_rows``, assembles host rows as the batch is, so
it needs no shard map; a 2-process run checks it: the README's "Multi-host launch".)
"""

import types

import numpy as np
import pytest

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


@pytest.mark.parametrize("owners, axes", [
    ([[0, 1], [0, 0]], ("data", "tensor")),  # position 0 on both processes, 1 on one
    ([[0, 0], [1, 1], [2, 2], [0, 2]], ("data", "tensor")),  # 0 and 2 share position 3
    ([[0, 1], [0, 1]], ("data", "fsdp")),  # interleaved: {0, 2} and {1, 3}
])
def test_a_mesh_splitting_batch_positions_between_processes_is_refused(owners, axes):
  with pytest.raises(ValueError, match="processes hold overlapping or interleaved parts of "
                                       "the batch axes"):
    parallel.data_shards(np.array(owners), axes)


def _fake_mesh(owners, axes):
  devices = np.vectorize(lambda p: types.SimpleNamespace(process_index=int(p)),
                         otypes=[object])(np.asarray(owners))
  return types.SimpleNamespace(devices=devices.reshape(devices.shape + (1,) * (
      len(axes) - devices.ndim)), axis_names=axes)


def test_the_pipeline_reads_the_shard_of_its_batch_positions(monkeypatch):
  mesh = _fake_mesh([0, 1], AXES4)  # two processes, one ensemble member each
  monkeypatch.setattr("jax.process_count", lambda: 2)
  monkeypatch.setattr("jax.process_index", lambda: 1)
  pcfg = experiment.pipeline_config({"pipeline": {"batch_size": 4}}, mesh=mesh)
  assert pcfg.shard() == (0, 1)
  pinned = experiment.pipeline_config({"pipeline": {"batch_size": 4, "shard_index": 1,
                                                    "shard_count": 2}}, mesh=mesh)
  assert pinned.shard() == (1, 2)  # set in the config: kept
  split = _fake_mesh([0, 1], AXES3)  # the data axis over the processes: the usual split
  assert experiment.pipeline_config({"pipeline": {"batch_size": 4}}, mesh=split).shard() == (
      1, 2)


def test_an_eval_batch_larger_than_the_split_is_cut_to_it(caplog):
  """100,000 rows for a 211-pair eval split: every row past 211 was filler, computed."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"eval": {"batch_size": 100_000}})
  split = range(211)
  caplog.set_level("INFO")
  assert experiment.eval_batch_size(config, split, None) == 211
  assert "eval.batch_size=100000 exceeds the 211 examples of the eval split" in caplog.text
  mesh = parallel.mesh_from_config({"shape": (-1, 1, 1)})  # 8 data-parallel devices
  assert experiment.eval_batch_size(config, split, mesh) == 216
  config.eval.batch_size = 64
  assert experiment.eval_batch_size(config, split, mesh) == 64
