"""Tests for the reward-model trainer (``prefjax.rm``, ``experiments/train_rm.py``) and configs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.rm import ensemble_tiny
from configs.rm import tiny
from experiments import train_rm
from prefjax import experiment
from prefjax import models
from prefjax import rm
from prefjax.losses import preference
from prefjax import train
from prefjax.evals import preference as preference_eval
from tests import child_env
from tests import comparisons

REPO = pathlib.Path(__file__).resolve().parents[1]


def _private_tmp():
  # Not pytest's numbered basetemp: concurrent pytest sessions on a shared machine prune it.
  return tempfile.TemporaryDirectory(prefix="test_train_rm_")


@pytest.fixture
def tmp_path():
  with _private_tmp() as d:
    yield pathlib.Path(d)


@pytest.fixture(scope="module")
def data_env():
  """Tiny-world datasets and TFDS builds go to a per-module temporary directory."""
  with _private_tmp() as d, pytest.MonkeyPatch.context() as mp:
    root = pathlib.Path(d)
    mp.setenv("PREFJAX_CACHE_DIR", str(root / "cache"))
    mp.setenv("PREFJAX_SYNTHETIC_DIR", str(root / "synthetic"))
    yield root


def small_config(steps: int, *, base=tiny, num_pairs: int = 600, batch_size: int = 8):
  config = base.get_config("quick")
  config.loop.num_steps = steps
  config.loop.log_every = 1
  config.loop.tensorboard = False
  config.optimizer.total_steps = steps
  config.optimizer.warmup_steps = 0
  config.data.tiny_world.num_pairs = num_pairs
  config.data.pipeline.batch_size = batch_size
  config.data.pipeline.bucket_boundaries = ()
  config.model.overrides.num_layers = 1  # Halves compile time, still learns the tiny world.
  config.mesh.update(shape=(1, 1, 1), num_devices=1)
  return config


def train_losses(workdir, name="loss") -> list[float]:
  return [r[name] for r in train.read_metrics(workdir) if name in r]


# ----------------------------------------------------------------------------- losses


def _fake_model(r_chosen: np.ndarray, r_rejected: np.ndarray):
  """Stands in for a reward model: returns fixed rewards for rows [chosen; rejected]."""
  rewards = jnp.concatenate([jnp.asarray(r_chosen), jnp.asarray(r_rejected)])
  return lambda tokens, attention_mask: rewards


def _pair_batch(num_pairs: int, rng: np.random.Generator, *, padded_pairs: int = 1):
  mask = np.ones(num_pairs, np.float32)
  mask[num_pairs - padded_pairs:] = 0.0
  return {
      "tokens": np.zeros((2 * num_pairs, 4), np.int32),
      "attention_mask": np.ones((2 * num_pairs, 4), np.int32),
      "pair_mask": mask,
      "weight": (rng.uniform(0.5, 2.0, num_pairs) * mask).astype(np.float32),
      "outcome": rng.choice([1.0, 0.5, 0.0], num_pairs).astype(np.float32),
  }


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("name", ["bt", "ties", "plackett_luce"])
def test_loss_fn_matches_float64_reference(name):
  rng = np.random.default_rng(0)
  b = 6
  batch = _pair_batch(b, rng)
  if name == "plackett_luce":
    batch["outcome"] = np.where(batch["outcome"] == 0.5, 1.0, batch["outcome"]).astype(np.float32)
  r_c, r_r = rng.normal(size=b).astype(np.float32), rng.normal(size=b).astype(np.float32)
  cfg = dict(name=name, margin=0.3, label_smoothing=0.1, center_coef=0.01, nu=0.7)
  loss_fn = rm.make_loss_fn(cfg, num_columns=1, objectives=(), num_segments=None)
  loss, metrics = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))

  c, r = r_c.astype(np.float64), r_r.astype(np.float64)
  o = batch["outcome"].astype(np.float64)
  if name == "bt":
    p = 0.9 * o + 0.1 * (1 - o)  # the margin goes with the winner: r − c − m when r wins
    ref = -p * _log_sigmoid(c - r - 0.3) - (1 - p) * _log_sigmoid(r - c - 0.3)
  elif name == "ties":
    log_tie = np.log(0.7) + 0.5 * (c + r)
    log_z = np.logaddexp(np.logaddexp(c, r), log_tie)
    win_a, win_b = np.clip(2 * o - 1, 0, 1), np.clip(1 - 2 * o, 0, 1)
    ref = -(win_a * (c - log_z) + (1 - win_a - win_b) * (log_tie - log_z) + win_b * (r - log_z))
  else:  # Plackett–Luce with K = 2 is Bradley–Terry on the preferred-first order.
    signed = np.where(o >= 0.5, c - r, r - c)
    ref = -_log_sigmoid(signed)
  ref = ref + 0.01 * (c + r) ** 2
  expected = np.sum(batch["weight"] * batch["pair_mask"] * ref) / batch["pair_mask"].sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(metrics["num_pairs"]) == b - 1


def test_bad_loss_config_is_rejected_with_the_field_names(caplog):
  with pytest.raises(KeyError, match=r"unknown preference loss 'hinge'; registered: .*'bt'"):
    rm.make_loss_fn(dict(name="hinge"), num_columns=1, objectives=(), num_segments=None)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['marginn'\]"):
    rm.make_loss_fn(dict(name="bt", marginn=1.0), num_columns=1, objectives=(),
                    num_segments=None)
  with pytest.raises(ValueError, match=r"config.loss 'ties' with \{'nu': 0.0\}: nu=0.0 is "
                                       r"outside \(0.0, inf\]"):
    rm.RewardLoss.from_config(dict(name="ties", nu=0.0))
  with pytest.raises(ValueError, match=r"label_smoothing=1.5 is outside \[0.0, 1.0\]"):
    rm.RewardLoss.from_config(dict(name="bt", label_smoothing=1.5))
  for eps in (0.5, 1.0):  # one ε for every pair: no preference left, or the rejected taught
    with pytest.raises(ValueError, match=rf"config.loss label_smoothing={eps} must be in "
                                         r"\[0, 0.5\)"):
      rm.RewardLoss.from_config(dict(name="bt", label_smoothing=eps))
  with pytest.raises(ValueError, match=r"config.loss.first_member=-3 must be >= 0"):
    rm.RewardLoss.from_config(dict(name="bt", bootstrap=True, first_member=-3))
  rm.RewardLoss.from_config(dict(name="bt", first_member=2))
  assert "first_member=2 is not read without config.loss.bootstrap=True" in caplog.text
  caplog.clear()
  for coef in (-1.0, float("nan")):  # rewarded |r_c + r_r| without bound
    with pytest.raises(ValueError, match=rf"config.loss.center_coef={coef} must be >= 0"):
      rm.RewardLoss.from_config(dict(name="bt", center_coef=coef))
  # Another registered loss's hyperparameter is accepted (configs switch ``name``), unused:
  # silently at its default, with a warning when set.
  assert rm.RewardLoss.from_config(dict(name="bt", nu=1.0)).hparams == ()
  assert not caplog.records
  assert rm.RewardLoss.from_config(dict(name="bt", nu=0.3)).hparams == ()
  assert [r.getMessage() for r in caplog.records] == [
      "config.loss.nu=0.3 is not a hyperparameter of 'bt': ignored (it takes "
      "['label_smoothing', 'margin'])"]


def test_a_registered_preference_loss_is_selected_by_name_with_its_hyperparameters():
  @preference.register_preference_loss("_test_hinge")
  def hinge(r_chosen, r_rejected, *, outcome=1.0, gap=1.0):
    outcome = jnp.asarray(outcome)  # [B] against [B, K] rewards: one outcome per pair.
    outcome = outcome.reshape(outcome.shape + (1,) * (r_chosen.ndim - outcome.ndim))
    return jax.nn.relu(gap - jnp.where(outcome >= 0.5, 1.0, -1.0) * (r_chosen - r_rejected))
  try:
    rng = np.random.default_rng(4)
    batch = _pair_batch(5, rng)
    r_c, r_r = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    loss_fn = rm.make_loss_fn(dict(name="_test_hinge", gap=0.5, nu=2.0), num_columns=1,
                              objectives=(), num_segments=None)
    loss, _ = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))
    # A hyperparameter no config declares, from the command line (--config.loss.kwargs=...).
    assert rm.RewardLoss.from_config(dict(name="_test_hinge", kwargs="gap=0.5")).hparams == (
        ("gap", 0.5),)
    with pytest.raises(ValueError, match=r"config.loss.kwargs \['gapp'\] are not "
                                         r"hyperparameters of '_test_hinge'; it accepts "
                                         r"\['gap'\]"):
      rm.RewardLoss.from_config(dict(name="_test_hinge", kwargs="gapp=0.5"))
    for kwargs in ("gap=abc", "gap=true"):  # 'true' parses as True: ε = 1 for a float field
      with pytest.raises(ValueError, match=r"config.loss.kwargs gap=.* for '_test_hinge': "
                                           r"expected a number \(default 1.0\)"):
        rm.RewardLoss.from_config(dict(name="_test_hinge", kwargs=kwargs))
    with pytest.raises(ValueError, match=r"config.loss.kwargs sets \['gap'\], and "
                                         r"config.loss sets them too \(gap=2.0\)"):
      rm.RewardLoss.from_config(dict(name="_test_hinge", gap=2.0, kwargs="gap=0.5"))
    # A config field left at the loss's default is not a second setting.
    assert rm.RewardLoss.from_config(dict(name="_test_hinge", gap=1.0, kwargs="gap=0.5")
                                     ).hparams == (("gap", 0.5),)
    sign = np.where(batch["outcome"] >= 0.5, 1.0, -1.0)
    per_pair = np.maximum(0.0, 0.5 - sign * (r_c.astype(np.float64) - r_r))
    expected = np.sum(batch["weight"] * batch["pair_mask"] * per_pair) / batch["pair_mask"].sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_hinge")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['gap'\]"):
    rm.RewardLoss.from_config(dict(name="bt", gap=0.5))
  # The shipped configs carry margin=0.0 and label_smoothing=0.0: kwargs may still set them.
  loss_cfg = dict(tiny.get_config().loss)
  loss_cfg["kwargs"] = "margin=0.5"
  assert dict(rm.RewardLoss.from_config(loss_cfg).hparams)["margin"] == 0.5


def test_a_loss_that_broadcasts_the_outcome_wrongly_is_an_error():
  @preference.register_preference_loss("_test_bad_broadcast")
  def bad(r_chosen, r_rejected, *, outcome=1.0):
    return -jax.nn.log_sigmoid((r_chosen - r_rejected) * jnp.asarray(outcome))
  try:
    loss = rm.RewardLoss(name="_test_bad_broadcast")
    # One reward column [B, 1] times a [B] outcome broadcasts to [B, B] without a word.
    with pytest.raises(ValueError, match=r"returned shape \(3, 3\) for rewards of shape "
                                         r"\(3, 1\); .* \(spread a \[B\] outcome"):
      loss.per_pair(jnp.zeros((3, 1)), jnp.zeros((3, 1)), jnp.ones(3))
    assert loss.per_pair(jnp.zeros(3), jnp.zeros(3), jnp.ones(3)).shape == (3,)
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_bad_broadcast")

  @preference.register_preference_loss("_test_mean")
  def mean(r_chosen, r_rejected, *, outcome=1.0):
    del outcome
    return -jnp.mean(jax.nn.log_sigmoid(r_chosen - r_rejected))
  try:  # a scalar was told to spread its outcome
    with pytest.raises(ValueError, match=r"returned shape \(\) .*\(do not reduce over the "
                                         r"pairs: the trainer weighs and averages them\)"):
      rm.RewardLoss(name="_test_mean").per_pair(jnp.zeros(3), jnp.zeros(3), jnp.ones(3))
  finally:
    preference.PREFERENCE_LOSSES.pop("_test_mean")


def test_padded_pairs_contribute_nothing_even_if_non_finite():
  rng = np.random.default_rng(1)
  batch = _pair_batch(4, rng, padded_pairs=2)
  r_c = np.array([1.0, -0.5, np.nan, np.inf], np.float32)
  r_r = np.array([0.2, 0.1, 3.0, 0.0], np.float32)
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=1, objectives=(), num_segments=None)
  batch["outcome"] = np.ones(4, np.float32)
  batch["weight"][2:] = 1.0  # only pair_mask marks them: a stray weight must not count
  loss, _ = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))
  ref = -(batch["weight"][:2] * _log_sigmoid(r_c[:2] - r_r[:2])).sum() / 2
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_train_accuracy_counts_an_exact_score_tie_as_half_as_the_evaluator_does():
  batch = _pair_batch(5, np.random.default_rng(2), padded_pairs=1)
  batch["outcome"] = np.array([1.0, 1.0, 0.0, 1.0, 1.0], np.float32)
  r_c = np.array([1.0, 0.3, 0.3, -0.5, 9.0], np.float32)  # margins 1, 0, 0, −0.5; a filler
  r_r = np.array([0.0, 0.3, 0.3, 0.0, 0.0], np.float32)
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=1, objectives=(), num_segments=None)
  _, metrics = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))
  assert float(metrics["accuracy"]) == 0.5  # (1 + ½ + ½ + 0) / 4
  signed = np.where(batch["outcome"][:4] > 0.5, 1.0, -1.0) * (r_c[:4] - r_r[:4])
  assert float(metrics["accuracy"]) == preference_eval.pair_accuracy(signed).mean()


class _BagOfTokensRM(nnx.Module):
  """A reward model one embedding wide: the sum of its tokens' scores."""

  def __init__(self, vocab: int):
    self.embed = nnx.Embed(vocab, 1, rngs=nnx.Rngs(0))

  def __call__(self, tokens, attention_mask):
    return jnp.sum(self.embed(tokens)[..., 0] * attention_mask, axis=-1)


