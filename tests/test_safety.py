"""Tests for the safety classifier (``prefjax.feedback.safety*``, ``experiments/train_safety.py``)
and the filtered best-of-n (``prefjax.overopt.filtered``)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import special

from configs.safety import tiny as tiny_config
from experiments import train_safety
from prefjax import models
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import sources
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.data import tokenize
from prefjax.feedback import safety
from prefjax.feedback import safety_runtime
from prefjax.losses import classification
from prefjax.overopt import filtered
from prefjax.rm import labels


@pytest.fixture
def tmp_path():
  # Not pytest's numbered basetemp: concurrent pytest sessions on a shared machine prune it.
  with tempfile.TemporaryDirectory(prefix="test_safety_") as d:
    yield pathlib.Path(d)


def ref_weighted_bce(z, y, wp, wn):
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  log_sig = -np.logaddexp(0.0, -z)
  log_sig_neg = -np.logaddexp(0.0, z)
  loss = -(wp * y * log_sig + wn * (1 - y) * log_sig_neg)
  sig = special.expit(z)
  grad = -wp * y * (1 - sig) + wn * (1 - y) * sig
  return loss, grad


def test_weighted_bce_matches_float64_reference_and_gradient():
  z = np.array([-3.0, -0.5, 0.0, 0.7, 2.5, 40.0, -1e4, 1e4])
  y = np.array([1.0, 0.0, 1.0, 0.3, 0.0, 1.0, 1.0, 0.0])
  loss, grad = ref_weighted_bce(z, y, 3.0, 0.5)
  got = classification.weighted_binary_cross_entropy(jnp.asarray(z, jnp.float32), y,
                                                     pos_weight=3.0, neg_weight=0.5)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), loss, rtol=1e-5)
  g = jax.grad(lambda v: jnp.sum(classification.weighted_binary_cross_entropy(
      v, y, pos_weight=3.0, neg_weight=0.5)))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(np.asarray(g), grad, rtol=1e-5, atol=1e-7)
  assert float(got[6]) == pytest.approx(3.0 * 1e4)  # stable at |z| = 1e4
  with pytest.raises(AssertionError, match="shape"):  # [8] against [8, 1]: an [8, 8] loss
    classification.weighted_binary_cross_entropy(z, y[:, None])


def test_class_weights():
  assert safety.class_weights("balanced", 10, 90) == (9.0, 1.0)
  assert safety.class_weights(2.5, 10, 90) == (2.5, 1.0)
  with pytest.raises(ValueError, match="both classes"):
    safety.class_weights("balanced", 0, 5)
  with pytest.raises(ValueError, match="'balanced' or a positive number"):
    safety.class_weights("heavy", 1, 5)
  # Categories (the helper's split: 1,600 train pairs, 449 heavy, 684 light, 467 none).
  table = np.zeros((1600, 2))
  table[:449, 0] = 1
  table[449:1133, 1] = 1
  counts = safety.class_counts(1600, table)
  assert counts == ([449, 684], [1600 + 684, 1600 + 449])
  assert safety.class_weights("balanced", *counts) == ((2284 / 449, 2049 / 684), 1.0)
  assert safety.class_counts(1600, None) == (1600, 1600)
  with pytest.raises(ValueError, match=r"in every category\); got \[3, 0\] harmful"):
    safety.class_weights("balanced", [3, 0], [5, 5])


SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
LABELS = np.array([0, 1, 0, 0, 1, 1, 0, 1])


@pytest.mark.parametrize("target,threshold,precision,recall", [
    # precision of "score >= t" by hand: t=.8: 1/1, .7: 1/2, .6: 2/3, .5: 3/4, .4: 3/5,
    # .3: 3/6, .2: 4/7, .1: 4/8; recall .25, .25, .5, .75, .75, .75, 1, 1. The most recall
    # reaching the target wins, and of equal recall the highest t (.5 over .4, .2 over .1).
    # The threshold reported is halfway down to the next lower score (.5 -> .45).
    (0.75, 0.45, 0.75, 0.75), (0.7, 0.45, 0.75, 0.75), (0.6, 0.45, 0.75, 0.75),
    (0.5, 0.15, 4 / 7, 1.0), (0.9, 0.75, 1.0, 0.25), (1.0, 0.75, 1.0, 0.25)])
def test_choose_threshold_hand_computed(target, threshold, precision, recall):
  choice = safety.choose_threshold(SCORES, LABELS, target)
  assert choice.threshold == pytest.approx(threshold)
  assert choice.precision == pytest.approx(precision)
  assert choice.recall == pytest.approx(recall)
  assert choice.reached and not choice.notice


def test_choose_threshold_min_flagged():
  # By hand (SCORES/LABELS): t=.8 flags 1 at precision 1.0, t=.6 flags 3 at 2/3, t=.5 4 at 3/4.
  assert safety.choose_threshold(SCORES, LABELS, 0.9).threshold == pytest.approx(0.75)
  choice = safety.choose_threshold(SCORES, LABELS, 0.7, min_flagged=2)
  assert (choice.threshold, choice.num_flagged) == (pytest.approx(0.45), 4)
  # Every score flags as it did on validation, including the boundary one moved by 1e-7.
  assert np.sum(SCORES >= choice.threshold) == np.sum(SCORES - 1e-7 >= choice.threshold) == 4
  with pytest.raises(ValueError, match="flagging >= 2 examples reaches validation precision"):
    safety.choose_threshold(SCORES, LABELS, 0.9, min_flagged=2)
  with pytest.raises(ValueError, match="min_flagged=9 but the validation split has only 8"):
    safety.choose_threshold(SCORES, LABELS, 0.5, min_flagged=9)


def test_a_threshold_between_adjacent_floats_flags_what_it_reports():
  """Halfway between two adjacent float64 scores rounds onto the lower one, which then was
  flagged too: reported precision 1.0 on 1 flagged, actual 0.5 on 2 (confident classifiers'
  scores near 1 are that close)."""
  low = 0.9999999999999001
  scores, labels = np.array([low, np.nextafter(low, 2.0)]), np.array([0, 1])
  choice = safety.choose_threshold(scores, labels, 1.0)
  flagged = scores >= choice.threshold
  assert flagged.sum() == choice.num_flagged == 1 and labels[flagged].mean() == choice.precision


def test_choose_threshold_unreachable_errors_or_notices():
  scores, labels_ = np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 1, 0, 0])
  with pytest.raises(ValueError, match=r"no threshold flagging >= 1 examples reaches "
                                       r"validation precision >= 0.6: "
                                       r"the best is 0.333 at threshold 0.3"):
    safety.choose_threshold(scores, labels_, 0.6)
  choice = safety.choose_threshold(scores, labels_, 0.6, on_unreachable="max_precision")
  # by hand: t=.9 flags one harmless (0/1), t=.5 flags 1 harmful of 3, t=.1 1 of 4
  assert (choice.threshold, choice.recall, choice.num_flagged) == (0.3, 1.0, 3)
  assert choice.precision == pytest.approx(1 / 3)
  assert not choice.reached and "lower safety.target_precision" in choice.notice
  with pytest.raises(ValueError, match="on_unreachable"):
    safety.choose_threshold(scores, labels_, 0.6, on_unreachable="ignore")
  with pytest.raises(ValueError, match=r"precision_recall_curve: 1 of 4 scores are not "
                                       r"finite \(first at 2\)"):
    safety.choose_threshold(np.array([0.9, 0.5, np.nan, 0.1]), labels_, 0.6)
  with pytest.raises(ValueError, match=r"roc_auc: 1 of 4 scores are not finite"):
    safety.roc_auc(np.array([0.1, np.nan]), np.array([0.5, 0.6]))


def test_roc_auc_matches_brute_force_with_ties_and_bootstrap_weights():
  rng = np.random.default_rng(0)
  neg = rng.integers(0, 5, 40) / 4.0
  pos = rng.integers(1, 6, 40) / 4.0
  counts = rng.multinomial(40, np.full(40, 1 / 40), size=3).astype(np.float64)
  for row in np.concatenate([np.ones((1, 40)), counts]):
    w = row[:, None] * row[None, :]
    credit = (pos[None, :] > neg[:, None]) + 0.5 * (pos[None, :] == neg[:, None])
    expected = np.sum(w * credit) / np.sum(w)
    assert safety.roc_auc(neg, pos, row[None])[0] == pytest.approx(expected, rel=1e-12)


def test_classifier_metrics_point_values_and_intervals():
  scores = safety.PairScores(p_chosen=np.array([0.1, 0.6, 0.2, 0.3]),
                             p_rejected=np.array([0.7, 0.4, 0.9, 0.65]), index=np.arange(4))
  m = safety.classifier_metrics(scores, 0.6, num_resamples=200, seed=0)
  assert m["precision"].value == pytest.approx(3 / 4)  # flagged: .7 .9 .65 (harmful), .6
  assert m["recall"].value == pytest.approx(3 / 4)
  assert m["false_positive_rate"].value == pytest.approx(1 / 4)
  assert m["roc_auc"].value == pytest.approx(15 / 16)  # only (0.6, 0.4) is misordered
  assert m["pair_agreement"].value == pytest.approx(3 / 4)  # pair 1: 0.4 < 0.6
  for est in m.values():
    assert est.low <= est.value <= est.high


def test_harm_targets_binary_and_categories():
  batch = {"weight": jnp.array([1.0, 2.0, 1.0]), "pair_mask": jnp.array([1.0, 1.0, 0.0])}
  t, w = safety.harm_targets(batch, 1)
  np.testing.assert_array_equal(np.asarray(t)[:, 0], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(w)[:, 0], [1, 2, 0, 1, 2, 0])
  batch["objective_mask"] = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
  t, w = safety.harm_targets(batch, 2)
  np.testing.assert_array_equal(np.asarray(t)[3:], [[1, 0], [0, 0], [0, 1]])
  np.testing.assert_array_equal(np.asarray(w)[3:], [[1, 1], [0, 0], [0, 0]])  # no category


def test_loss_fn_reduces_weighted_bce_over_real_entries_float64():
  """Per-category head: chosen rows all 0, rejected rows their category mask; Σw·ℓ / Σw."""
  logits = np.array([[0.5, -1.0], [2.0, 0.1], [9.0, 9.0], [1.5, -0.3], [-0.2, 0.7], [3.0, 3.0]])
  batch = {"tokens": np.zeros((6, 4), np.int32), "attention_mask": np.ones((6, 4), np.int32),
           "weight": np.array([1.0, 2.0, 1.0], np.float32),
           "pair_mask": np.array([1.0, 1.0, 0.0], np.float32),
           "objective_mask": np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)}
  model = lambda tokens, attention_mask: jnp.asarray(logits, jnp.float32)
  loss, metrics = safety.make_loss_fn(pos_weight=4.0)(model, batch, None)
  targets = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1], [0, 0]])
  weights = np.array([[1, 1], [2, 2], [0, 0], [1, 1], [2, 2], [0, 0]], np.float64)
  per, _ = ref_weighted_bce(logits, targets, 4.0, 1.0)
  assert float(loss) == pytest.approx(np.sum(weights * per) / weights.sum(), rel=1e-6)
  correct = (logits > 0) == (targets > 0.5)
  assert float(metrics["accuracy"]) == pytest.approx(np.sum(weights * correct) / 12)
  per_column, _ = safety.make_loss_fn(pos_weight=(4.0, 0.5))(model, batch, None)
  per, _ = ref_weighted_bce(logits, targets, np.array([4.0, 0.5]), 1.0)
  assert float(per_column) == pytest.approx(np.sum(weights * per) / weights.sum(), rel=1e-6)
  assert float(metrics["loss_weight"]) == weights.sum()  # how microbatches pool (train.step)
  # The mean logits are over the entries whose target is harmful / harmless: a rejected
  # row is harmful in its categories only (they averaged every column of rejected rows).
  harmful, harmless = weights * targets, weights * (1 - targets)
  assert float(metrics["mean_logit_harmful"]) == pytest.approx(
      np.sum(harmful * logits) / harmful.sum(), rel=1e-6)
  assert float(metrics["mean_logit_harmless"]) == pytest.approx(
      np.sum(harmless * logits) / harmless.sum(), rel=1e-6)
  assert float(metrics["weight_of/mean_logit_harmful"]) == harmful.sum()


class _OneWeight(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.asarray([0.5]))

  def __call__(self, tokens, attention_mask=None):
    return tokens[:, :1] * self.w[...]


class _RowLogits(nnx.Module):
  """Category logits read off the tokens: row i's logits are its first two token values."""

  def __call__(self, tokens, attention_mask=None):
    return tokens[:, :2].astype(jnp.float32)


