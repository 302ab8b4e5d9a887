"""Optimizers and learning-rate schedules (``prefjax.train.schedules``): formulas against
hand values, clipping (global and per ensemble member), weight decay and its mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prefjax import train


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_matches_formula(schedule):
  cfg = train.OptimizerConfig(learning_rate=0.1, schedule=schedule, warmup_steps=10,
                              total_steps=110, end_lr_fraction=0.1)
  fn = train.make_schedule(cfg)
  for step in [0, 5, 10, 35, 60, 109, 110, 200]:
    if step < 10:
      expected = 0.1 * step / 10
    elif schedule == "constant":
      expected = 0.1
    else:
      frac = min((step - 10) / 100, 1.0)
      if schedule == "linear":
        expected = 0.1 + (0.01 - 0.1) * frac
      else:
        expected = 0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * frac))
    np.testing.assert_allclose(float(fn(step)), expected, rtol=1e-5, atol=1e-8)


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="unknown field.*lr"):
    train.make_optimizer({"name": "adamw", "lr": 1e-3})
  with pytest.raises(ValueError, match="optimizer.name='lion'"):
    train.make_optimizer({"name": "lion"})
  with pytest.raises(ValueError, match="needs total_steps.*tie total_steps to loop.num_steps"):
    train.make_schedule({"schedule": "cosine", "warmup_steps": 5})
  with pytest.raises(ValueError, match="must be >= 0"):
    train.make_optimizer({"name": "adamw", "learning_rate": -1e-3})


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "grad_clip_norm", "b2",
                                   "eps", "end_lr_fraction", "momentum"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_optimizer_setting_is_refused(field, value):
  """An infinite rate trained into NaN parameters and exited 0; a NaN clip norm turned
  clipping off without a word."""
  with pytest.raises(ValueError, match=f"optimizer.{field}={value} must be finite"):
    train.make_optimizer({"name": "adamw", field: value})


@pytest.mark.parametrize("field,value", [
    ("end_lr_fraction", -1.0), ("end_lr_fraction", 1.5), ("weight_decay", -0.5),
    ("b1", 1.0), ("b2", -1.0), ("eps", 0.0), ("momentum", -1.0), ("grad_clip_norm", -1.0)])
def test_an_optimizer_setting_out_of_its_range_is_refused(field, value):
  """end_lr_fraction=-1 decayed a cosine to a negative rate that climbed the loss."""
  with pytest.raises(ValueError, match=rf"optimizer.{field}={value} must be in [\[(]"):
    train.make_optimizer({"name": "adamw", "schedule": "cosine", "total_steps": 10, field: value})


@pytest.mark.parametrize("field,value,message", [
    ("accum_steps", 0, ">= 1"), ("keep_checkpoints", 0, ">= 1"), ("keep_best", 0, ">= 1"),
    ("log_every", -1, ">= 0"), ("eval_every", -2, ">= 0"), ("checkpoint_every", -1, ">= 0")])
def test_a_loop_setting_out_of_its_range_is_refused(field, value, message):
  """accum_steps=0 died in a ZeroDivisionError after the workdir was made; keep_checkpoints=0
  was refused as checkpoint.py's keep_last, after data and model."""
  with pytest.raises(ValueError, match=f"loop.{field}={value} must be {message}"):
    train.LoopConfig(num_steps=5, **{field: value})


def test_grad_clipping_and_weight_decay_follow_optax_reference():
  params = {"w": jnp.array([3.0, 4.0])}
  grads = {"w": jnp.array([30.0, 40.0])}  # norm 50 -> clipped to norm 1
  tx, _ = train.make_optimizer({"name": "sgd", "learning_rate": 0.5, "grad_clip_norm": 1.0,
                                "weight_decay": 0.1})
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = -0.5 * (np.array([0.6, 0.8]) + 0.1 * np.array([3.0, 4.0]))
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-6)