def test_accumulated_accuracy_and_margin_pool_decisive_pairs_as_one_batch_does():
  """Ties do not count in accuracy or margin: with accumulation, microbatches pool by their
  decisive pairs. Three ties in one strided microbatch used to give 0.375 for 0.6."""
  pairs, vocab = 8, 11
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(2 * pairs, 5)).astype(np.int32)
  outcome = np.ones(pairs, np.float32)
  outcome[[0, 2, 4]] = 0.5  # all in microbatch 0 of 2 (rows 0, 2, 4, 6)
  batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
           "loss_mask": np.ones_like(tokens), "pair_mask": np.ones(pairs, np.float32),
           "outcome": outcome, "weight": np.ones(pairs, np.float32)}
  model = _BagOfTokensRM(vocab)
  rewards = np.asarray(model(jnp.asarray(tokens), jnp.ones_like(tokens)), np.float64)
  signed = (rewards[:pairs] - rewards[pairs:])[outcome != 0.5]
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=1, objectives=(), num_segments=None)
  for accum_steps in (1, 2):
    graphdef, state = train.create_train_state(model, optax.sgd(0.0), 0)
    step = jax.jit(train.make_train_step(graphdef, loss_fn, optax.sgd(0.0),
                                         accum_steps=accum_steps))
    _, metrics = step(state, batch)
    assert not [k for k in metrics if k.startswith("weight_of/")]
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(signed > 0), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mean_margin"]), signed.mean(), rtol=1e-5)
    assert float(metrics["num_pairs"]) == pairs


