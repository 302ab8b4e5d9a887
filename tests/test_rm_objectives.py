"""Multi-objective reward models (``multi:a,b``): objective labels, the per-objective loss,
and its normalisation under gradient accumulation."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import train_rm
from prefjax import rm
from prefjax import train
from prefjax.rm import labels
from tests.test_train_rm import _fake_model
from tests.test_train_rm import _log_sigmoid
from tests.test_train_rm import _pair_batch
from tests.test_train_rm import data_env  # pylint: disable=unused-import
from tests.test_train_rm import small_config
from tests.test_train_rm import tmp_path  # pylint: disable=unused-import

OBJECTIVES = ("helpful", "harmless")


def test_multi_objective_loss_uses_only_labelled_pairs():
  rows = [{"id": f"r{i}", "meta": {"objective": lab}}
          for i, lab in enumerate(["helpful", "harmless", ["helpful", "harmless"], None])]
  table = labels.objective_table(rows, ("helpful", "harmless"), {})
  np.testing.assert_array_equal(table, [[1, 0], [0, 1], [1, 1], [0, 0]])
  rng = np.random.default_rng(3)
  batch = _pair_batch(4, rng, padded_pairs=0)
  batch["outcome"] = np.ones(4, np.float32)
  batch["example_index"] = np.arange(4, dtype=np.int32)
  batch = labels.add_objective_mask(batch, table)
  r_c, r_r = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=2,
                            objectives=("helpful", "harmless"), num_segments=None)
  loss, metrics = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))
  expected = []
  for o, name in enumerate(("helpful", "harmless")):
    on = table[:, o] > 0
    ref = np.sum(batch["weight"][on] * -_log_sigmoid(r_c[on, o] - r_r[on, o].astype(np.float64)))
    expected.append(ref / on.sum())
    np.testing.assert_allclose(float(metrics[f"objective_loss/{name}"]), expected[-1], rtol=1e-5)
  np.testing.assert_allclose(float(loss), sum(expected), rtol=1e-5)
  with pytest.raises(ValueError, match=r"row r0: meta\['objective'\]='helpful' is not one of"):
    labels.objective_table(rows, ("harmless",), {})
  labels.check_every_objective_labelled(table, ("helpful", "harmless"), {}, "train")
  # A head no pair labels would train on nothing (it ran as a no-op and exited 0).
  with pytest.raises(ValueError, match=r"objective\(s\) \['harmless'\] of the model's "
                                       r"\['helpful', 'harmless'\] label no pair of split "
                                       r"'train' \(meta\['objective'\]"):
    labels.check_every_objective_labelled(table[:1], ("helpful", "harmless"), {}, "train")


@pytest.mark.parametrize("value", [3, {"name": "helpful"}, ["helpful", 2]])
def test_an_objective_label_of_the_wrong_type_names_its_row(value):
  """An integer label crashed with "'int' object is not iterable", naming no row."""
  rows = [{"id": "a.jsonl:1", "meta": {"objective": "helpful"}},
          {"id": "a.jsonl:2", "meta": {"objective": value}}]
  with pytest.raises(ValueError, match=r"row a\.jsonl:2: meta\['objective'\]=.* must be an "
                                       r"objective name or a list of them"):
    labels.objective_table(rows, ("helpful", "harmless"), {})


def test_an_empty_objective_list_counts_as_unlabelled(caplog):
  """It used to train on no objective without being counted among the unlabelled pairs."""
  rows = [{"id": "r0", "meta": {"objective": []}}, {"id": "r1", "meta": {"objective": "helpful"}}]
  with caplog.at_level(logging.WARNING):
    table = labels.objective_table(rows, ("helpful",), {})
  np.testing.assert_array_equal(table, [[0], [1]])
  assert "1 of 2 pairs have no objective label" in caplog.text

class _BagOfTokensObjectives(nnx.Module):
  """One reward per objective: the sum of the tokens' scores in that objective's column."""

  def __init__(self, vocab: int, objectives: int):
    self.embed = nnx.Embed(vocab, objectives, rngs=nnx.Rngs(0))

  def __call__(self, tokens, attention_mask):
    return jnp.sum(self.embed(tokens) * attention_mask[..., None], axis=1)


def _uneven_objective_batch(pairs: int = 8, vocab: int = 13):
  """Strided microbatches of 2 (rows 0, 2, 4, 6 / 1, 3, 5, 7) hold 1 and 3 harmless pairs,
  4 and 2 helpful ones, and one padding pair."""
  rng = np.random.default_rng(4)
  tokens = rng.integers(1, vocab, size=(2 * pairs, 5)).astype(np.int32)
  table = np.asarray([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0], [0, 0]],
                     np.float32)
  index = np.arange(pairs, dtype=np.int32)
  index[-1] = -1  # padding
  batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
           "pair_mask": (index >= 0).astype(np.float32),
           "weight": rng.uniform(0.5, 2.0, pairs).astype(np.float32) * (index >= 0),
           "outcome": rng.choice([1.0, 0.0, 0.5], pairs).astype(np.float32),
           "example_index": index}
  return labels.add_objective_mask(batch, table), vocab


def _reference_loss(model, batch):
  """Σ over objectives of (Σ w·ℓ over its labelled pairs) / (its labelled pairs), float64."""
  rewards = np.asarray(model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])),
                       np.float64)
  pairs = len(batch["pair_mask"])
  margin = rewards[:pairs] - rewards[pairs:]
  o = batch["outcome"][:, None].astype(np.float64)
  per_pair = -(o * _log_sigmoid(margin) + (1 - o) * _log_sigmoid(-margin))
  mask = batch["objective_mask"]
  per_objective = (batch["weight"][:, None] * mask * per_pair).sum(0) / mask.sum(0)
  return per_objective.sum(), per_objective


@pytest.mark.parametrize("accum_steps", [1, 2, 4])
def test_accumulated_objectives_are_normalised_by_the_whole_batch(accum_steps):
  """Each objective's loss divides by its labelled pairs in the whole batch: microbatches
  with 1 and 3 harmless pairs used to give each microbatch's harmless mean equal weight."""
  batch, vocab = _uneven_objective_batch()
  model = _BagOfTokensObjectives(vocab, len(OBJECTIVES))
  expected, per_objective = _reference_loss(model, batch)
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=2, objectives=OBJECTIVES,
                            num_segments=None)
  graphdef, state = train.create_train_state(model, optax.sgd(1.0), 0)
  step = jax.jit(train.make_train_step(graphdef, loss_fn, optax.sgd(1.0),
                                       accum_steps=accum_steps))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  for k, name in enumerate(OBJECTIVES):
    np.testing.assert_allclose(float(metrics[f"objective_loss/{name}"]), per_objective[k],
                               rtol=1e-5)
  assert float(metrics["num_pairs"]) == 7
  assert float(metrics["loss_weight"]) == batch["objective_mask"].sum()  # labelled entries
  # One SGD step at rate 1 moves the table by minus the whole batch's gradient.
  table = np.asarray(state.params["embed"]["embedding"], np.float64)
  eps, grad = 1e-3, np.zeros_like(table)
  for i, j in np.ndindex(*table.shape):
    if not np.isin(i, batch["tokens"]):
      continue
    shifted = []
    for sign in (1, -1):
      probe = _BagOfTokensObjectives(vocab, len(OBJECTIVES))
      probe.embed.embedding[...] = jnp.asarray(table).at[i, j].add(sign * eps)
      shifted.append(_reference_loss(probe, batch)[0])
    grad[i, j] = (shifted[0] - shifted[1]) / (2 * eps)
  moved = table - np.asarray(new_state.params["embed"]["embedding"], np.float64)
  np.testing.assert_allclose(moved, grad, atol=2e-3 * np.abs(grad).max())