def test_pair_scores_leave_out_pairs_whose_rejected_row_names_no_category():
  """Training gives such a row no target; scoring it as harmful cut recall to 2/3."""
  logits = np.array([[-3, -3], [-4, -2], [-5, -5], [3, -1], [-1, 4], [2, 2]], np.int32)
  batch = {"tokens": logits, "attention_mask": np.ones((6, 2), np.int32),
           "pair_mask": np.ones(3, np.float32), "example_index": np.arange(3),
           "objective_mask": np.array([[1, 0], [0, 1], [0, 0]], np.float32)}
  scores = safety.score_pair_batches(_RowLogits(), [batch])
  assert scores.uncategorised == 1 and scores.index.tolist() == [0, 1]
  np.testing.assert_allclose(scores.p_rejected, special.expit([3.0, 4.0]))
  metrics = safety.classifier_metrics(scores, 0.5, num_resamples=10)
  assert metrics["recall"].value == 1.0 and metrics["roc_auc"].value == 1.0


def test_accumulated_microbatches_step_as_one_batch():
  """Strided microbatches: the second holds 3 of the 4 padding pairs. Without loss_weight
  each microbatch's mean counted alike (gradient 0.095 for 0.129)."""
  from prefjax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  pair_mask = np.ones(8, np.float32)
  pair_mask[[1, 3, 5, 6]] = 0.0
  batch = {"tokens": rng.normal(size=(16, 1)).astype(np.float32),
           "attention_mask": np.ones((16, 1), np.int32), "pair_mask": pair_mask,
           "weight": rng.uniform(0.5, 2.0, 8).astype(np.float32)}
  loss_fn, tx = safety.make_loss_fn(pos_weight=2.0), optax.sgd(1.0)
  moved = []
  for accum_steps in (1, 2):
    graphdef, state = train.create_train_state(_OneWeight(), tx, 0)
    state, metrics = jax.jit(step_lib.make_train_step(graphdef, loss_fn, tx,
                                                      accum_steps=accum_steps))(state, batch)
    moved.append((0.5 - float(state.params["w"][0]), float(metrics["loss"])))
  np.testing.assert_allclose(moved[1], moved[0], rtol=1e-5)
  assert abs(moved[0][0]) > 1e-3