def test_ensemble_loss_is_sum_of_member_means_with_bootstrap_weights():
  rng = np.random.default_rng(2)
  b, k = 8, 3
  batch = _pair_batch(b, rng, padded_pairs=2)
  batch["outcome"] = np.ones(b, np.float32)
  r_c, r_r = rng.normal(size=(b, k)).astype(np.float32), rng.normal(size=(b, k)).astype(np.float32)
  key = jax.random.key(5)
  loss_fn = rm.make_loss_fn(dict(name="bt", bootstrap=True), num_columns=k,
                            objectives=(), num_segments=None)
  loss, metrics = loss_fn(_fake_model(r_c, r_r), batch, key)
  real = batch["pair_mask"].sum()
  member = []
  for m in range(k):
    boot = np.asarray(jax.random.poisson(jax.random.fold_in(key, m), 1.0, (b,)), np.float64)
    per_pair = -_log_sigmoid(r_c[:, m].astype(np.float64) - r_r[:, m])
    member.append(np.sum(batch["weight"] * batch["pair_mask"] * boot * per_pair) / real)
    np.testing.assert_allclose(float(metrics[f"member_loss/{m}"]), member[-1], rtol=1e-5)
    # A single model told it is member m draws member m's weights.
    single = rm.make_loss_fn(dict(name="bt", bootstrap=True, first_member=m),
                             num_columns=1, objectives=(), num_segments=None)
    alone, _ = single(_fake_model(r_c[:, m], r_r[:, m]), batch, key)
    np.testing.assert_allclose(float(alone), member[-1], rtol=1e-5)
  np.testing.assert_allclose(float(loss), sum(member), rtol=1e-5)


