"""Packed batches that drop their trailing empty rows (``PipelineConfig.trim_rows``).

A trimmed batch must hold exactly the rows of the fixed-shape batch that carry
tokens (rounded up to ``row_multiple``), so every model gives the same rewards and
gradients; the shapes it can take are listed up front and checked against the mesh.
"""

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import experiment
from prefjax import train
from prefjax.data import pipeline
from prefjax.data import tokenize
from tests.test_shared_prompt import _decoder_rm, _rewards_and_grads, _source

TOK = tokenize.ByteTokenizer()
ROW_FIELDS = ("tokens", "segment_ids", "positions", "loss_mask", "prefix_ids")


LAYOUTS = {
    "shared": dict(share_prompt=True, pack_length=96, max_segments_per_row=9),
    "pairs": dict(pack_length=64, max_segments_per_row=4),
}


def _config(layout, **overrides):
  base = dict(seed=0, batch_size=3, max_length=48, max_prompt_length=32, num_epochs=1,
              shuffle=False, shard_index=0, shard_count=1, mode="packed", pack_rows=4,
              pack_window=6, **LAYOUTS[layout])
  return pipeline.PipelineConfig(**{**base, **overrides})


def _batches(layout, **overrides):
  return list(pipeline.preference_dataset(_source(), TOK, _config(layout, **overrides)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("multiple", [1, 2])
def test_trimmed_batches_are_the_fixed_batches_without_their_empty_rows(layout, multiple):
  fixed = _batches(layout)
  config = _config(layout, trim_rows=True, row_multiple=multiple)
  dataset = pipeline.preference_dataset(_source(), TOK, config)
  trimmed = list(dataset)
  shapes = {s["tokens"] for s in dataset.batch_shapes()}
  assert shapes == {(rows, config.row_length) for rows in range(multiple, 5, multiple)}
  assert len(trimmed) == len(fixed)
  rows_kept = []
  for full, cut in zip(fixed, trimmed):
    used = int(np.flatnonzero(full["segment_ids"].any(1)).max()) + 1
    rows = -(-used // multiple) * multiple
    rows_kept.append(rows)
    assert cut["tokens"].shape in shapes and cut["tokens"].shape[0] == rows
    for key, value in full.items():
      want = value[:rows] if key in ROW_FIELDS else value
      np.testing.assert_array_equal(cut[key], want, err_msg=key)
    assert not full["segment_ids"][rows:].any() and not full["loss_mask"][rows:].any()
  assert min(rows_kept) < 4, "no batch was trimmed: the test would prove nothing"


def test_sequence_batches_are_trimmed_too():
  rows = [{"prompt": "q" * (i % 7), "response": " r" * (1 + i % 5)} for i in range(9)]
  config = _config("pairs", batch_size=2, trim_rows=True)
  fixed = list(pipeline.sft_dataset(rows, TOK, _config("pairs", batch_size=2),
                                    response_key="response"))
  trimmed = list(pipeline.sft_dataset(rows, TOK, config, response_key="response"))
  kept = [b["tokens"].shape[0] for b in trimmed]
  assert kept == [int(np.flatnonzero(b["segment_ids"].any(1)).max()) + 1 for b in fixed]
  assert min(kept) < 4
  for full, cut in zip(fixed, trimmed):
    np.testing.assert_array_equal(cut["sequence_index"], full["sequence_index"])
    np.testing.assert_array_equal(cut["tokens"], full["tokens"][:len(cut["tokens"])])


@pytest.mark.parametrize("overrides,message", [
    (dict(mode="padded", share_prompt=False), "trim_rows needs mode='packed'"),
    (dict(row_multiple=3), "a multiple of row_multiple=3"),
    (dict(row_multiple=0), "row_multiple=0 >= 1"),
])
def test_bad_trim_settings_are_an_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    _config("shared", trim_rows=True, **overrides)


def test_processes_and_eval_passes_get_full_rows():
  config = _config("shared", trim_rows=True, row_multiple=2)
  assert config.same_shapes_across_processes().row_counts() == (4,)
  padded = experiment.pipeline_config({"pipeline": dataclasses.asdict(config)}, mode="padded")
  assert (padded.mode, padded.trim_rows, padded.share_prompt) == ("padded", False, False)


def test_batch_shapes_are_checked_against_the_data_parallel_devices():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  ok = pipeline.preference_dataset(_source(), TOK, _config("shared", trim_rows=True,
                                                           row_multiple=2, batch_size=4))
  train.check_batch_shapes(ok, mesh)
  train.check_batch_shapes(ok, None)
  odd = pipeline.preference_dataset(_source(), TOK, _config("shared", trim_rows=True,
                                                            batch_size=4))
  with pytest.raises(ValueError, match=r"'tokens' of shape \(1, 96\).*multiples of 2"):
    train.check_batch_shapes(odd, mesh)
  # Padded: 3 pairs are 6 token rows, which split over 2 devices; the pairs do not.
  three = pipeline.preference_dataset(_source(), TOK, dataclasses.replace(
      _config("pairs", batch_size=3), mode="padded"))
  with pytest.raises(ValueError, match=r"'pair_mask' of shape \(3,\).*multiples of 2"):
    train.check_batch_shapes(three, mesh)
  # Each of 2 microbatches must split too: 2 of 4 pairs do over 2 devices, 1 of 2 does not.
  four = pipeline.preference_dataset(_source(), TOK, dataclasses.replace(
      _config("pairs", batch_size=4), mode="padded"))
  train.check_batch_shapes(four, mesh, accum_steps=2)
  with pytest.raises(ValueError, match=r"'pair_mask' of shape \(4,\).*devices in each of 4 "
                                       r"microbatches.*multiples of 8"):
    train.check_batch_shapes(four, mesh, accum_steps=4)


def test_packed_batches_with_gradient_accumulation_are_refused_before_training():
  """Their row-index fields cannot be split by rows: the step refused them at step 1, after
  the model was built and the workdir written (a helper's audit)."""
  packed = pipeline.preference_dataset(_source(), TOK, _config("shared", batch_size=4))
  train.check_batch_shapes(packed, None)
  with pytest.raises(ValueError, match=r"packed batches, whose \['chosen_index'\] index rows "
                                       r".*accum_steps=2.*padded"):
    train.check_batch_shapes(packed, None, accum_steps=2)


def test_packed_batches_are_refused_before_training_in_multi_process_runs(monkeypatch):
  packed = pipeline.preference_dataset(_source(), TOK, _config("shared", batch_size=4))
  padded = pipeline.preference_dataset(_source(), TOK, dataclasses.replace(
      _config("pairs", batch_size=4), mode="padded"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  train.check_batch_shapes(packed, mesh)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"packed batches.*2 processes.*mode=padded"):
    train.check_batch_shapes(packed, mesh)
  train.check_batch_shapes(padded, mesh)


def test_reward_model_gives_the_same_rewards_and_gradients_on_trimmed_rows():
  model = _decoder_rm()
  results = {}
  for trim in (False, True):
    for batch in _batches("shared", trim_rows=trim):
      rewards, grads = _rewards_and_grads(model, {k: jnp.asarray(v) for k, v in batch.items()})
      flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(grads, nnx.Param))])
      results.setdefault(trim, []).append((np.asarray(rewards), flat, batch["tokens"].shape))
  assert any(t[2] != f[2] for t, f in zip(results[True], results[False]))
  for (r_cut, g_cut, _), (r_full, g_full, _) in zip(results[True], results[False]):
    np.testing.assert_allclose(r_cut, r_full, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(g_cut - g_full) <= 1e-5 * np.linalg.norm(g_full)