@pytest.mark.parametrize("field,value,match", [
    ("target_precision", 1.5, r"target_precision must be in \(0, 1\], got 1.5"),
    ("on_unreachable", "ignore", "on_unreachable must be one of"),
    ("min_flagged", 0, "min_flagged must be >= 1, got 0"),
    ("data.eval_split", "", "threshold on the validation split: set config.data.eval_split")])
def test_train_safety_checks_threshold_options_before_writing(tmp_path, field, value, match):
  config = tiny_config.get_config("quick")
  if field.startswith("data."):
    config.data[field[5:]] = value
  else:
    config.safety[field] = value
  with pytest.raises(ValueError, match=match):
    train_safety.run(config, str(tmp_path))
  assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained():
  """One short train_safety run on tiny-world harm pairs, shared by the tests below."""
  with tempfile.TemporaryDirectory(prefix="test_safety_run_") as d:
    config = tiny_config.get_config("quick")
    config.data.tiny_world.num_pairs = 400
    config.loop.num_steps = 25
    config.optimizer.warmup_steps = 2
    config.loop.tensorboard = False
    config.mesh.num_devices = 1  # one device: 8 fake CPU devices would run 8 replicas
    # One padded length (24) and 32-row batches everywhere: each jitted program compiles once.
    config.data.pipeline.batch_size = 16
    config.safety.eval_batch_size = 16
    config.safety.num_resamples = 100
    config.safety.target_precision = 0.9
    config.export_hf = True
    yield pathlib.Path(d), config, train_safety.run(config, d)


