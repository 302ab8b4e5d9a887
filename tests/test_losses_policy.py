"""Tests for prefjax.losses.policy against float64 NumPy re-derivations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.losses import policy
from tests import numerics

def _mask(lengths, t, *, left=False):
  idx = np.arange(t)[None, :]
  lengths = np.asarray(lengths)[:, None]
  m = idx >= t - lengths if left else idx < lengths
  return m.astype(np.float32)


# --------------------------------------------------------------------------
# PPO.
# --------------------------------------------------------------------------


def _ppo_reference(logp, old_logp, adv, mask, eps_low, eps_high, dual_clip=None):
  """Element-by-element float64 PPO loss, written from the paper's formula."""
  b, t = logp.shape
  loss = np.zeros((b, t))
  cut = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      r = np.exp(float(logp[i, j]) - float(old_logp[i, j]))
      a = float(adv[i, j])
      r_clip = min(max(r, 1 - eps_low), 1 + eps_high)
      objective = min(r * a, r_clip * a)
      if dual_clip is not None and a < 0:
        objective = max(objective, dual_clip * a)
      loss[i, j] = -objective
      cut[i, j] = ((r > 1 + eps_high and a > 0) or (r < 1 - eps_low and a < 0)
                   or (dual_clip is not None and a < 0 and r > dual_clip))
  count = np.maximum(mask.sum(1), 1)
  return loss, loss.sum(1) / count, cut.sum(1) / count


def _ppo_inputs():
  rng = np.random.default_rng(1)
  b, t = 4, 7
  old_logp = rng.normal(-2.0, 0.5, (b, t))
  # log-ratios spread over [-0.6, 0.6] hit both clipped branches for eps=0.2.
  logp = old_logp + rng.uniform(-0.6, 0.6, (b, t))
  adv = rng.normal(0.0, 1.0, (b, t))
  mask = _mask([7, 5, 3, 6], t)
  return logp, old_logp, adv, mask


@pytest.mark.parametrize("eps_low,eps_high,dual_clip", [
    (0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 3.0), (0.2, None, 1.2)])
def test_ppo_clip_matches_formula(eps_low, eps_high, dual_clip):
  logp, old_logp, adv, mask = _ppo_inputs()
  out = jax.jit(functools.partial(policy.ppo_clip_loss, clip_eps=eps_low,
                                  clip_eps_high=eps_high, dual_clip=dual_clip))(
                                      logp, old_logp, adv, mask)
  high = eps_low if eps_high is None else eps_high
  ref_tok, ref_seq, ref_cut = _ppo_reference(logp, old_logp, adv, mask, eps_low, high,
                                             dual_clip)
  assert ref_cut.min() < ref_cut.max() and ref_cut.max() > 0  # clipped branches exercised
  np.testing.assert_allclose(out.per_token, ref_tok, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.per_sequence, ref_seq, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.clip_fraction, ref_cut, rtol=1e-6)
  log_r = (logp - old_logp) * mask
  k3 = (np.exp(log_r) - 1 - log_r) * mask
  np.testing.assert_allclose(out.approx_kl, k3.sum(1) / mask.sum(1), rtol=1e-4, atol=1e-7)
  assert out.per_token.dtype == jnp.float32


