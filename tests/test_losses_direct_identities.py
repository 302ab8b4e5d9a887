"""Identities between the DPO-family losses (``prefjax.losses.direct``): robust and
conservative DPO under label flips, SimPO/sigmoid_norm as DPO on token averages, and
the implicit rewards. Formulas vs float64 references are in ``test_losses_direct.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.losses import direct
from prefjax.losses import registry
from prefjax.losses.direct import PairLogps
from tests.test_losses_direct import B, BETA, random_pairs, to_pairs


def swapped(x: PairLogps) -> PairLogps:
  return PairLogps(x.policy_rejected, x.policy_chosen, x.ref_rejected, x.ref_chosen,
                   x.rejected_tokens, x.chosen_tokens)


def test_robust_with_zero_noise_is_dpo():
  x = to_pairs(random_pairs(seed=8))
  np.testing.assert_allclose(direct.robust(x, beta=BETA, label_smoothing=0.0),
                             direct.dpo(x, beta=BETA), rtol=1e-6)


def test_robust_is_unbiased_under_label_flips():
  # Chowdhury et al.: E_flip[robust] over flip rate ε equals the clean DPO loss.
  x, eps = to_pairs(random_pairs(seed=9)), 0.3
  expected = ((1 - eps) * direct.robust(x, beta=BETA, label_smoothing=eps)
              + eps * direct.robust(swapped(x), beta=BETA, label_smoothing=eps))
  np.testing.assert_allclose(expected, direct.dpo(x, beta=BETA), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(n for n, s in registry.DIRECT_LOSS_SPECS.items()
                                         if s.soft_label))
def test_a_soft_label_of_a_half_is_the_same_pair_with_its_sides_swapped(name):
  """A tie names a "chosen" side only because a pair has two fields: the loss of every
  soft-label loss (the trainer gives a tie label_smoothing ½) must not depend on it."""
  x, fn = to_pairs(random_pairs(seed=21)), direct.DIRECT_LOSSES[name]
  np.testing.assert_allclose(fn(x, beta=2.0, label_smoothing=0.5),
                             fn(swapped(x), beta=2.0, label_smoothing=0.5), rtol=1e-6)


def test_smoothed_simpo_is_the_expected_loss_under_flips():
  """A flipped pair wants the other side to win by the margin γ."""
  x, eps = to_pairs(random_pairs(seed=22)), 0.2
  mixture = ((1 - eps) * direct.simpo(x, beta=2.0, gamma=1.0)
             + eps * direct.simpo(swapped(x), beta=2.0, gamma=1.0))
  np.testing.assert_allclose(direct.simpo(x, beta=2.0, gamma=1.0, label_smoothing=eps),
                             mixture, rtol=1e-5)


def test_conservative_dpo_is_the_expected_loss_under_flips():
  x, eps = to_pairs(random_pairs(seed=10)), 0.2
  mixture = (1 - eps) * direct.dpo(x, beta=BETA) + eps * direct.dpo(swapped(x), beta=BETA)
  np.testing.assert_allclose(direct.dpo(x, beta=BETA, label_smoothing=eps), mixture, rtol=1e-5)


def test_dpo_with_uninformative_labels_is_symmetric_and_centered():
  # With ε = 0.5 the labels carry no preference: L(h) = L(−h), minimum at h = 0.
  x = to_pairs(random_pairs(seed=11))
  loss = direct.dpo(x, beta=BETA, label_smoothing=0.5)
  np.testing.assert_allclose(loss, direct.dpo(swapped(x), beta=BETA, label_smoothing=0.5),
                             rtol=1e-6)
  x_tied = x._replace(policy_chosen=x.ref_chosen + 1.0, policy_rejected=x.ref_rejected + 1.0)
  g = jax.grad(lambda x: direct.dpo(x, beta=BETA, label_smoothing=0.5).sum())(x_tied)
  np.testing.assert_allclose(g.policy_chosen, 0.0, atol=1e-7)
  assert np.all(loss >= direct.dpo(x_tied, beta=BETA, label_smoothing=0.5) - 1e-6)


def test_sigmoid_norm_is_dpo_on_token_averaged_logprobs():
  x = to_pairs(random_pairs(seed=12))
  ones = jnp.ones_like(x.chosen_tokens)
  averaged = PairLogps(x.policy_chosen / x.chosen_tokens, x.policy_rejected / x.rejected_tokens,
                       x.ref_chosen / x.chosen_tokens, x.ref_rejected / x.rejected_tokens,
                       ones, ones)
  np.testing.assert_allclose(direct.sigmoid_norm(x, beta=BETA), direct.dpo(averaged, beta=BETA),
                             rtol=1e-6)


def test_simpo_default_margin_is_ratio_times_beta_and_ignores_reference():
  x = to_pairs(random_pairs(seed=13))
  explicit = direct.simpo(x, beta=2.0, gamma=1.0)
  np.testing.assert_allclose(direct.simpo(x, beta=2.0), explicit, rtol=1e-6)
  no_ref = x._replace(ref_chosen=jnp.zeros(B), ref_rejected=jnp.zeros(B))
  np.testing.assert_allclose(direct.orpo(no_ref, beta=0.1), direct.orpo(x, beta=0.1), rtol=1e-6)
  np.testing.assert_allclose(direct.simpo(no_ref, beta=2.0), explicit, rtol=1e-6)


def test_bco_delta_carries_no_gradient():
  x = to_pairs(random_pairs(seed=14))
  g = jax.grad(lambda delta: direct.bco_pair(x, beta=BETA, delta=delta).sum())(0.3)
  assert g == 0.0


def test_orpo_is_finite_when_a_response_has_probability_one():
  zeros, ones = jnp.zeros(B), jnp.ones(B)
  x = PairLogps(zeros, jnp.array([-3.0, 0.0, 0.0, 0.0, 0.0]), zeros, zeros, ones, ones)
  loss = direct.orpo(x, beta=0.1)
  grads = jax.grad(lambda x: direct.orpo(x, beta=0.1).sum())(x)
  assert np.all(np.isfinite(loss)) and all(np.all(np.isfinite(g)) for g in grads)
  assert loss[0] < loss[1]  # p̄_c = 1 beats p̄_r = e^-3; a tie of two p̄ = 1 gives log 2 · λ.
  np.testing.assert_allclose(loss[1], 0.1 * np.log(2.0), rtol=1e-5)


def test_implicit_rewards_values():
  d = random_pairs(seed=15)
  chosen, rejected = direct.implicit_rewards(to_pairs(d), 0.25)
  np.testing.assert_allclose(chosen, 0.25 * (d["pc"] - d["rc"]), rtol=1e-5)
  np.testing.assert_allclose(rejected, 0.25 * (d["pr"] - d["rr"]), rtol=1e-5)