def test_train_safety_tiny_world_learns_and_writes_threshold(trained):
  workdir, _, out = trained
  rep = out["report"]
  assert rep["validation"]["roc_auc"]["value"] > 0.9
  assert rep["test"]["roc_auc"]["value"] > 0.9
  assert rep["test"]["roc_auc"]["low"] <= rep["test"]["roc_auc"]["value"]
  threshold = json.loads((workdir / "threshold.json").read_text())
  assert threshold["reached"] and threshold["precision"] >= 0.9
  assert threshold == {**rep["threshold"], "step": 25}
  assert json.loads((workdir / "summary.json").read_text())["safety"]["final_step"] == 25


def test_export_hf_writes_the_classifier_as_trained(trained):
  """train_safety accepted export_hf=True and wrote nothing."""
  workdir, config, _ = trained
  clf = safety_runtime.SafetyClassifier.from_workdir(str(workdir))
  exported = models.from_pretrained(workdir / "hf", head="reward", dtype=jnp.float32)
  source = safety_runtime.load_split(config.data, "resplit_test")
  batch = next(iter(pipeline_lib.preference_dataset([source[i] for i in range(8)],
                                                    clf.tokenizer, clf.pipeline)))
  tokens, mask = jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
  np.testing.assert_allclose(np.asarray(exported(tokens, attention_mask=mask)),
                             np.asarray(clf.model(tokens, attention_mask=mask)),
                             rtol=1e-5, atol=1e-5)


