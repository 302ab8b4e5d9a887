"""A registered loss's own metrics (``registry.split_loss_output``), in both trainers' losses.

A loss returns ``(losses, {name: value})``: per-example values are reported as their
weighted mean over the examples the loss counts (against float64 references), scalars as
they are, under ``<loss name>/<name>``; the loss itself is unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import configlib
from prefjax import rm
from prefjax.direct import evaluation
from prefjax.direct import loss as loss_lib
from prefjax.losses import preference
from prefjax.losses import registry
from tests import test_train_rm


@pytest.fixture
def direct_batch(monkeypatch):
  def fixed_scores(model, batch, num_segments=None):
    del model, num_segments
    return loss_lib.SequenceScores(batch["s_c"], batch["s_r"], batch["n"], batch["n"])
  monkeypatch.setattr(loss_lib, "score_pairs", fixed_scores)
  return {"s_c": np.asarray([-1.0, -2.0, -0.5, 0.0], np.float32),
          "s_r": np.asarray([-2.0, -1.0, -0.25, 0.0], np.float32),
          "n": np.asarray([2.0, 4.0, 1.0, 0.0], np.float32),  # the padding pair: 0 tokens
          "ref_chosen": np.asarray([-1.5, -1.5, -0.5, 0.0], np.float32),
          "ref_rejected": np.asarray([-1.5, -1.5, -0.5, 0.0], np.float32),
          "outcome": np.ones(4, np.float32),
          "weight": np.asarray([1.0, 3.0, 0.5, 1.0], np.float32),
          "pair_mask": np.asarray([1.0, 1.0, 1.0, 0.0], np.float32)}


def _dpo_margin(x, beta):
  return beta * ((x.policy_chosen - x.ref_chosen) - (x.policy_rejected - x.ref_rejected))


def test_a_direct_loss_reports_its_own_metrics_weighted_like_its_loss(direct_batch):
  def plain(x, *, beta):
    return -jax.nn.log_sigmoid(_dpo_margin(x, beta))

  def with_metrics(x, *, beta):
    per_token = x.policy_chosen / x.chosen_tokens  # 0/0 at the padding pair
    return plain(x, beta=beta), {"margin": _dpo_margin(x, beta), "chosen_per_token": per_token,
                                 "beta": jnp.asarray(beta)}
  names = {"_test_plain": plain, "_test_with_metrics": with_metrics}
  try:
    for name, fn in names.items():
      registry.register_direct_loss(name)(fn)
    out = {name: loss_lib.make_loss_fn(loss_lib.DirectLoss(name=name, beta=0.5,
                                                           ref_mode="online"))(
        None, direct_batch, jax.random.key(0)) for name in names}
    held_out = evaluation.make_eval_fn(loss_lib.DirectLoss(
        name="_test_with_metrics", beta=0.5, ref_mode="online"))(None, direct_batch)
  finally:
    for name in names:
      registry.unregister_direct_loss(name)
  (loss_a, metrics_a), (loss_b, metrics_b) = out["_test_plain"], out["_test_with_metrics"]
  assert float(loss_a) == float(loss_b)
  assert set(metrics_b) - set(metrics_a) == {"_test_with_metrics/margin",
                                             "_test_with_metrics/chosen_per_token",
                                             "_test_with_metrics/beta"}
  b = {k: np.asarray(v, np.float64) for k, v in direct_batch.items()}
  w = (b["weight"] * b["pair_mask"])[:3]
  margin = 0.5 * ((b["s_c"] - b["ref_chosen"]) - (b["s_r"] - b["ref_rejected"]))[:3]
  np.testing.assert_allclose(metrics_b["_test_with_metrics/margin"],
                             np.sum(w * margin) / np.sum(w), rtol=1e-6)
  np.testing.assert_allclose(metrics_b["_test_with_metrics/chosen_per_token"],
                             np.sum(w * b["s_c"][:3] / b["n"][:3]) / np.sum(w), rtol=1e-6)
  assert float(metrics_b["_test_with_metrics/beta"]) == 0.5
  assert float(held_out["_test_with_metrics/margin"]) == float(
      metrics_b["_test_with_metrics/margin"])


@pytest.mark.parametrize("output, match", [
    (lambda losses: (losses, {"margin": losses[:, None]}),
     r"returned metric 'margin' of shape \(4, 1\); a metric is a scalar or one value per "
     r"example \(4,\)"),
    (lambda losses: (losses, losses, {}), r"returned a tuple of 3; expected the per-example "
                                          r"losses, or \(losses, \{metric name: value\}\)"),
    (lambda losses: (losses, [losses]), r"returned a tuple of 2"),
])
def test_a_loss_output_the_trainers_cannot_read_is_named(direct_batch, output, match):
  def bad(x, *, beta):
    return output(-jax.nn.log_sigmoid(_dpo_margin(x, beta)))
  registry.register_direct_loss("_test_bad_output")(bad)
  try:
    loss_fn = loss_lib.make_loss_fn(loss_lib.DirectLoss(name="_test_bad_output", beta=0.5,
                                                        ref_mode="online"))
    with pytest.raises(ValueError, match=r"direct loss '_test_bad_output' " + match):
      loss_fn(None, direct_batch, jax.random.key(0))
  finally:
    registry.unregister_direct_loss("_test_bad_output")


@pytest.mark.parametrize("columns", [1, 3])
def test_a_preference_loss_reports_its_own_metrics_weighted_like_its_loss(columns):
  rng = np.random.default_rng(3)
  num_pairs = 5
  r_c = rng.normal(size=(num_pairs, columns)).astype(np.float32)
  r_r = rng.normal(size=(num_pairs, columns)).astype(np.float32)
  r_c[-1] = np.nan  # a padding pair
  batch = {"tokens": np.zeros((2 * num_pairs, 4), np.int32),
           "attention_mask": np.ones((2 * num_pairs, 4), np.int32),
           "pair_mask": np.asarray([1, 1, 1, 1, 0], np.float32),
           "weight": np.asarray([1.0, 2.0, 0.5, 1.5, 1.0], np.float32),
           "outcome": np.ones(num_pairs, np.float32)}
  rewards = jnp.concatenate([jnp.asarray(r_c), jnp.asarray(r_r)])
  model = lambda tokens, attention_mask: rewards if columns > 1 else rewards[:, 0]  # noqa: E731

  @preference.register_preference_loss("_test_bt_with_metrics")
  def bt_with_metrics(r_chosen, r_rejected, *, outcome=1.0):
    del outcome
    margin = r_chosen - r_rejected
    return -jax.nn.log_sigmoid(margin), {"margin": margin, "batch": jnp.asarray(7.0)}
  try:
    kwargs = dict(num_columns=columns, objectives=(), num_segments=None)
    loss, metrics = rm.make_loss_fn(dict(name="_test_bt_with_metrics"), **kwargs)(
        model, batch, jax.random.key(0))
    plain, _ = rm.make_loss_fn(dict(name="bt"), **kwargs)(model, batch, jax.random.key(0))
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_bt_with_metrics")
  np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
  w = (batch["weight"] * batch["pair_mask"]).astype(np.float64)[:4, None]
  margin = (r_c.astype(np.float64) - r_r)[:4]
  # Reduced as the loss: Σ w·margin over the 4 real pairs' columns / their count.
  np.testing.assert_allclose(metrics["_test_bt_with_metrics/margin"],
                             np.sum(w * margin) / (4 * columns), rtol=1e-5)
  assert float(metrics["_test_bt_with_metrics/batch"]) == 7.0


def test_a_run_that_would_undo_or_ignore_its_setting_is_refused():
  """Three settings that were accepted and then silently did something else: an RL warm
  start that retrained a loaded policy (a DPO export's held-out accuracy 0.81 -> 0.42), a
  multi-objective reward model as a best-of-n/RL reward (a shape error after the first
  generation), and bootstrap resampling on objective heads (ignored)."""
  import ml_collections
  from prefjax.data import tiny_world
  from prefjax.rl import rewards as rl_rewards
  from prefjax.rl import setup
  from prefjax.rm import loss as rm_loss
  config = ml_collections.ConfigDict({"warm_start": {"steps": 150, "batch_size": 8,
                                                     "learning_rate": 1e-3},
                                      "model": {"path": "/runs/dpo/hf"},
                                      "prompts": {"style": "raw"}, "seed": 0})
  with pytest.raises(ValueError, match=r"model.path='/runs/dpo/hf' loads a trained policy, "
                                       r"and warm_start.steps=150 .* set "
                                       r"--config.warm_start.steps=0"):
    setup.maybe_warm_start(None, config, None, tiny_world.TinyWorld())
  spec = ml_collections.ConfigDict({"kind": "model", "name": "proxy",
                                    "model": {"head": "multi:helpful,harmless"}})
  with pytest.raises(ValueError, match=r"reward 'proxy': model.head='multi:helpful,harmless' "
                                       r"gives one reward per objective"):
    rl_rewards.model_reward(spec)
  with pytest.raises(ValueError, match=r"loss.bootstrap=True .* are objectives"):
    rm_loss.make_loss_fn({"name": "bt", "bootstrap": True}, num_columns=2,
                         objectives=("helpful", "harmless"), num_segments=None)


def test_a_loss_of_your_own_that_cannot_run_is_named_before_training():
  """A [B] outcome against [B, K] ensemble rewards failed as a bare JAX broadcasting error
  at the first step (and, with B = K, trained member k on outcome[k]); a hyperparameter
  without a default failed with a TypeError traceback."""
  import jax
  from prefjax.direct import loss as direct_loss
  from prefjax.losses import direct, preference, registry
  from prefjax.rm import loss as rm_loss

  @preference.register_preference_loss("_test_naive")
  def naive(r_chosen, r_rejected, *, outcome=1.0):
    return -outcome * jax.nn.log_sigmoid(r_chosen - r_rejected)

  @direct.register_direct_loss("_test_needs_gamma")
  def needs_gamma(x, *, beta, gamma):
    return -jax.nn.log_sigmoid(beta * (x.policy_chosen - x.policy_rejected) - gamma)

  try:
    rm_loss.make_loss_fn({"name": "_test_naive"}, num_columns=1, objectives=(),
                         num_segments=None)  # one column: fine
    with pytest.raises(ValueError, match=r"config.loss '_test_naive' on \[B, 4\] rewards .* "
                                         r"outcome\[:, None\]"):
      rm_loss.make_loss_fn({"name": "_test_naive"}, num_columns=4, objectives=(),
                           num_segments=None)
    with pytest.raises(ValueError, match=r"loss '_test_needs_gamma': .*gamma.*; give it with "
                                         r"--config.loss.kwargs=NAME=VALUE"):
      direct_loss._check_values(registry.direct_loss_spec("_test_needs_gamma"), 0.1, {})  # pylint: disable=protected-access
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_naive")
    registry.unregister_direct_loss("_test_needs_gamma")


def test_a_rerun_without_the_imports_of_its_loss_names_them(tmp_path):
  """eval_rm named the --imports a run's runs.jsonl records; a rerun of the trainer itself
  only said to pass some --imports=MODULE."""
  import json
  from experiments import train_dpo
  from experiments import train_rm
  from tests import test_train_dpo
  (tmp_path / "runs.jsonl").write_text(json.dumps({"imports": ["my_lab.my_losses"]}) + "\n")
  for run, config in ((train_dpo.run, test_train_dpo.dpo_config(steps=1)),
                      (train_rm.run, test_train_rm.small_config(1))):
    config.loss.name = "my_loss"
    with pytest.raises(KeyError, match=r"unknown .*loss 'my_loss'.*its runs.jsonl records "
                                       r"--imports=my_lab.my_losses"):
      run(config, str(tmp_path))
  # An RL algorithm of one's own likewise (it said only "register_algorithm adds one").
  from configs.rl import tiny_rloo
  from experiments import train_rl
  rl_config = tiny_rloo.get_config("quick")
  rl_config.rl.algorithm = "my_grpo"
  with pytest.raises(configlib.UnregisteredNameError,
                     match=r"rl.algorithm='my_grpo' is not one of .*its runs.jsonl records "
                           r"--imports=my_lab.my_losses"):
    train_rl.run(rl_config, str(tmp_path))
  # With the recorded modules imported, the name itself is wrong (a typo): no such hint.
  (tmp_path / "runs.jsonl").write_text(json.dumps({"imports": ["json"]}) + "\n")
  config = test_train_rm.small_config(1)
  config.loss.name = "my_los"
  with pytest.raises(KeyError, match=r"unknown preference loss 'my_los'") as error:
    train_rm.run(config, str(tmp_path))
  assert "runs.jsonl records" not in str(error.value)


def test_a_registered_loss_sharing_a_built_in_hyperparameter_name_keeps_its_default(caplog):
  from configs.rm import tiny
  """The configs carry bt's margin=0.0: a loss of your own with ``margin=1.0`` used to
  train at 0.0, and ``kwargs=margin=...`` was refused as set twice."""
  @preference.register_preference_loss("_test_margin_rank")
  def margin_rank(r_chosen, r_rejected, *, outcome=1.0, margin=1.0):
    del outcome
    return jax.nn.relu(margin - (r_chosen - r_rejected))
  try:
    carried = dict(tiny.get_config().loss, name="_test_margin_rank")
    assert carried["margin"] == 0.0
    assert rm.RewardLoss.from_config(carried).hparams == ()  # margin_rank's own 1.0
    loss = rm.RewardLoss.from_config(carried)
    np.testing.assert_allclose(loss.per_pair(jnp.zeros(2), jnp.asarray([0.25, 2.0]),
                                             jnp.ones(2)), [1.25, 3.0])
    assert rm.RewardLoss.from_config(dict(carried, kwargs="margin=0.5")).hparams == (
        ("margin", 0.5),)
    # The warning says how to train it at the carried 0.0; once kwargs does, it is silent.
    assert "set --config.loss.kwargs=margin=0.0" in caplog.text
    caplog.clear()
    assert rm.RewardLoss.from_config(dict(carried, kwargs="margin=0.0")).hparams == (
        ("margin", 0.0),)
    assert "keeps its own default" not in caplog.text
    assert rm.RewardLoss.from_config(dict(carried, margin=0.3)).hparams == (("margin", 0.3),)
    with pytest.raises(ValueError, match=r"config.loss sets them too \(margin=0.3\)"):
      rm.RewardLoss.from_config(dict(carried, margin=0.3, kwargs="margin=0.5"))
    # Registering it must not change bt: --config.loss.margin=1.0 (margin_rank's default)
    # was taken for a carried default and bt trained at margin 0.
    bt_at_one = dict(tiny.get_config().loss, margin=1.0)
    assert dict(rm.RewardLoss.from_config(bt_at_one).hparams)["margin"] == 1.0
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_margin_rank")
  # bt itself still reads the field, at its default or moved.
  assert dict(rm.RewardLoss.from_config(dict(tiny.get_config().loss)).hparams)["margin"] == 0.0


def test_length_normalised_implicit_rewards_divide_each_side_by_its_own_tokens():
  """IPO/SimPO report β·log-ratio per token: a rejected side divided by the chosen side's
  count would pass every loss test and skew rewards/rejected, margins and accuracies."""
  from prefjax.losses import direct  # pylint: disable=import-outside-toplevel
  x = direct.PairLogps(policy_chosen=jnp.array([-4.0, -3.0]),
                       policy_rejected=jnp.array([-10.0, -2.0]),
                       ref_chosen=jnp.array([-5.0, -3.5]), ref_rejected=jnp.array([-10.5, -2.2]),
                       chosen_tokens=jnp.array([2.0, 1.0]), rejected_tokens=jnp.array([5.0, 4.0]))
  metrics = loss_lib.pair_metrics(loss_lib.DirectLoss(name="ipo", beta=0.5), x,
                                  jnp.ones(2), jnp.zeros(2, bool))
  rc = 0.5 * np.array([1.0 / 2, 0.5 / 1])  # β·(π − ref)/n_c: 0.25, 0.25
  rr = 0.5 * np.array([0.5 / 5, 0.2 / 4])  # β·(π − ref)/n_r: 0.05, 0.025 (÷n_c: 0.125, 0.1)
  np.testing.assert_allclose(float(metrics["rewards/rejected"]), rr.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["rewards/margins"]), (rc - rr).mean(), rtol=1e-6)
  assert float(metrics["rewards/accuracies"]) == 1.0


def test_a_loss_of_one_reward_model_sees_b_rewards_as_the_readme_says():
  """One RM's rewards reached a registered loss as [B, 1]: with a [B] outcome a loss
  written as the README shows returned [B, B] and stopped at the first step."""
  seen = []

  @preference.register_preference_loss("_test_plain_bt")
  def plain_bt(r_chosen, r_rejected, *, outcome=1.0):
    seen.append(jnp.shape(r_chosen))
    margin = jnp.where(jnp.asarray(outcome) >= 0.5, 1.0, -1.0) * (r_chosen - r_rejected)
    return -jax.nn.log_sigmoid(margin), {"margin": margin}
  try:
    rng = np.random.default_rng(5)
    batch = test_train_rm._pair_batch(5, rng)  # pylint: disable=protected-access
    r_c, r_r = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    loss_fn = rm.make_loss_fn(dict(name="_test_plain_bt"), num_columns=1)
    model = test_train_rm._fake_model(r_c, r_r)  # pylint: disable=protected-access
    loss, metrics = loss_fn(model, batch, jax.random.key(0))
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_plain_bt")
  assert seen[-1] == (5,)
  margin = np.where(batch["outcome"] >= 0.5, 1.0, -1.0) * (r_c.astype(np.float64) - r_r)
  w, real = batch["weight"] * batch["pair_mask"], batch["pair_mask"].sum()
  np.testing.assert_allclose(float(loss), np.sum(w * np.log1p(np.exp(-margin))) / real,
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["_test_plain_bt/margin"]), np.sum(w * margin) / real,
                             rtol=1e-5)