# ----------------------------------------------------------------------------- training


def test_tiny_rm_learns_and_writes_outputs(data_env, tmp_path):
  config = small_config(40, num_pairs=1000, batch_size=32)
  out = train_rm.run(config, str(tmp_path))
  ev = out["eval"]
  # Measured 0.875 (112 validation pairs); chance is 0.5, the length-only baseline 0.47.
  assert ev["accuracy"] > 0.7, ev
  assert abs(ev["length_baseline_accuracy"] - 0.5) < 0.15
  assert 0.0 <= ev["ece"] < 0.2 and "chosen_longer_rate" in ev
  losses = train_losses(tmp_path)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_step"] == 40 and len(summary["params_sha256"]) == 64
  assert (tmp_path / "figures" / "reliability_40.png").stat().st_size > 1000
  written = json.loads((tmp_path / "eval_40.json").read_text())
  assert written["metrics"]["accuracy"] == pytest.approx(ev["accuracy"])
  assert sum(written["reliability"]["count"]) == 2 * ev["num_pairs"]
  logged = [r for r in train.read_metrics(tmp_path) if "eval/accuracy" in r]
  assert logged[-1]["step"] == 40
  assert logged[-1]["eval/accuracy"] == pytest.approx(ev["accuracy"], abs=1e-6)