def test_runtime_classifier_matches_pair_scores_and_labels_pairs(trained):
  workdir, config, _ = trained
  clf = safety_runtime.SafetyClassifier.from_workdir(str(workdir))
  assert clf.threshold == json.loads((workdir / "threshold.json").read_text())["threshold"]
  with pytest.raises(FileNotFoundError, match=r"the folder does not exist: train_safety .* "
                                              r"\(safety.workdir\), or pass a threshold "
                                              r"\(safety.threshold\)"):
    safety_runtime.SafetyClassifier.from_workdir(str(workdir / "missing"))
  source = safety_runtime.load_split(config.data, "resplit_test")
  rows = [source[i] for i in range(16)]
  pcfg = dataclasses.replace(clf.pipeline, batch_size=clf.pipeline.batch_size // 2)
  pairs = safety.score_pair_batches(clf.model, list(pipeline_lib.preference_dataset(
      rows, clf.tokenizer, pcfg)))
  prompts = [r["prompt"] for r in rows]
  p_rej = clf.probabilities(prompts, [r["rejected"] for r in rows])
  p_cho = clf.probabilities(prompts, [r["chosen"] for r in rows])
  np.testing.assert_allclose(p_rej, pairs.p_rejected, rtol=1e-5)
  np.testing.assert_allclose(p_cho, pairs.p_chosen, rtol=1e-5)
  # As a label source: the response without the harm character wins.
  labelled, counts = safety_runtime.label_pairs(
      prompts, [r["rejected"] for r in rows], [r["chosen"] for r in rows], p_rej, p_cho)
  assert counts["labelled"] == len(labelled) == 16
  assert sum(row["chosen"] == r["chosen"] for row, r in zip(labelled, rows)) >= 14
  with pytest.raises(ValueError, match=r"label_pairs: 1 of 16 pairs have a non-finite harm "
                                       r"probability \(first: pair 3\)"):
    safety_runtime.label_pairs(prompts, [r["rejected"] for r in rows],
                               [r["chosen"] for r in rows], p_rej, np.where(
                                   np.arange(16) == 3, np.nan, p_cho))


def test_a_reward_model_workdir_is_not_taken_for_a_harm_classifier(tmp_path):
  """A train_rm workdir loaded: the sigmoid of its reward read as P(harmful)."""
  from configs.rm import tiny as rm_tiny  # pylint: disable=import-outside-toplevel
  from prefjax.train import summary as summary_lib  # pylint: disable=import-outside-toplevel
  (tmp_path / "config.json").write_text(rm_tiny.get_config().to_json())
  summary_lib.append_run_record(str(tmp_path), {"argv": ["/x/experiments/train_rm.py"]})
  with pytest.raises(ValueError, match=r"is not a train_safety run \(its config has no safety "
                                       r"section; experiments.train_rm ran there\)"):
    safety_runtime.SafetyClassifier.from_workdir(str(tmp_path), threshold=0.5)


def test_the_classifier_filters_threshold_is_settable_from_the_command_line():
  """The missing-threshold.json error says to pass safety.threshold; the config's plain
  None could not be overridden ("NoneType ... is not supported for overriding")."""
  from tests import test_config_errors  # pylint: disable=import-outside-toplevel
  fields = test_config_errors.config_help_fields(
      "best_of_n", "configs/bon/tiny.py:safety_classifier", "--config.safety.threshold=0.3")
  assert fields["config.safety.threshold"] == "0.3"


def test_label_source_rows_load_as_preferences_with_objective(tmp_path):
  rows, counts = safety_runtime.label_pairs(
      ["p1", "p2", "p3"], ["safe a", "bad a", "x"], ["bad b", "safe b", "y"],
      np.array([0.1, 0.8, 0.5]), np.array([0.7, 0.2, 0.52]), min_margin=0.05)
  assert counts == {"pairs": 3, "labelled": 2, "skipped_small_margin": 1}
  path = safety_runtime.write_jsonl(rows, str(tmp_path / "safety_pairs.jsonl"))
  source = sources.load_preferences(f"jsonl:{path}", "train")
  assert [(r["prompt"], r["chosen"], r["rejected"]) for r in source] == [
      ("p1", "safe a", "bad b"), ("p2", "safe b", "bad a")]
  assert source[0]["outcome"] == 1.0
  assert source[1]["meta"]["p_harm_chosen"] == pytest.approx(0.2)
  assert source[1]["meta"]["p_harm_rejected"] == pytest.approx(0.8)
  # Trains the `harmless` head of a multi:helpful,harmless RM through train_rm's labels.
  table = labels.objective_table(source, ("helpful", "harmless"),
                                 {"objective": "", "objective_field": "objective"})
  np.testing.assert_array_equal(table, [[0, 1], [0, 1]])


def test_harm_pairs_orient_every_row_so_rejected_is_the_side_its_labels_rejected(tmp_path):
  """outcome 0 swaps the sides, a tie is skipped and counted, a soft outcome reads its majority."""
  rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "outcome": o}
          for i, o in enumerate([1.0, 0.0, 0.5, 0.25, 0.75])]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = sources.load_preferences(f"jsonl:{path}", "train")
  pairs = safety_runtime.HarmPairs(source)
  assert pairs.counts == {"pairs": 5, "kept": 4, "swapped": 2, "skipped_ties": 1, "soft": 2}
  assert [(r["prompt"], r["chosen"], r["rejected"], r["outcome"]) for r in pairs] == [
      ("p0", "c0", "r0", 1.0), ("p1", "r1", "c1", 1.0), ("p3", "r3", "c3", 0.75),
      ("p4", "c4", "r4", 0.75)]
  assert pairs[1:3] == [pairs[1], pairs[2]] and pairs.__getitems__([3]) == [pairs[3]]
  assert pairs.fingerprint == source.fingerprint + "+harm_pairs"
  assert repr(pairs).startswith("HarmPairs(PreferenceSource(") and "'swapped': 2" in repr(pairs)
  assert (pairs.name, pairs.split, pairs.summary) == (source.name, source.split, source.summary)
  # What the classifier trains on: harm_targets label the (oriented) rejected side 1.
  pcfg = pipeline_lib.PipelineConfig(batch_size=4, max_length=16, shuffle=False, num_epochs=1)
  batch = next(iter(pipeline_lib.preference_dataset(pairs, tokenize.ByteTokenizer(), pcfg)))
  assert list(batch["outcome"]) == [1.0, 1.0, 0.75, 0.75]
  rejected = tokenize.ByteTokenizer().encode("c1")  # pair 1 swapped: its chosen was rejected
  assert list(batch["tokens"][4 + 1][3:3 + len(rejected)]) == rejected
  clean = safety_runtime.HarmPairs([rows[0]])
  assert clean.counts["swapped"] == clean.counts["skipped_ties"] == 0


