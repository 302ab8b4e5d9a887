"""Blocks read ahead on a background thread: the same examples, errors in the caller."""

import threading

import numpy as np
import pytest

from prefjax.data import pipeline
from prefjax.data import read_ahead
from prefjax.data import tokenize


class Recorder:
  """``read(positions)`` -> ``["ex<p>", ...]``, noting each call's positions and thread."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, positions):
    self.calls.append((list(positions), threading.current_thread() is threading.main_thread()))
    if self.fail_at is not None and self.fail_at in positions:
      raise ValueError(f"row {self.fail_at}: field 'weight'=-1 not in [0.0, inf]")
    return [f"ex{p}" for p in positions]


def test_blocks_are_read_once_and_the_next_in_the_background():
  read = Recorder()
  reader = read_ahead.BlockReader(read, length=10, size=4)
  assert reader.block(0) == {0: "ex0", 1: "ex1", 2: "ex2", 3: "ex3"}
  assert reader.block(4) == {4: "ex4", 5: "ex5", 6: "ex6", 7: "ex7"}
  assert reader.block(8) == {8: "ex8", 9: "ex9"}
  assert read.calls == [([0, 1, 2, 3], True), ([4, 5, 6, 7], False), ([8, 9], False)]


def test_a_jump_reads_in_the_caller_and_reset_drops_the_block_ahead():
  read = Recorder()
  reader = read_ahead.BlockReader(read, length=10, size=3)
  reader.block(0)
  assert reader.block(5) == {5: "ex5", 6: "ex6", 7: "ex7"}  # not the block read ahead (3..5)
  reader.reset()
  assert reader.block(2) == {2: "ex2", 3: "ex3", 4: "ex4"}
  assert ([5, 6, 7], True) in read.calls and ([2, 3, 4], True) in read.calls


def test_an_error_in_the_block_ahead_surfaces_in_the_caller_when_needed():
  reader = read_ahead.BlockReader(Recorder(fail_at=5), length=10, size=4)
  assert reader.block(0)[3] == "ex3"  # the bad row's block is being read: no error yet
  with pytest.raises(ValueError, match=r"row 5: field 'weight'=-1"):
    reader.block(4)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_pipeline_batches_and_state_do_not_depend_on_the_block_size(mode):
  source = [{"prompt": f"question {i} " * (1 + i % 5), "chosen": f"yes {i} " * (1 + i % 3),
             "rejected": f"no {i}"} for i in range(40)]
  runs = []
  for size in (1, 3, 64):
    cfg = pipeline.PipelineConfig(seed=3, batch_size=4, max_length=48, max_prompt_length=32,
                                  bucket_boundaries=(24, 32), pack_rows=4, pack_length=64,
                                  mode=mode, read_ahead=size, num_epochs=1,
                                  drop_remainder=False)
    it = iter(pipeline.preference_dataset(source, tokenize.ByteTokenizer(), cfg))
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    batches += list(it)
    runs.append((batches, state, it.counters))
  for batches, state, counters in runs[1:]:
    assert state == runs[0][1] and counters == runs[0][2]
    assert len(batches) == len(runs[0][0]) > 3
    for x, y in zip(batches, runs[0][0]):
      assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