def test_weight_decay_leaves_biases_and_norm_scales_alone_unless_asked():
  params = {"kernel": jnp.ones((2, 3)), "layers": {"bias": jnp.ones((4, 3)),  # stacked
                                                   "scale": jnp.ones(3)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for every, shrunk in ((False, {"kernel"}), (True, {"kernel", "bias", "scale"})):
    tx, _ = train.make_optimizer({"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.5,
                                  "decay_biases_and_norms": every})
    new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
    for name, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
      want = 0.95 if name[-1].key in shrunk else 1.0  # 1 − lr·wd
      np.testing.assert_allclose(leaf, want, rtol=1e-6, err_msg=str(name))
  with pytest.raises(ValueError, match="weight_decay=0.1 with name='adam'"):
    train.make_optimizer({"name": "adam", "weight_decay": 0.1})
  with pytest.raises(ValueError, match="max_consecutive_nonfinite=0 must be >= 1"):
    train.LoopConfig(num_steps=5, max_consecutive_nonfinite=0)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_schedule_that_ends_before_the_run_is_named(decay, caplog):
  schedule = train.make_schedule({"learning_rate": 0.1, "schedule": decay,
                                  "warmup_steps": 2, "total_steps": 1000})
  assert train.schedules.updates_at_zero_rate(schedule, 1000) == 0  # warmup's first: by design
  assert train.schedules.updates_at_zero_rate(schedule, 1200) == 200
  assert "200 of this run's 1200 optimizer updates have learning rate 0" in caplog.text


def test_a_zero_learning_rate_is_named_as_such(caplog):
  schedule = train.make_schedule({"learning_rate": 0.0, "schedule": "cosine",
                                  "warmup_steps": 2, "total_steps": 100})
  assert train.schedules.updates_at_zero_rate(schedule, 100) == 99
  assert "the learning rate is 0 at every one of this run's 100 optimizer updates" in caplog.text
  assert "schedule ends" not in caplog.text


def test_a_long_cosine_that_ends_with_the_run_is_not_named(caplog):
  """Its last few updates fall below ZERO_RATE·peak (2000 updates: 1; 5000: 3), where
  float32 cannot tell them from 0; the run is not longer than the schedule."""
  for total in (2000, 5000):
    schedule = train.make_schedule({"learning_rate": 0.1, "schedule": "cosine",
                                    "warmup_steps": 100, "total_steps": total})
    assert 1 <= train.schedules.updates_at_zero_rate(schedule, total) <= 4
  assert "learning rate 0" not in caplog.text


def test_a_rate_within_round_off_of_zero_counts_as_zero():
  """Compiled as one program (the binaries' XLA flags), linear decay ended at ~1e-10 where
  its formula gives exactly 0."""
  schedule = lambda count: jnp.where(count < 10, 0.1, 1e-10)
  assert train.schedules.updates_at_zero_rate(schedule, 13) == 3
  schedule = lambda count: jnp.where(count < 10, 0.1, 1e-6)  # small, but a rate
  assert train.schedules.updates_at_zero_rate(schedule, 13) == 0


def test_a_warmup_longer_than_the_run_is_named(caplog):
  """A constant schedule warming up over 10 updates in a 5-update run never reached its
  rate, without a word."""
  schedule = train.make_schedule({"learning_rate": 0.1, "warmup_steps": 10})
  train.schedules.updates_at_zero_rate(schedule, 5)
  assert ("the learning rate is still rising when this run's 5 optimizer updates end "
          "(optimizer.warmup_steps longer than the run?): it reaches 0.04, 40% of the 0.1"
          in caplog.text)
  caplog.clear()
  train.schedules.updates_at_zero_rate(schedule, 11)  # peaks at update 11
  train.schedules.updates_at_zero_rate(train.make_schedule({"learning_rate": 0.1}), 5)
  assert "still rising" not in caplog.text


def test_per_member_clipping_clips_each_member_on_its_own():
  # Two members stacked on the leading axis: norms 50 (over both leaves) and 0.5.
  grads = {"w": jnp.array([[30.0, 0.0], [0.3, 0.0]]), "b": jnp.array([40.0, 0.4])}
  params = jax.tree.map(jnp.zeros_like, grads)
  tx, _ = train.make_optimizer({"name": "sgd", "learning_rate": 1.0, "grad_clip_norm": 1.0},
                               clip_per_member=True)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [[-0.6, 0.0], [-0.3, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.8, -0.4], rtol=1e-6)
  # A global clip would have shrunk the small member too.
  tx, _ = train.make_optimizer({"name": "sgd", "learning_rate": 1.0, "grad_clip_norm": 1.0})
  updates, _ = tx.update(grads, tx.init(params), params)
  assert abs(float(updates["b"][1])) < 0.01