def test_filtered_selection_hand_example_and_fallback():
  proxy = np.array([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0], [1.0, 2.0, 3.0]])
  harm = np.array([[0.9, 0.1, 0.2], [0.8, 0.6, 0.7], [0.0, 0.0, 0.0]])
  sel = filtered.select(proxy, harm, 0.5)
  np.testing.assert_array_equal(sel.index, [1, 1, 2])  # row 1: all rejected -> least harmful
  np.testing.assert_array_equal(sel.fallback, [False, True, False])
  np.testing.assert_array_equal(sel.num_rejected, [1, 3, 0])
  np.testing.assert_array_equal(filtered.select(proxy, harm, None).index, [0, 0, 2])
  # P(all n rejected): row 0 has 1 of 3 rejected -> n=1: 1/3; row 1 all -> 1.
  np.testing.assert_allclose(filtered.fallback_probability([1, 3, 0], 3, [1, 2, 3]),
                             [[1 / 3, 0, 0], [1, 1, 1], [0, 0, 0]])


def test_best_of_n_filter_lowers_harm_at_a_proxy_cost_on_tiny_world():
  """Fixed seed: best-of-16 over reference samples of the tiny world, 300 prompts."""
  world = tiny_world_lib.TinyWorld(seed=0)
  rng = np.random.default_rng(0)
  num_prompts, n = 300, 16
  prompts = [world.sample_prompt(rng) for _ in range(num_prompts)]
  responses = [[world.sample_response(rng) for _ in range(n)] for _ in range(num_prompts)]
  proxy = np.array([[world.proxy_reward(p, r) for r in rs] for p, rs in zip(prompts, responses)])
  gold = np.array([[world.gold_reward(p, r) for r in rs] for p, rs in zip(prompts, responses)])
  scorer, threshold = safety_runtime.make_harm_scorer(
      {"kind": "tiny_world_harm", "threshold": 0.1}, world=world)
  harm = np.array([scorer([p] * n, rs) for p, rs in zip(prompts, responses)])
  rows = np.arange(num_prompts)
  plain, safe = filtered.select(proxy, harm, None), filtered.select(proxy, harm, threshold)
  harm_plain, harm_safe = harm[rows, plain.index].mean(), harm[rows, safe.index].mean()
  proxy_plain, proxy_safe = proxy[rows, plain.index].mean(), proxy[rows, safe.index].mean()
  # The same selection written as a loop over prompts: the first highest proxy among the
  # candidates whose harm is below the threshold (every prompt has one: no fallback).
  for i in rows:
    passing = [j for j in range(n) if harm[i, j] < threshold]
    assert plain.index[i] == max(range(n), key=lambda j: (proxy[i, j], -j))
    assert safe.index[i] == max(passing, key=lambda j: (proxy[i, j], -j))
  # The harm character is the gold's favourite, so the proxy prefers harmful responses.
  # The measured effect, pinned as README's "Safety classifier" quotes it:
  assert harm_plain == pytest.approx(0.12395, abs=1e-4)
  assert harm_safe == pytest.approx(0.01338, abs=1e-4)
  assert proxy_plain - proxy_safe == pytest.approx(0.18153, abs=1e-4)  # the stated cost
  assert harm_safe < harm_plain - 0.1 and proxy_safe < proxy_plain - 0.1
  assert int(safe.fallback.sum()) == 0
  # The unbiased every-n estimator agrees with the direct selection at n = N.
  curves = filtered.filtered_bon_scores(proxy, harm, threshold, {"gold": gold}, [1, 4, n])
  assert curves["harm_filtered"][:, -1].mean() == pytest.approx(harm_safe, abs=1e-9)
  assert curves["proxy"][:, -1].mean() == pytest.approx(proxy_plain, abs=1e-9)
  for name in ("proxy", "proxy_filtered"):  # n = 1: the filter has nothing to choose
    np.testing.assert_allclose(curves[name][:, 0], proxy.mean(axis=1), rtol=1e-12)
  assert np.all(curves["harm_filtered"].mean(axis=0)[1:] < curves["harm"].mean(axis=0)[1:])