def test_export_hf_writes_a_reward_model_transformers_scores_as_trained(data_env, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = small_config(3)
  config.eval.enabled = False
  config.export_hf = True
  train_rm.run(config, str(tmp_path))
  trained = experiment.make_model(config.model, vocab_size=259, seed=7)
  train.load_params(tmp_path, trained)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / experiment.HF_EXPORT_DIR).eval()
  assert hf_model.config.pad_token_id == 256  # the byte tokenizer's, not the preset's
  tokens = np.random.RandomState(0).randint(0, 256, (3, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 7:], mask[2, 4:] = 0, 0
  tokens[0, -1], tokens[1, 6], tokens[2, 3] = 258, 258, 258  # responses end with EOS
  tokens = np.where(mask > 0, tokens, 256)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  # transformers' score layer has no bias: its rewards are the model's less the head bias,
  # which Adam moves off zero although the Bradley-Terry gradient for it is zero in exact
  # arithmetic (normalised float noise).
  bias = float(trained.head.bias[0])
  np.testing.assert_allclose(np.asarray(trained(tokens, attention_mask=mask)) - bias, ref,
                             atol=1e-4)
  exported = models.from_pretrained(tmp_path / experiment.HF_EXPORT_DIR, head="reward")
  np.testing.assert_allclose(exported(tokens, attention_mask=mask),
                             trained(tokens, attention_mask=mask), atol=1e-5)


def test_deep_ensemble_members_equal_separately_trained_models(data_env, tmp_path):
  steps, k = 3, 4
  config = small_config(steps, base=ensemble_tiny)
  config.loop.eval_every = 0
  out = train_rm.run(config, str(tmp_path / "ensemble"))
  assert {f"member/{m}/accuracy" for m in range(k)} <= set(out["eval"])
  assert "member_sign_disagreement" in out["eval"]
  records = [r for r in train.read_metrics(tmp_path / "ensemble") if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  # Members sharded over an `ensemble` mesh axis train identically.
  config.mesh.update(shape=(1, 1, 1), ensemble=k, num_devices=k)
  config.eval.enabled = False
  train_rm.run(config, str(tmp_path / "sharded"))
  sharded = [r for r in train.read_metrics(tmp_path / "sharded") if "loss" in r]
  for m in range(k):
    comparisons.assert_losses_close([r[f"member_loss/{m}"] for r in sharded],
                                    [r[f"member_loss/{m}"] for r in records])
  for m in (0, k - 1):  # The first and last member: the fold_in offset both ends.
    single = small_config(steps)
    single.seed = m
    single.loss.bootstrap = True
    single.loss.first_member = m
    single.eval.enabled = False
    train_rm.run(single, str(tmp_path / f"member{m}"))
    comparisons.assert_losses_close([r[f"member_loss/{m}"] for r in records],
                                    train_losses(tmp_path / f"member{m}"))


def test_head_ensemble_trains_members_in_one_step(data_env, tmp_path):
  config = small_config(3, base=ensemble_tiny)
  config.model.ensemble = "heads"
  out = train_rm.run(config, str(tmp_path))
  record = train.read_metrics(tmp_path)[-1]
  members = [record[f"member_loss/{m}"] for m in range(4)]
  assert record["loss"] == pytest.approx(sum(members), rel=1e-5)
  assert len(set(members)) == 4  # Different heads and bootstrap weights.
  assert len({out["eval"][f"member/{m}/bt_log_loss"] for m in range(4)}) == 4


def _packed(config):
  config.data.pipeline.update(mode="packed", pack_rows=4, pack_length=64,
                              max_segments_per_row=8, pack_window=32)
  return config


@pytest.fixture(scope="module")
def packed_run(data_env):
  """An uninterrupted 6-step packed-batch run on one device: (config, workdir, result)."""
  with _private_tmp() as d:
    config = _packed(small_config(6))
    yield config, pathlib.Path(d), train_rm.run(config, d)


def test_shared_prompt_batches_train(data_env, tmp_path):
  """Wiring of ``data.pipeline.share_prompt`` and ``trim_rows``; their rewards and
  gradients are checked in ``test_shared_prompt.py`` and ``test_trim_rows.py``."""
  config = small_config(3)
  config.data.pipeline.update(mode="packed", share_prompt=True, pack_rows=4, pack_length=64,
                              max_segments_per_row=12, pack_window=32, trim_rows=True)
  config.data.pipeline.max_length = 32
  out = train_rm.run(config, str(tmp_path / "rm"))
  records = [r for r in train.read_metrics(tmp_path / "rm") if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["num_pairs"] > 1 for r in records), records
  assert 0.0 <= out["eval"]["accuracy"] <= 1.0  # the eval pass is padded, as always


def test_resume_gives_the_uninterrupted_result(packed_run, tmp_path):
  config, straight, want = packed_run
  first = config.copy_and_resolve_references()
  first.loop.num_steps = 3  # "Killed" after 3 steps (optimizer schedule unchanged).
  train_rm.run(first, str(tmp_path))
  got = train_rm.run(config, str(tmp_path))
  assert got["summary"]["params_sha256"] == want["summary"]["params_sha256"]
  assert [r["step"] for r in train.read_metrics(tmp_path) if "loss" in r] == list(range(1, 7))
  np.testing.assert_allclose(train_losses(tmp_path), train_losses(straight), rtol=1e-6)


def test_mesh_2x2x2_matches_single_device(packed_run, tmp_path):
  config, single_dir, single = packed_run
  assert jax.device_count() >= 8
  sharded_config = config.copy_and_resolve_references()
  sharded_config.mesh.update(shape=(2, 2, 2), num_devices=8)
  sharded = train_rm.run(sharded_config, str(tmp_path))
  records = [[r for r in train.read_metrics(d) if "loss" in r] for d in (single_dir, tmp_path)]
  comparisons.assert_same_first_step(*records)
  comparisons.assert_losses_close(train_losses(tmp_path), train_losses(single_dir))
  # Not reward_mean: BT losses ignore a shared reward offset, so the head bias gets only
  # round-off gradients, which Adam amplifies differently on different meshes.
  for name in ("mean_margin", "bt_log_loss", "ece"):
    assert sharded["eval"][name] == pytest.approx(single["eval"][name], rel=1e-3, abs=1e-4), name
  # Accuracy counts signs: a pair whose margin is within round-off of 0 may flip.
  one_pair = 1.0 / single["eval"]["num_pairs"]
  assert abs(sharded["eval"]["accuracy"] - single["eval"]["accuracy"]) <= one_pair + 1e-9
  assert sharded["eval"]["length_baseline_accuracy"] == single["eval"]["length_baseline_accuracy"]


USER_LOSS_MODULE = """
import jax
from prefjax.losses import preference

@preference.register_preference_loss("scaled_bt")
def scaled_bt(r_chosen, r_rejected, *, outcome=1.0, scale=1.0):
  if isinstance(r_chosen, jax.core.Tracer):  # in the train step, not the config-time check
    with open("{log}", "w") as f:
      f.write(str(scale))
  return -jax.nn.log_sigmoid(scale * (r_chosen - r_rejected)), {{"scale": scale}}
"""


def test_cli_smoke(data_env, tmp_path):
  cache = tmp_path / "jax_cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=child_env.one_device_xla_flags(),
             PREFJAX_COMPILATION_CACHE=str(cache))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own cache would win
  # A loss of the user's own module, registered through --imports, its scale from kwargs.
  (tmp_path / "user_losses.py").write_text(USER_LOSS_MODULE.format(log=tmp_path / "traced"))
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "experiments.train_rm", "--config=configs/rm/tiny.py:quick",
         f"--workdir={tmp_path}", "--config.loop.num_steps=3", "--config.optimizer.warmup_steps=0",
         "--config.data.tiny_world.num_pairs=600", "--config.data.pipeline.batch_size=8",
         "--imports=user_losses", "--config.loss.name=scaled_bt",
         "--config.loss.kwargs=scale=2.5"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "traced").read_text() == "2.5"
  logged = [r["scaled_bt/scale"] for r in train.read_metrics(tmp_path) if "loss" in r]
  assert logged and set(logged) == {2.5}  # the loss's own metric
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["final_step"] == 3
  data_lines = [line for line in proc.stderr.splitlines() if "] data: train " in line]
  assert len(data_lines) == 1, proc.stderr[-3000:]
  train_data = summary["data"]["train"]  # resplit_train: the rest is in sibling splits
  assert train_data["rows_read"] == 600 == train_data["rows_built"] + train_data[
      "rows_in_other_splits"]
  assert (f"read 600, built {train_data['rows_built']} (+{train_data['rows_in_other_splits']} "
          "in sibling splits), skipped 0") in data_lines[0]
  assert " | eval " in data_lines[0]
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["loop"]["num_steps"] == written["optimizer"]["total_steps"] == 3
  [record] = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
  assert record["imports"] == ["user_losses"] and record["argv"][1:] == cmd[3:]
  assert record["processes"] == 1 and record["versions"]["jax"] == jax.__version__
  if (REPO / ".git").exists():  # a git checkout, as CI's clean clone is
    assert len(record["prefjax_commit"]) == 40 and isinstance(record["prefjax_changed"], bool)
  assert any(p.name.startswith("jit_train_step") for p in cache.iterdir()), sorted(
      p.name for p in cache.iterdir())  # the persistent compilation cache got the step