def test_ppo_dual_clip_bounds_negative_advantage_loss():
  logp = np.log(np.array([[5.0, 5.0, 0.5]]))  # ratio 5 = far outside the trust region
  old_logp = np.zeros((1, 3))
  adv = np.array([[-1.0, 1.0, -1.0]])
  mask = np.ones((1, 3))
  plain = policy.ppo_clip_loss(logp, old_logp, adv, mask)
  dual = policy.ppo_clip_loss(logp, old_logp, adv, mask, dual_clip=3.0)
  np.testing.assert_allclose(plain.per_token, [[5.0, -1.2, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(dual.per_token, [[3.0, -1.2, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(plain.clip_fraction, [2 / 3], rtol=1e-6)
  np.testing.assert_allclose(dual.clip_fraction, [1.0], rtol=1e-6)
  g = jax.grad(lambda lp: policy.ppo_clip_loss(lp, old_logp, adv, mask).per_token.sum())(
      jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(g, [[5.0, 0.0, 0.0]], rtol=1e-6)  # only the unclipped −rA
  with pytest.raises(ValueError, match="dual_clip"):
    policy.ppo_clip_loss(logp, old_logp, adv, mask, dual_clip=0.5)


def test_ppo_gradient_matches_finite_differences_and_vanishes_when_clipped():
  logp, old_logp, adv, mask = _ppo_inputs()
  # Keep every ratio away from the clip kinks so finite differences are valid.
  log_r = logp - old_logp
  log_r = np.where(np.abs(np.exp(log_r) - 1.0 - 0.2) < 0.02, log_r + 0.05, log_r)
  log_r = np.where(np.abs(np.exp(log_r) - 1.0 + 0.2) < 0.02, log_r - 0.05, log_r)
  logp = old_logp + log_r
  fn = jax.jit(lambda lp: policy.ppo_clip_loss(lp, old_logp, adv, mask).per_sequence)
  numerics.check_grad(fn, [logp], 0)
  old32, adv32 = old_logp.astype(np.float32), adv.astype(np.float32)
  grad = jax.grad(lambda lp: policy.ppo_clip_loss(lp, old32, adv32, mask).per_token.sum())(
      jnp.asarray(logp, jnp.float32))
  r = np.exp(log_r)
  cut = ((r > 1.2) & (adv > 0)) | ((r < 0.8) & (adv < 0))
  assert cut[mask > 0].any()
  np.testing.assert_array_equal(np.asarray(grad)[cut | (mask == 0)], 0.0)
  expected = np.where(cut | (mask == 0), 0.0, -r * adv)  # d(−rA)/dlogp = −rA
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_ppo_ratio_beyond_float32_exp_keeps_the_other_tokens_gradients():
  # log ρ = 100 overflows exp in float32. With A > 0 or A = 0 the loss and its gradient
  # at that token are finite (the clip or A = 0 decides them); with A < 0 the loss is
  # +inf, which the train step's non-finite guard skips rather than training on.
  old_logp = np.zeros((1, 4), np.float32)
  logp = jnp.asarray([[100.0, 100.0, 0.1, -0.1]], jnp.float32)
  adv = np.array([[1.0, 0.0, 2.0, -1.0]], np.float32)
  mask = np.ones((1, 4), np.float32)
  out = policy.ppo_clip_loss(logp, old_logp, adv, mask)
  np.testing.assert_allclose(out.per_token[0, :2], [-1.2, 0.0], rtol=1e-6)
  g = jax.grad(lambda lp: policy.ppo_clip_loss(lp, old_logp, adv, mask).per_token.sum())(logp)
  r = np.exp([0.1, -0.1])
  np.testing.assert_allclose(g, [[0.0, 0.0, -r[0] * 2.0, r[1] * 1.0]], rtol=1e-5)
  negative = np.array([[-1.0, 0.0, 2.0, -1.0]], np.float32)
  worse = policy.ppo_clip_loss(logp, old_logp, negative, mask)
  assert np.isposinf(worse.per_token[0, 0])
  # The dual clip bounds that loss at −c·A, so its gradient there is 0, not NaN.
  dual = lambda lp: policy.ppo_clip_loss(lp, old_logp, negative, mask, dual_clip=3.0)
  assert float(dual(logp).per_token[0, 0]) == 3.0
  g = jax.grad(lambda lp: dual(lp).per_token.sum())(logp)
  np.testing.assert_allclose(g, [[0.0, 0.0, -r[0] * 2.0, r[1] * 1.0]], rtol=1e-5)


def test_ppo_accepts_per_sequence_advantages():
  logp, old_logp, _, mask = _ppo_inputs()
  adv_seq = np.array([1.0, -0.5, 2.0, -1.0])
  a = policy.ppo_clip_loss(logp, old_logp, adv_seq, mask)
  b = policy.ppo_clip_loss(logp, old_logp, np.repeat(adv_seq[:, None], 7, 1), mask)
  np.testing.assert_array_equal(a.per_token, b.per_token)
  with pytest.raises(ValueError, match="advantages"):
    policy.ppo_clip_loss(logp, old_logp, adv_seq[:3], mask)


# --------------------------------------------------------------------------
# Value loss.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_matches_formula_and_gradient(clip_eps):
  rng = np.random.default_rng(2)
  b, t = 3, 5
  old = rng.normal(size=(b, t))
  values = old + rng.uniform(-0.5, 0.5, (b, t))
  returns = rng.normal(size=(b, t))
  mask = _mask([5, 2, 4], t)
  out = policy.value_loss(values, old, returns, mask, clip_eps=clip_eps)
  un = (values - returns) ** 2
  if clip_eps is None:
    ref = 0.5 * un
  else:
    cl = (old + np.clip(values - old, -clip_eps, clip_eps) - returns) ** 2
    ref = 0.5 * np.maximum(un, cl)
    assert ((cl > un) & (mask > 0)).any()
    np.testing.assert_allclose(out.clip_fraction,
                               (((cl > un) * mask).sum(1)) / mask.sum(1), rtol=1e-6)
  ref = ref * mask
  np.testing.assert_allclose(out.per_token, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.per_sequence, ref.sum(1) / mask.sum(1), rtol=1e-5)
  numerics.check_grad(jax.jit(
      lambda v: policy.value_loss(v, old, returns, mask, clip_eps=clip_eps).per_sequence),
      [values], 0)


# --------------------------------------------------------------------------
# GAE.
# --------------------------------------------------------------------------


def _gae_reference(rewards, values, mask, gamma, lam, last_value):
  """Python loop over the masked steps of each row (masked positions skipped)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    steps = [j for j in range(t) if mask[i, j]]
    next_v = 0.0 if last_value is None else float(last_value[i])
    running = 0.0
    for j in reversed(steps):
      delta = rewards[i, j] + gamma * next_v - values[i, j]
      running = delta + gamma * lam * running
      adv[i, j] = running
      next_v = values[i, j]
  return adv, (adv + values) * mask


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_python_loop(layout, bootstrap):
  rng = np.random.default_rng(3)
  b, t, gamma, lam = 4, 9, 0.97, 0.9
  rewards = rng.normal(size=(b, t))
  values = rng.normal(size=(b, t))
  if layout == "holes":
    mask = (rng.uniform(size=(b, t)) < 0.6).astype(np.float32)
    mask[:, 0] = 1.0
  else:
    mask = _mask([9, 6, 1, 4], t, left=layout == "left")
  last_value = rng.normal(size=(b,)) if bootstrap else None
  adv, ret = jax.jit(functools.partial(policy.gae, gamma=gamma, lam=lam))(
      rewards, values, mask, last_value=last_value)
  ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam, last_value)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_lambda_one_gives_discounted_returns_and_ignores_padding():
  rewards = np.array([[1.0, 0.0, 2.0, np.nan, np.nan]])
  values = np.array([[0.5, -1.0, 3.0, np.inf, np.nan]])
  mask = np.array([[1.0, 1.0, 1.0, 0.0, 0.0]])
  adv, ret = policy.gae(rewards, values, mask, gamma=0.5, lam=1.0)
  # λ=1: returns are discounted reward-to-go; advantages = returns − V.
  np.testing.assert_allclose(ret, [[1.5, 1.0, 2.0, 0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(adv, [[1.0, 2.0, -1.0, 0.0, 0.0]], rtol=1e-6)
  # λ=0: one-step TD errors.
  adv0, _ = policy.gae(rewards, values, mask, gamma=0.5, lam=0.0)
  np.testing.assert_allclose(adv0, [[1.0 + 0.5 * -1.0 - 0.5, 1.5 - (-1.0), -1.0, 0.0, 0.0]])


# --------------------------------------------------------------------------
# REINFORCE / RLOO / GRPO.
# --------------------------------------------------------------------------


def test_rloo_matches_explicit_leave_one_out():
  rng = np.random.default_rng(4)
  rewards = rng.normal(size=(5, 4))
  out = jax.jit(policy.rloo_advantages)(rewards)
  ref = np.array([[r[i] - np.mean(np.delete(r, i)) for i in range(len(r))] for r in rewards])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out).sum(1), 0.0, atol=1e-5)


def test_rloo_with_group_mask():
  rng = np.random.default_rng(5)
  rewards = rng.normal(size=(3, 4))
  mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0]], np.float32)
  out = np.asarray(policy.rloo_advantages(rewards, mask))
  for p in range(3):
    present = np.flatnonzero(mask[p])
    for i in range(4):
      if i not in present or len(present) < 2:
        assert out[p, i] == 0.0
      else:
        others = [rewards[p, j] for j in present if j != i]
        np.testing.assert_allclose(out[p, i], rewards[p, i] - np.mean(others), rtol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    policy.rloo_advantages(np.ones((3, 1)))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_normalized_advantages(scale_by_std):
  rng = np.random.default_rng(6)
  rewards = rng.normal(size=(4, 6))
  out = policy.group_normalized_advantages(rewards, scale_by_std=scale_by_std)
  ref = rewards - rewards.mean(1, keepdims=True)
  if scale_by_std:
    ref = ref / (rewards.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_normalized_advantages_read_only_the_present_samples(scale_by_std):
  rng = np.random.default_rng(16)
  rewards = rng.normal(size=(4, 6))
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1],
                   [1, 1, 0, 0, 0, 0]], np.float64)
  garbage = np.where(mask > 0, rewards, 1e3)  # what absent samples hold must not matter
  out = np.asarray(policy.group_normalized_advantages(garbage, mask, scale_by_std=scale_by_std))
  for row in range(4):
    present = rewards[row][mask[row] > 0]
    ref = present - present.mean()
    if scale_by_std:
      ref = ref / (present.std() + 1e-6)  # population std over the present samples only
    np.testing.assert_allclose(out[row][mask[row] > 0], ref, rtol=1e-5, atol=1e-6)
    assert (out[row][mask[row] == 0] == 0).all()


def test_policy_gradient_loss_value_and_gradient():
  rng = np.random.default_rng(7)
  b, t = 3, 6
  logp = rng.normal(-1.5, 0.5, (b, t))
  mask = _mask([6, 3, 4], t)
  rewards = rng.normal(size=(b,))
  adv = policy.reinforce_advantages(rewards, rewards.mean())
  np.testing.assert_allclose(adv, rewards - rewards.mean(), rtol=1e-6)
  loss = policy.policy_gradient_loss(logp, adv, mask)
  np.testing.assert_allclose(loss, -np.asarray(adv) * (logp * mask).sum(1), rtol=1e-5)
  numerics.check_grad(jax.jit(lambda lp: policy.policy_gradient_loss(lp, adv, mask)),
                      [logp], 0)
  grad = jax.grad(lambda lp: policy.policy_gradient_loss(lp, adv, mask).sum())(logp)
  np.testing.assert_allclose(grad, -np.asarray(adv)[:, None] * mask, rtol=1e-6)
  # Advantages are constants: no gradient flows into the rewards.
  g_r = jax.grad(lambda r: policy.policy_gradient_loss(
      logp, policy.reinforce_advantages(r, r.mean()), mask).sum())(jnp.asarray(rewards))
  np.testing.assert_array_equal(g_r, 0.0)


# --------------------------------------------------------------------------
# KL estimators.
# --------------------------------------------------------------------------


def _categorical(seed, v, spread):
  logits = np.random.default_rng(seed).normal(0.0, spread, v)
  return logits, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


@pytest.mark.parametrize("spread", [0.3, 2.0])
def test_kl_estimators_monte_carlo(spread):
  v, n = 8, 200_000
  logits_p, p = _categorical(1, v, spread)
  logits_q, q = _categorical(2, v, spread)
  kl = float(policy.exact_kl(logits_p[None], logits_q[None], np.ones(1))[0])
  kl_ref = float(np.sum(p * np.log(p / q)))
  np.testing.assert_allclose(kl, kl_ref, rtol=1e-5)
  k2_expectation = float(np.sum(p * 0.5 * np.log(q / p) ** 2))

  samples = np.random.default_rng(3).choice(v, size=n, p=p).reshape(400, 500)
  logp = np.log(p)[samples].astype(np.float32)
  ref_logp = np.log(q)[samples].astype(np.float32)
  mask = np.ones_like(logp)
  est = {k: np.asarray(policy.kl_estimate(logp, ref_logp, mask, k), np.float64).ravel()
         for k in ("k1", "k2", "k3")}
  for kind, target in (("k1", kl), ("k3", kl), ("k2", k2_expectation)):
    se = est[kind].std(ddof=1) / np.sqrt(n)
    assert abs(est[kind].mean() - target) < 3 * se, (kind, est[kind].mean(), target, se)
  assert est["k3"].min() >= 0.0 and est["k2"].min() >= 0.0
  assert est["k3"].std() < est["k1"].std()  # the point of k3: lower variance
  if spread > 1.0:  # far apart: k2 is biased, its mean is NOT the KL
    se2 = est["k2"].std(ddof=1) / np.sqrt(n)
    assert abs(k2_expectation - kl) > 0.1 * kl
    assert abs(est["k2"].mean() - kl) > 10 * se2
  np.testing.assert_allclose(
      policy.sequence_kl(logp, ref_logp, mask, "k1"), -(ref_logp - logp).sum(1), rtol=1e-4)


def test_kl_estimate_rejects_unknown_kind():
  with pytest.raises(ValueError, match="k4"):
    policy.kl_estimate(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), "k4")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_gradients(kind):
  rng = np.random.default_rng(8)
  logp = rng.normal(-1.0, 0.3, (2, 4))
  ref_logp = rng.normal(-1.0, 0.3, (2, 4))
  mask = _mask([4, 2], 4)
  fn = jax.jit(lambda lp, rl: policy.sequence_kl(lp, rl, mask, kind))
  numerics.check_grad(fn, [logp, ref_logp], 0)
  numerics.check_grad(fn, [logp, ref_logp], 1)


def test_exact_kl_matches_numpy_and_gradient():
  rng = np.random.default_rng(9)
  lp = rng.normal(size=(2, 3, 5))
  lq = rng.normal(size=(2, 3, 5))
  mask = _mask([3, 1], 3)
  p = np.exp(lp) / np.exp(lp).sum(-1, keepdims=True)
  q = np.exp(lq) / np.exp(lq).sum(-1, keepdims=True)
  ref = (p * np.log(p / q)).sum(-1) * mask
  np.testing.assert_allclose(policy.exact_kl(lp, lq, mask), ref, rtol=1e-5, atol=1e-7)
  numerics.check_grad(jax.jit(lambda a: policy.exact_kl(a, lq, mask)), [lp], 0)


def test_entropy_from_logits():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 3, 5)) * 2
  mask = _mask([3, 1], 3)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ref = -(p * np.log(p)).sum(-1) * mask
  out = policy.entropy_from_logits(logits, mask)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
  uniform = policy.entropy_from_logits(np.zeros((1, 1, 5)), np.ones((1, 1)))
  np.testing.assert_allclose(uniform, [[np.log(5.0)]], rtol=1e-6)


def test_entropy_and_exact_kl_of_filtered_logits_sum_over_the_kept_tokens():
  """A −inf logit (top-k/top-p filtered) gave NaN: 0·log 0 evaluated as 0·(−inf)."""
  rng = np.random.default_rng(12)
  logits = rng.normal(size=(2, 6))
  filtered = np.where(np.arange(6) < 3, logits, -np.inf)
  kept = np.exp(logits[:, :3]) / np.exp(logits[:, :3]).sum(-1, keepdims=True)
  mask = np.ones(2)
  np.testing.assert_allclose(policy.entropy_from_logits(filtered, mask),
                             -(kept * np.log(kept)).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(policy.exact_kl(filtered, filtered, mask), [0.0, 0.0], atol=1e-7)
  full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(policy.exact_kl(filtered, logits, mask),
                             (kept * np.log(kept / full[:, :3])).sum(-1), rtol=1e-6)
  grad = jax.grad(lambda z: policy.entropy_from_logits(z, mask).sum())(jnp.asarray(filtered))
  assert np.isfinite(np.asarray(grad)).all()


def test_kl_penalized_rewards():
  rng = np.random.default_rng(11)
  b, t = 2, 5
  logp = rng.normal(-1, 0.3, (b, t))
  ref_logp = rng.normal(-1, 0.3, (b, t))
  mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32)  # prompt, response, pad
  scores = np.array([2.0, -1.0])
  rewards, kl = policy.kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef=0.1)
  ref = -0.1 * (logp - ref_logp) * mask
  ref[0, 3] += 2.0
  ref[1, 4] += -1.0
  np.testing.assert_allclose(rewards, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(kl, (logp - ref_logp) * mask, rtol=1e-5, atol=1e-7)
  with pytest.raises(AssertionError, match="shape"):  # one score broadcast to every row
    policy.kl_penalized_rewards(scores[:1], logp, ref_logp, mask, kl_coef=0.1)


# --------------------------------------------------------------------------
# Whitening, aggregation, masks, dtypes, transforms.
# --------------------------------------------------------------------------


def test_whiten_uses_only_masked_entries():
  rng = np.random.default_rng(12)
  x = rng.normal(3.0, 2.0, (3, 6))
  mask = _mask([6, 2, 4], 6)
  out = np.asarray(policy.whiten(x, mask))
  sel = x[mask > 0]
  np.testing.assert_allclose(out[mask > 0], (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8),
                             rtol=1e-5, atol=1e-5)
  assert np.all(out[mask == 0] == 0.0)
  garbage = np.where(mask > 0, x, np.nan)
  np.testing.assert_array_equal(policy.whiten(garbage, mask), out)
  kept = np.asarray(policy.whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0], out[mask > 0] + sel.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum_norm"])
def test_aggregate_loss(mode):
  rng = np.random.default_rng(13)
  loss = rng.normal(size=(4, 5))
  mask = _mask([5, 1, 3, 0], 5)  # the last row is batch filler without tokens
  ref = {"token_mean": (loss * mask).sum() / mask.sum(),
         "sequence_mean": ((loss * mask).sum(1)[:3] / mask.sum(1)[:3]).mean(),
         "sequence_sum_norm": (loss * mask).sum() / 20.0}[mode]
  np.testing.assert_allclose(policy.aggregate_loss(loss, mask, mode), ref, rtol=1e-5)


def test_aggregate_loss_rejects_unknown_mode():
  with pytest.raises(ValueError, match="bogus"):
    policy.aggregate_loss(np.zeros((2, 2)), np.ones((2, 2)), "bogus")


@jax.jit
def _all_losses(logp, old, adv, mask):
  """Every per-sequence output, as one dict, for the mask/dtype/vmap tests."""
  return {
      "ppo": policy.ppo_clip_loss(logp, old, adv, mask).per_sequence,
      "ppo_kl": policy.ppo_clip_loss(logp, old, adv, mask).approx_kl,
      "value": policy.value_loss(logp, old, adv, mask).per_sequence,
      "pg": policy.policy_gradient_loss(logp, adv, mask),
      "kl": policy.sequence_kl(logp, old, mask, "k3"),
      "gae": policy.gae(adv, old, mask, gamma=0.9, lam=0.8)[0].sum(-1),
      "whiten": policy.whiten(adv, mask).sum(-1),
  }


def test_padding_never_leaks_into_losses_or_gradients():
  logp, old, adv, mask = (a.astype(np.float32) for a in _ppo_inputs())
  clean = _all_losses(logp, old, adv, mask)
  dirty_args = [np.where(mask > 0, a, v) for a, v in
                ((logp, np.nan), (old, -np.inf), (adv, 1e30))]
  dirty = _all_losses(*dirty_args, mask)
  for name in clean:
    np.testing.assert_array_equal(clean[name], dirty[name], err_msg=name)
  grad = jax.grad(lambda lp: sum(v.sum() for v in _all_losses(lp, *dirty_args[1:], mask)
                                 .values()))(jnp.asarray(dirty_args[0]))
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


def test_bfloat16_inputs_give_float32_outputs():
  args = [jnp.asarray(a, jnp.bfloat16) for a in _ppo_inputs()]
  for name, value in _all_losses(*args).items():
    assert value.dtype == jnp.float32, name
  assert policy.rloo_advantages(args[2]).dtype == jnp.float32
  with jax.enable_x64(True):  # A Python baseline must not widen float32 rewards.
    assert policy.reinforce_advantages(args[2].astype(jnp.float32), 0.5).dtype == jnp.float32
  assert policy.exact_kl(args[0][..., None].repeat(3, -1), args[1][..., None].repeat(3, -1),
                         args[3]).dtype == jnp.float32
  f32 = _all_losses(*[a.astype(jnp.float32) for a in args])
  for name, value in _all_losses(*args).items():  # same numbers: computed in float32
    np.testing.assert_allclose(value, f32[name], rtol=1e-6, err_msg=name)


def test_vmap_over_an_extra_axis_matches_a_loop():
  stacks = [np.stack([a, a[::-1]]) for a in _ppo_inputs()]
  batched = jax.vmap(_all_losses)(*stacks)
  for i in range(2):
    single = _all_losses(*[s[i] for s in stacks])
    for name in single:
      np.testing.assert_allclose(batched[name][i], single[name], rtol=1e-5, atol=1e-6)


def test_shape_mismatch_raises():
  with pytest.raises(AssertionError):
    policy.ppo_clip_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), np.ones((2, 3)))
  with pytest.raises(AssertionError):
    policy.gae(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((2, 3)), gamma=1.0, lam=1.0,
               last_value=np.zeros(3))