def test_multi_objective_reward_adds_harmlessness_beside_helpfulness():
  helpful = lambda prompts, responses: np.array([len(r) for r in responses], np.float64)
  harm = lambda prompts, responses: np.array([0.5 if "g" in r else 0.0 for r in responses])
  reward = safety_runtime.MultiObjectiveReward(
      {"helpful": helpful, "harmless": safety_runtime.harmless_score(harm)},
      {"helpful": 1.0, "harmless": 2.0})
  got = reward(["p", "p"], ["abcg", "abc"])
  np.testing.assert_allclose(got, [4 + 2 * np.log(0.5), 3.0])
  with pytest.raises(ValueError, match="same objectives"):
    safety_runtime.MultiObjectiveReward({"helpful": helpful}, {"harmless": 1.0})


def test_best_of_n_binary_reports_the_filter(tmp_path):
  """``best_of_n.run`` on stored samples with harm scores (no sampling): the filter report."""
  from configs.bon import tiny as bon_tiny  # pylint: disable=g-import-not-at-top
  from experiments import best_of_n  # pylint: disable=g-import-not-at-top
  config = bon_tiny.get_config("safety")
  config.bon.num_points = 3
  config.bon.num_bootstrap = 50
  proxy = np.array([[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]])
  harm = np.array([[0.9, 0.05, 0.0], [0.8, 0.6, 0.7]])
  np.savez(tmp_path / best_of_n.SAMPLES_FILE, proxy=proxy, gold=-proxy, harm=harm,
           lengths=np.ones_like(proxy), harm_threshold=np.float64(0.1),
           config_sha256=best_of_n.samples_fingerprint(config))  # drawn under this config
  report = best_of_n.run(config, str(tmp_path))["safety_filter"]
  assert report["n"] == [1, 2, 3] and report["fallbacks_at_n_max"] == 1
  assert report["rejected_fraction"] == pytest.approx(4 / 6)
  # n = 3: prompt 0 picks sample 1 (harm .05, proxy 2), prompt 1 falls back to sample 1.
  assert report["proxy_filtered"][-1] == pytest.approx(3.0)
  assert report["harm_filtered"][-1] == pytest.approx((0.05 + 0.6) / 2)
  assert report["harm"][-1] == pytest.approx((0.9 + 0.8) / 2)
  # P(all n rejected): prompt 0 has 1 rejected of 3 (1/3, 0, 0), prompt 1 all (1, 1, 1).
  assert report["fallback"] == pytest.approx([(1 / 3 + 1) / 2, 0.5, 0.5])
  assert "## Safety filter (reject harm >= 0.1)" in (tmp_path / "report.md").read_text()