def test_objective_loss_without_shares_uses_the_batch_own_labelled_pairs():
  """A batch built without ``labels.add_objective_mask`` (no ``objective_share``) is
  normalised by its own labelled pairs, as one whole batch is."""
  batch, vocab = _uneven_objective_batch()
  model = _BagOfTokensObjectives(vocab, len(OBJECTIVES))
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=2, objectives=OBJECTIVES,
                            num_segments=None)
  with_shares, _ = loss_fn(model, batch, jax.random.key(0))
  without = {k: v for k, v in batch.items() if k != "objective_share"}
  alone, _ = loss_fn(model, without, jax.random.key(0))
  np.testing.assert_allclose(float(alone), float(with_shares), rtol=1e-6)
  np.testing.assert_allclose(float(alone), _reference_loss(model, batch)[0], rtol=1e-5)


def test_objective_shares_sum_to_each_objective_count_over_any_strided_split():
  batch, _ = _uneven_objective_batch()
  np.testing.assert_array_equal(batch["objective_share"].sum(0), [4, 4])
  for accum in (2, 4):
    micro = train.split_microbatches(batch, accum)
    np.testing.assert_allclose(micro["objective_share"].sum(1), [[4 / accum] * 2] * accum)
  with pytest.raises(ValueError, match=r"example_index of shape \(2, 4\)"):
    labels.add_objective_mask({"example_index": np.zeros((2, 4), np.int32)},
                              np.ones((1, 2), np.float32))