def test_microbatches_pool_by_their_real_pairs_as_one_batch():
  """Without ``loss_weight`` a microbatch of 1 real pair counted as much as one of 7 under
  gradient accumulation."""
  rng = np.random.default_rng(7)
  batch = _pair_batch(12, rng, padded_pairs=3)
  r_c, r_r = rng.normal(size=12).astype(np.float32), rng.normal(size=12).astype(np.float32)
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=1, objectives=(), num_segments=None)
  full, _ = loss_fn(_fake_model(r_c, r_r), batch, jax.random.key(0))
  parts = []
  for rows in (np.arange(0, 8), np.arange(8, 12)):  # 8 real pairs, then 1 real of 4
    sub = {k: v[rows] for k, v in batch.items() if k in ("pair_mask", "weight", "outcome")}
    sub.update(tokens=batch["tokens"][:2 * len(rows)],
               attention_mask=batch["attention_mask"][:2 * len(rows)])
    parts.append(loss_fn(_fake_model(r_c[rows], r_r[rows]), sub, jax.random.key(0)))
  weights = np.asarray([float(m["loss_weight"]) for _, m in parts])
  np.testing.assert_array_equal(weights, [8.0, 1.0])
  pooled = sum(w * float(l) for w, (l, _) in zip(weights, parts)) / weights.sum()
  np.testing.assert_allclose(pooled, float(full), rtol=1e-6)


