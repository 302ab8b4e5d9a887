"""Tests for prefjax.overopt.bandit (world, pairs, proxies) and policy_net (learned RL policy)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from prefjax.overopt import bandit
from prefjax.overopt import exact
from prefjax.overopt import policy_net

TINY = bandit.WorldConfig(num_prompts=8, num_candidates=256, gold_hidden=64)


@pytest.fixture(scope="module")
def world():
  return bandit.make_world(TINY)


def _pooled_moments(ref_logits, scores):
  """Reference computation: per prompt, normalise π_ref in float64, then average prompts."""
  means, second = [], []
  for logits, s in zip(ref_logits, scores):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    means.append(p @ s)
    second.append(p @ (s * s))
  mean = np.mean(means)
  return mean, np.mean(second) - mean**2


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_per_seed_and_differs_across_seeds(world):
  again = bandit.make_world(TINY)
  for a, b in zip(world[:3], again[:3]):
    np.testing.assert_array_equal(a, b)
  other = bandit.make_world(dataclasses.replace(TINY, seed=1))
  assert not np.allclose(world.features, other.features)
  assert np.corrcoef(world.gold.ravel(), other.gold.ravel())[0, 1] < 0.5
  assert world.features.dtype == np.float32
  assert world.ref_logits.dtype == world.gold.dtype == np.float64
  assert world.features.shape == (8, 256, 32) and world.gold.shape == (8, 256)


def test_ref_logits_normalise_and_gold_is_standardised_under_ref(world):
  np.testing.assert_allclose(special.logsumexp(world.ref_logits, axis=1), 0.0, atol=1e-12)
  mean, var = _pooled_moments(world.ref_logits, world.gold)
  assert abs(mean) < 1e-12 and abs(var - 1.0) < 1e-12
  # π_ref is far from uniform and far from a point mass (effective sample size).
  ess = 1.0 / np.sum(np.exp(2 * world.ref_logits), axis=1)
  assert 0.2 * 256 < ess.mean() < 0.8 * 256


def test_standardize_matches_float64_numpy_per_member():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(5, 40)) * 2.0            # unnormalised logits
  scores = rng.standard_t(3, size=(3, 5, 40)) * [[[2.0]], [[0.1]], [[30.0]]] + 7.0
  out = bandit.standardize(ref, scores)
  assert out.shape == scores.shape and out.dtype == np.float64
  for k in range(3):
    mean, var = _pooled_moments(ref, out[k])
    assert abs(mean) < 1e-12 and abs(var - 1.0) < 1e-12
    slope = np.polyfit(scores[k].ravel(), out[k].ravel(), 1)[0]   # affine, increasing
    np.testing.assert_allclose(out[k], (scores[k] - scores[k, 0, 0]) * slope + out[k, 0, 0],
                               atol=1e-10)
  np.testing.assert_allclose(bandit.standardize(ref, scores[1]), out[1], rtol=1e-14)
  with pytest.raises(ValueError, match="must be"):
    bandit.standardize(ref, scores[:, :, :7])
  with pytest.raises(ValueError, match="constant"):
    bandit.standardize(ref, np.ones((5, 40)))


@pytest.mark.parametrize("df, var_tol, kurtosis_range", [
    (math.inf, 0.01, (2.95, 3.05)),    # Gaussian
    (5.0, 0.03, (6.0, 30.0)),          # population kurtosis 9
    (3.0, 0.25, (20.0, math.inf)),     # infinite population kurtosis
])
def test_features_have_unit_variance_and_student_t_tails(df, var_tol, kurtosis_range):
  config = bandit.WorldConfig(num_prompts=4, num_candidates=25_000, feature_dim=8,
                              tail_df=df, prompt_offset_sd=0.0, gold_hidden=8)
  x = bandit.make_world(config).features.astype(np.float64).ravel()   # 800k draws
  assert abs(x.var() - 1.0) < var_tol
  kurtosis = np.mean((x - x.mean())**4) / x.var()**2
  assert kurtosis_range[0] < kurtosis < kurtosis_range[1], kurtosis


def test_prompt_offsets_shift_every_candidate_of_a_prompt():
  config = bandit.WorldConfig(num_prompts=200, num_candidates=400, feature_dim=4,
                              tail_df=math.inf, prompt_offset_sd=0.5, gold_hidden=8)
  prompt_means = bandit.make_world(config).features.astype(np.float64).mean(axis=1)
  # Var of a prompt mean = sd² + 1/M = 0.2525; 800 values.
  assert abs(prompt_means.var() - 0.2525) < 0.04


def test_world_config_rejects_bad_values():
  with pytest.raises(ValueError, match="tail_df"):
    bandit.WorldConfig(tail_df=2.0)
  with pytest.raises(ValueError, match="num_candidates"):
    bandit.WorldConfig(num_candidates=1)
  with pytest.raises(ValueError, match="ref_temperature"):
    bandit.WorldConfig(ref_temperature=0.0)


# ----------------------------------------------------------------------------- pairs


def test_pairs_are_gold_labelled_distinct_and_deterministic(world):
  pairs = bandit.sample_pairs(world, 5000, seed=3)
  assert np.all(world.gold[pairs.prompt, pairs.chosen] > world.gold[pairs.prompt, pairs.rejected])
  assert np.all(pairs.chosen != pairs.rejected)
  again = bandit.sample_pairs(world, 5000, seed=3)
  other = bandit.sample_pairs(world, 5000, seed=4)
  for a, b in zip(pairs, again):
    np.testing.assert_array_equal(a, b)
  assert np.mean(pairs.chosen != other.chosen) > 0.9
  counts = np.bincount(pairs.prompt, minlength=8)
  assert counts.min() > 5000 / 8 - 4 * math.sqrt(5000 / 8)   # prompt ~ uniform


def test_pair_candidates_follow_ref_conditioned_on_distinct():
  world = bandit.make_world(bandit.WorldConfig(num_prompts=2, num_candidates=12, gold_hidden=8,
                                               ref_temperature=0.5))
  pairs = bandit.sample_pairs(world, 200_000, seed=0)
  for prompt in range(2):
    q = np.exp(world.ref_logits[prompt])
    # One side of a pair ~ π(m)(1 − π(m)) / (1 − Σπ²): π_ref × π_ref given a ≠ b.
    expected = q * (1 - q) / (1 - np.sum(q * q))
    rows = pairs.prompt == prompt
    both = np.concatenate([pairs.chosen[rows], pairs.rejected[rows]])
    freq = np.bincount(both, minlength=12) / both.size
    se = np.sqrt(expected * (1 - expected) / rows.sum())
    assert np.all(np.abs(freq - expected) < 5 * se + 1e-4), (freq, expected)


def test_label_noise_flips_at_its_rate(world):
  pairs = bandit.sample_pairs(world, 40_000, label_noise=0.25, seed=0)
  flipped = world.gold[pairs.prompt, pairs.chosen] < world.gold[pairs.prompt, pairs.rejected]
  assert abs(flipped.mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 40_000)
  for bad in (0.5, -0.1):
    with pytest.raises(ValueError, match="label_noise"):
      bandit.sample_pairs(world, 10, label_noise=bad)


# ----------------------------------------------------------------------------- proxies


def test_proxy_config_rejects_bad_values():
  with pytest.raises(ValueError, match="width"):
    bandit.ProxyConfig(width=0)
  with pytest.raises(ValueError, match="label_noise"):
    bandit.ProxyConfig(width=4, label_noise=0.5)
  with pytest.raises(ValueError, match="batch_size"):
    bandit.ProxyConfig(width=4, num_pairs=100, batch_size=256)
  with pytest.raises(ValueError, match="loss"):
    bandit.ProxyConfig(width=4, loss="no_such_loss")


_SMALL = bandit.ProxyConfig(width=16, num_pairs=2000, steps=300, batch_size=128, eval_pairs=4000)


def test_proxies_learn_gold_and_more_steps_or_pairs_help(world):
  base = _SMALL
  trained = bandit.train_proxies(world, base, [0, 1])
  assert trained.scores.shape == (2, 8, 256) and trained.scores.dtype == np.float64
  for k in range(2):
    mean, var = _pooled_moments(world.ref_logits, trained.scores[k])
    assert abs(mean) < 1e-9 and abs(var - 1) < 1e-9
  assert np.all(trained.gold_accuracy > 0.8), trained.gold_accuracy     # chance is 0.5
  assert np.all(trained.train_accuracy > trained.gold_accuracy - 0.02)
  short = bandit.train_proxies(world, dataclasses.replace(base, steps=20), [0, 1])
  assert np.all(trained.train_loss < short.train_loss - 0.1), (trained.train_loss,
                                                               short.train_loss)
  few = bandit.train_proxies(world, dataclasses.replace(base, num_pairs=128), [0, 1])
  assert np.all(few.gold_accuracy < trained.gold_accuracy - 0.03), (few.gold_accuracy,
                                                                    trained.gold_accuracy)


def test_tail_residuals_match_a_direct_computation(world):
  rng = np.random.default_rng(0)
  scores = world.gold + rng.normal(size=(2, 8, 256)) * [[[0.5]], [[2.0]]]
  out = bandit.tail_residuals(world, scores, edges=(3.0,))
  np.testing.assert_allclose(out.mass.sum(), 1.0, rtol=1e-12)
  far = np.abs(world.features).max(-1) >= 3.0
  w = np.exp(world.ref_logits) * far
  expected = np.sqrt(np.sum(w * (scores[1] - world.gold) ** 2) / w.sum())
  np.testing.assert_allclose(out.residual_sd[1, 1], expected, rtol=1e-12)
  np.testing.assert_allclose(out.mass[1], w.sum() / 8, rtol=1e-12)
  assert out.residual_sd.shape == (2, 2) and 0.3 < out.residual_sd[0, 0] < 0.7


def _member_batch(world, seed, size=64):
  pairs = bandit.sample_pairs(world, size, seed=seed)
  return world.features[pairs.prompt, pairs.chosen], world.features[pairs.prompt, pairs.rejected]


def test_stacked_members_have_the_loss_and_gradient_of_lone_members(world):
  seeds = (3, 5, 7)
  stacked = bandit.StackedMLP(32, 16, 2, seeds)
  alone = bandit.StackedMLP(32, 16, 2, (5,))
  batches = [_member_batch(world, s) for s in seeds]
  batch = {"chosen": jnp.stack([b[0] for b in batches]),
           "rejected": jnp.stack([b[1] for b in batches])}
  loss_fn = bandit.proxy_loss_fn("bradley_terry")

  def value_and_grad(model, batch):
    graphdef, params = nnx.split(model)
    def f(params):
      return loss_fn(nnx.merge(graphdef, params), batch, None)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (total, metrics), grads = value_and_grad(stacked, batch)
  (_, lone_metrics), lone_grads = value_and_grad(
      alone, {k: v[1:2] for k, v in batch.items()})
  np.testing.assert_allclose(float(metrics["loss_1"]), float(lone_metrics["loss_0"]), rtol=1e-6)
  np.testing.assert_allclose(float(total), sum(float(metrics[f"loss_{k}"]) for k in range(3)),
                             rtol=1e-6)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  lone_leaves = jax.tree.leaves(lone_grads)
  assert len(leaves) == len(lone_leaves) == 6
  for (path, g), lone in zip(leaves, lone_leaves):
    scale = float(jnp.max(jnp.abs(lone)))
    if "biases" in jax.tree_util.keystr(path) and g.shape[-1] == 1:
      assert scale == 0.0      # the loss depends on reward differences only
    else:
      assert scale > 0
    np.testing.assert_allclose(np.asarray(g[1:2]), np.asarray(lone), atol=1e-5 * scale)


def test_members_trained_together_score_like_members_trained_alone(world):
  together = bandit.train_proxies(world, _SMALL, [11, 12])    # the program of the test above
  alone = bandit.train_proxies(world, _SMALL, [12])
  diff = np.max(np.abs(together.scores[1] - alone.scores[0]))
  print("max |together - alone| score difference:", diff)
  assert diff < 1e-3      # scores have SD 1
  np.testing.assert_allclose(together.train_loss[1], alone.train_loss[0], rtol=1e-3)
  assert np.mean(np.abs(together.scores[0] - together.scores[1])) > 0.05    # members differ


def test_train_proxies_rejects_repeated_seeds(world):
  with pytest.raises(ValueError, match="distinct"):
    bandit.train_proxies(world, bandit.ProxyConfig(width=4, num_pairs=300, steps=2), [1, 1])


def test_pooled_worlds_draw_their_own_proxy_initialisations(monkeypatch):
  """Member k of every world started from the same weights: pooled worlds, bootstrapped
  as independent prompts, shared a draw."""
  initial = []
  make = bandit.make_proxy_trainer

  def capture(config, feature_dim, seeds):
    graphdef, state, run_chunk = make(config, feature_dim, seeds)
    initial.append(next(np.asarray(x) for x in jax.tree.leaves(state.params) if x.ndim == 3))
    return graphdef, state, run_chunk
  monkeypatch.setattr(bandit, "make_proxy_trainer", capture)
  config = bandit.ProxyConfig(width=4, num_pairs=300, steps=1)
  for seed in (0, 1, 0):
    bandit.train_proxies(bandit.make_world(dataclasses.replace(TINY, seed=seed)), config, [0, 1])
  assert initial[0].shape[0] == 2 and initial[0].std() > 0.05
  np.testing.assert_array_equal(initial[2], initial[0])           # deterministic per world
  assert np.all(np.abs(initial[1] - initial[0]).mean(axis=(1, 2)) > 0.05)  # each member


def test_world_streams_are_not_the_plain_seeds_stream():
  """Tag 0's stream was the plain seed's (SeedSequence ignores trailing zeros), which
  the estimator check and seed-0 bootstraps draw from."""
  tags = (bandit._FEATURES, bandit._OFFSETS, bandit._REF_NET, bandit._GOLD_NET,
          bandit._TRAIN_PAIRS, bandit._HELDOUT_PAIRS, bandit._BATCHES)
  for seed in (0, 3):
    plain = np.random.default_rng(seed).random(8)
    draws = [bandit._rng(seed, tag).random(8) for tag in tags]
    assert all(not np.allclose(d, plain) for d in draws)
    assert len({d.tobytes() for d in draws}) == len(tags)


# ----------------------------------------------------------------------------- policy


def test_kl_regularized_loss_is_exact_and_stationary_at_the_closed_form(world):
  lam = 0.7
  loss_fn = policy_net.kl_regularized_loss(world.gold, lam, ref_logits=world.ref_logits)
  closed = exact.rl_path_log_probs(world.ref_logits, world.gold, [1 / lam])[:, 0]
  batch = {policy_net.REF_LOG_PROBS: jnp.asarray(world.ref_logits, jnp.float32)}
  value = float(loss_fn(jnp.asarray(closed, jnp.float32), batch))
  p = np.exp(closed)
  expected = np.mean(-np.sum(p * world.gold, 1)
                     + lam * np.sum(p * (closed - world.ref_logits), 1))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  grad = jax.grad(lambda z: loss_fn(jax.nn.log_softmax(z), batch))(jnp.asarray(closed,
                                                                              jnp.float32))
  assert float(jnp.max(jnp.abs(grad))) < 1e-5
  # Default ref (from the batch) gives the same value.
  batch_ref = policy_net.kl_regularized_loss(world.gold, lam)
  np.testing.assert_allclose(float(batch_ref(jnp.asarray(closed, jnp.float32), batch)), value,
                             rtol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_learned_policy_reaches_the_closed_form_rl_path(world, lam):
  config = bandit.PolicyConfig(hidden=64, steps=300, learning_rate=1e-2)
  log_pi, records = bandit.train_policy(
      world, bandit.kl_regularized_loss(world.gold, lam), config, eval_every=100,
      eval_fn=lambda step, lp: {"gold": float(np.sum(np.exp(lp) * world.gold, 1).mean())})
  closed = exact.rl_path_log_probs(world.ref_logits, world.gold, [1 / lam])[:, 0]
  np.testing.assert_allclose(special.logsumexp(log_pi, axis=1), 0.0, atol=1e-12)
  target_kl = policy_net.exact_kl(closed, world.ref_logits).mean()
  gap = policy_net.exact_kl(log_pi, closed).mean()
  assert target_kl > 0.3 and gap < 0.03 * target_kl, (gap, target_kl)
  assert [r["step"] for r in records] == [0, 100, 200, 300]
  assert records[0]["kl"] < 1e-6 and abs(records[0]["gold"]) < 1e-6    # starts at π_ref
  closed_gold = np.sum(np.exp(closed) * world.gold, 1).mean()
  assert abs(records[-1]["gold"] - closed_gold) < 0.05 * closed_gold


def test_train_policy_feeds_per_step_batches_to_the_loss(world):
  pairs = bandit.sample_pairs(world, 3000, seed=0)
  steps, size = 60, 50
  index = np.random.default_rng(0).integers(0, 3000, (steps, size))
  batches = {"prompt": pairs.prompt[index], "chosen": pairs.chosen[index],
             "rejected": pairs.rejected[index]}
  seen = []

  def dpo_loss(log_pi, batch, beta=0.5):
    seen.append(sorted(batch))
    ratio = log_pi - batch[policy_net.REF_LOG_PROBS]
    h = (ratio[batch["prompt"], batch["chosen"]] - ratio[batch["prompt"], batch["rejected"]])
    return -jnp.mean(jax.nn.log_sigmoid(beta * h))

  def accuracy(step, log_pi):
    del step
    held = bandit.heldout_pairs(world, 2000)
    return {"pair_accuracy": float(bandit.pair_accuracy(log_pi - world.ref_logits, held))}

  log_pi, records = bandit.train_policy(world, dpo_loss, bandit.PolicyConfig(steps=steps),
                                        batches=batches, eval_fn=accuracy)
  assert seen[0] == ["chosen", "prompt", "ref_log_probs", "rejected"]
  assert [r["step"] for r in records] == [0, steps]
  assert records[-1]["kl"] > 0.05
  assert records[-1]["pair_accuracy"] > 0.75          # chance 0.5 (log-ratio 0 at step 0 ties)
  # The same data as a host function returning Pairs gives the same policy.
  by_step = lambda s: bandit.Pairs(*(batches[k][s] for k in ("prompt", "chosen", "rejected")))
  again, _ = bandit.train_policy(world, dpo_loss, bandit.PolicyConfig(steps=steps),
                                 batches=by_step)
  np.testing.assert_allclose(again, log_pi, atol=1e-5)
  with pytest.raises(ValueError, match="leading"):
    bandit.train_policy(world, dpo_loss, bandit.PolicyConfig(steps=10), batches=batches)
  with pytest.raises(ValueError, match="reserved"):
    bandit.train_policy(world, dpo_loss, bandit.PolicyConfig(steps=steps),
                        batches=dict(batches, features=batches["prompt"]))