def test_objective_counts_count_each_objective_and_the_unlabelled_pairs():
  table = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [0, 0]], np.float32)
  assert labels.objective_counts(table, ("helpful", "harmless")) == {
      "labelled": {"helpful": 2, "harmless": 2}, "unlabelled": 2}


def test_multi_objective_run_reports_each_objective(data_env, tmp_path):
  from prefjax.data import tiny_world  # pylint: disable=g-import-not-at-top
  from prefjax.data.tfds_builders import synthetic  # pylint: disable=g-import-not-at-top
  rows = list(tiny_world.TinyWorld(seed=0).preference_pairs(300, seed=1))
  for i, row in enumerate(rows):
    row["meta"]["objective"] = ["helpful", "harmless", ["helpful", "harmless"]][i % 3]
    row["meta"]["subset"] = ["even", "odd"][i % 2]
  synthetic.write_synthetic_dataset("rm_multi", rows, label_noise=0.0, gold_name="tiny_world",
                                    meta={})
  config = small_config(3)
  config.data.name = "synthetic:rm_multi"
  config.model.head = "multi:helpful,harmless"
  out = train_rm.run(config, str(tmp_path))
  record = train.read_metrics(tmp_path)[-1]
  assert record["loss"] == pytest.approx(
      record["objective_loss/helpful"] + record["objective_loss/harmless"], rel=1e-5)
  for name in ("helpful", "harmless"):
    assert 0.0 <= out["eval"][f"objective/{name}/accuracy"] <= 1.0
  assert out["eval"]["unlabelled_pairs"] == 0
  assert {"accuracy/subset/even", "accuracy/subset/odd"} <= set(out["eval"])
  report = json.loads((tmp_path / "data_report.json").read_text())
  for split in ("train", "eval"):  # a third of the pairs carry both objectives
    counts = report[split]["objective_labels"]
    assert counts["unlabelled"] == 0 and set(counts["labelled"]) == {"helpful", "harmless"}
    assert 1.2 < sum(counts["labelled"].values()) / report[split]["rows_used"] < 1.5, counts
  # Microbatches of 4 pairs: the first step's loss is the whole batch's, as without them.
  first = _first_train_record(tmp_path)
  config.loop.accum_steps = 2
  train_rm.run(config, str(tmp_path / "accum"))
  accumulated = _first_train_record(tmp_path / "accum")
  for key in ("loss", "objective_loss/helpful", "objective_loss/harmless", "num_pairs"):
    assert accumulated[key] == pytest.approx(first[key], rel=1e-5), key


def _first_train_record(workdir):
  return next(r for r in train.read_metrics(workdir) if "objective_loss/helpful" in r)