def test_a_fork_that_appends_its_own_evaluators_runs_to_the_end(data_env, tmp_path, monkeypatch):
  """README, "Adding an evaluator": fork ``run`` and append yours. ``run`` read ``.last``
  (RewardModelEvaluator's) of every evaluator after training, and failed on any other."""
  train_loop = train.train_loop
  seen = []

  def forked_train_loop(**kwargs):
    def plain(step, model):
      del model
      seen.append(step)
      return {"fork/step_seen": float(step)}
    kwargs["evaluators"].append(plain)
    kwargs["evaluators"].append(train.BatchEvaluator(
        lambda model, batch: {"fork/one": jnp.ones(())}, [{"x": np.zeros(2)}]))
    return train_loop(**kwargs)

  monkeypatch.setattr(train_rm.train, "train_loop", forked_train_loop)
  config = small_config(4)
  config.loop.eval_every = 2
  out = train_rm.run(config, str(tmp_path))
  assert seen == [2, 4] and out["eval"]["accuracy"] >= 0.0
  logged = [r for r in train.read_metrics(tmp_path) if "eval/accuracy" in r]
  assert [r["step"] for r in logged] == [2, 4]
  assert all(r["eval/fork/step_seen"] == r["step"] and r["eval/fork/one"] == 1.0 for r in logged)
  # A second evaluator returning a name the first returned is refused, not overwritten.
  monkeypatch.setattr(train_rm.train, "train_loop", lambda **kw: train_loop(**{
      **kw, "evaluators": [*kw["evaluators"], lambda step, model: {"accuracy": 1.0}]}))
  with pytest.raises(ValueError, match=r"returned \['accuracy'\], which an evaluator before"):
    train_rm.run(small_config(2), str(tmp_path / "clash"))
