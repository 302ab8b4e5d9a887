"""Tests for prefjax.losses.preference (reward-model losses on scalar rewards).

Each loss is checked against an independent float64 NumPy re-derivation,
finite-difference gradients, jit/vmap/grad, dtypes, extreme reward gaps, and
properties that catch sign or masking errors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.losses import preference
from tests import numerics


numerics.user_modules()  # losses of your own, registered before the cases list them


def loss_fn(name: str):
  return numerics.per_example_losses(preference.PREFERENCE_LOSSES, "preference", name)

B, K = 5, 3


# ----------------------------------------------------------------- float64 NumPy references.

def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def ref_bradley_terry(rc, rr, margin=0.0, label_smoothing=0.0):
  margin, eps = np.asarray(margin), np.asarray(label_smoothing)
  margin = margin.reshape(margin.shape + (1,) * (rc.ndim - margin.ndim))
  eps = eps.reshape(eps.shape + (1,) * (rc.ndim - eps.ndim))
  return (-(1 - eps) * np.log(np_sigmoid(rc - rr - margin))
          - eps * np.log(np_sigmoid(rr - rc - margin)))  # a flipped label: rr wins by m


def davidson_probabilities(ra, rb, nu):
  """(P(a wins), P(tie), P(b wins)) straight from Davidson's definition."""
  pi_a, pi_b = np.exp(ra), np.exp(rb)
  tie = nu * np.sqrt(pi_a * pi_b)
  z = pi_a + pi_b + tie
  return pi_a / z, tie / z, pi_b / z


def ref_bradley_terry_ties(ra, rb, outcome, nu):
  p_a, p_tie, p_b = davidson_probabilities(ra, rb, nu)
  outcome = np.asarray(outcome).reshape(np.shape(outcome) + (1,) * (ra.ndim - np.ndim(outcome)))
  chosen = np.where(outcome == 1.0, p_a, np.where(outcome == 0.0, p_b, p_tie))
  assert np.all(np.isin(outcome, (0.0, 0.5, 1.0)))
  return -np.log(chosen)


def ref_plackett_luce(rewards, mask):
  """Sequential choice: pick the best of the remaining real items, then the next..."""
  out = []
  for row, row_mask in zip(rewards, mask):
    items = [r for r, m in zip(row, row_mask) if m]
    nll = 0.0
    for k in range(len(items)):
      nll -= np.log(np.exp(items[k]) / np.sum(np.exp(items[k:])))
    out.append(nll)
  return np.array(out)


def ref_center_penalty(rc, rr):
  return (rc + rr) ** 2


def ref_preference_probability(ra, rb):
  return np.exp(ra) / (np.exp(ra) + np.exp(rb))


# -------------------------------------------------------------------------------- cases.

@dataclasses.dataclass(frozen=True)
class Case:
  """A loss applied to float arrays ``args`` (all differentiable) with fixed extras.

  ``fn`` is jitted once here: one compile per input shape/dtype is much cheaper
  than eager op-by-op compiles of every primitive (test-time budget).
  """
  fn: Callable[..., jax.Array]
  ref: Callable[..., np.ndarray]
  args: tuple[np.ndarray, ...]
  out_shape: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "fn", jax.jit(self.fn))


def _rewards(seed, shape):
  return np.random.default_rng(seed).normal(0.0, 2.0, shape)


# float32 constants (exact values): a NumPy float64 closed over by a function that
# is jitted both with and without x64 trips a JAX dtype-canonicalisation warning.
MARGIN = np.linspace(0.0, 1.0, B, dtype=np.float32)
OUTCOME = np.array([1.0, 0.0, 0.5, 1.0, 0.5], np.float32)
PL_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 1]], bool)

CASES = {
    "bt": Case(preference.bradley_terry, ref_bradley_terry,
               (_rewards(0, B), _rewards(1, B)), (B,)),
    "bt_margin_smoothing": Case(
        lambda rc, rr: preference.bradley_terry(rc, rr, margin=MARGIN, label_smoothing=0.1),
        lambda rc, rr: ref_bradley_terry(rc, rr, MARGIN, 0.1),
        (_rewards(2, B), _rewards(3, B)), (B,)),
    "bt_ensemble": Case(
        lambda rc, rr: preference.bradley_terry(rc, rr, margin=MARGIN, label_smoothing=MARGIN / 4),
        lambda rc, rr: ref_bradley_terry(rc, rr, MARGIN, MARGIN / 4),
        (_rewards(4, (B, K)), _rewards(5, (B, K))), (B, K)),
    "ties": Case(
        lambda ra, rb: preference.bradley_terry_ties(ra, rb, OUTCOME, nu=0.7),
        lambda ra, rb: ref_bradley_terry_ties(ra, rb, OUTCOME, 0.7),
        (_rewards(6, B), _rewards(7, B)), (B,)),
    "ties_ensemble": Case(
        lambda ra, rb: preference.bradley_terry_ties(ra, rb, OUTCOME, nu=1.3),
        lambda ra, rb: ref_bradley_terry_ties(ra, rb, OUTCOME, 1.3),
        (_rewards(8, (B, K)), _rewards(9, (B, K))), (B, K)),
    "plackett_luce": Case(
        lambda r: preference.plackett_luce(r, PL_MASK),
        lambda r: ref_plackett_luce(r, PL_MASK),
        (_rewards(10, (B, K)),), (B,)),
    "center_penalty": Case(preference.center_penalty, ref_center_penalty,
                           (_rewards(11, (B, K)), _rewards(12, (B, K))), (B, K)),
    "preference_probability": Case(preference.preference_probability, ref_preference_probability,
                                   (_rewards(13, B), _rewards(14, B)), (B,)),
}


# ----------------------------------------------- PREFERENCE_LOSSES: what a config selects.
# Every registered loss gets the generic checks below at its defaults and with the
# hyperparameters in REGISTRY_HPARAMS, on [B] and [B, K] rewards with decisive and tied
# outcomes. A new entry needs a float64 reference ``ref_pair_<name>`` here.

def _soft_label(outcome, label_smoothing, ndim):
  o = np.asarray(outcome, np.float64)
  o = o.reshape(o.shape + (1,) * (ndim - o.ndim))
  return (1 - label_smoothing) * o + label_smoothing * (1 - o)


def ref_pair_bt(rc, rr, outcome=1.0, margin=0.0, label_smoothing=0.0):
  p_label = _soft_label(outcome, label_smoothing, rc.ndim)
  m = np.asarray(margin).reshape(-1, *([1] * (rc.ndim - 1)))
  return (-p_label * np.log(np_sigmoid(rc - rr - m))
          - (1 - p_label) * np.log(np_sigmoid(rr - rc - m)))


def ref_pair_ties(rc, rr, outcome=1.0, nu=1.0):
  return ref_bradley_terry_ties(rc, rr, outcome, nu)


def ref_pair_plackett_luce(rc, rr, outcome=1.0):
  o = _soft_label(outcome, 0.0, rc.ndim)  # P(the chosen side ranks first)
  nll = lambda best, other: -np.log(np.exp(best) / (np.exp(best) + np.exp(other)))
  return o * nll(rc, rr) + (1 - o) * nll(rr, rc)


def pair_reference(name):
  """The float64 reference ``ref_pair_<name>`` of a registered loss (fails when missing)."""
  ref = globals().get(f"ref_pair_{name}") or numerics.user_reference(f"ref_pair_{name}")
  assert ref is not None, (
      f"preference loss {name!r} is registered but has no float64 reference: add "
      f"ref_pair_{name}(r_chosen, r_rejected, outcome, **hparams) to "
      f"tests/test_losses_preference.py, or to a module of yours named in "
      f"${numerics.TEST_IMPORTS}")
  return ref


REGISTRY_HPARAMS = {"bt": dict(margin=MARGIN, label_smoothing=0.1), "ties": dict(nu=0.7)}


def _registry_case(name, hparams, shape, seed):
  fn = loss_fn(name)
  return Case(lambda rc, rr: fn(rc, rr, outcome=OUTCOME, **hparams),
              lambda rc, rr: pair_reference(name)(rc, rr, OUTCOME, **hparams),
              (_rewards(seed, shape), _rewards(seed + 1, shape)), shape)


for _i, _name in enumerate(sorted(preference.PREFERENCE_LOSSES)):
  CASES[f"registry/{_name}"] = _registry_case(_name, {}, (B,), 20 + 4 * _i)
  CASES[f"registry/{_name}_ensemble"] = _registry_case(
      _name, REGISTRY_HPARAMS.get(_name, {}), (B, K), 22 + 4 * _i)
NAMES = list(CASES)


@pytest.mark.parametrize("name", sorted(preference.PREFERENCE_LOSSES))
def test_every_registered_loss_has_a_float64_reference(name):
  pair_reference(name)


@pytest.mark.parametrize("name", sorted(preference.PREFERENCE_LOSSES))
def test_every_registered_loss_reads_a_pair_the_same_with_its_sides_swapped(name):
  """(c, r, o) and (r, c, 1 − o) are one judgement: a tie or soft label favours no side."""
  fn, hparams = loss_fn(name), REGISTRY_HPARAMS.get(name, {})
  rc, rr = _rewards(50, (B, K)), _rewards(51, (B, K))
  outcome = np.array([1.0, 0.0, 0.5, 0.8, 0.3], np.float32)
  if name == "ties":
    outcome = OUTCOME
  np.testing.assert_allclose(fn(rc, rr, outcome=outcome, **hparams),
                             fn(rr, rc, outcome=1.0 - outcome, **hparams), rtol=1e-5, atol=1e-6)


def test_registry_runs_every_entry_with_rewards_only_and_rejects_duplicates():
  rc, rr = _rewards(40, B), _rewards(41, B)
  for name in preference.PREFERENCE_LOSSES:  # outcome = 1: the chosen side won.
    np.testing.assert_allclose(loss_fn(name)(rc, rr), pair_reference(name)(rc, rr), rtol=1e-5)
  with pytest.raises(ValueError, match="already registered"):
    preference.register_preference_loss("bt")(preference.bt)
  with pytest.raises(KeyError, match="unknown preference loss 'btt'.*'bt'"):
    preference.get_preference_loss("btt")
  assert preference.preference_loss_hyperparameters("ties") == {"nu": 1.0}


# ------------------------------------------------------------------------ generic checks.

@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(name):
  case = CASES[name]
  expected = case.ref(*case.args)
  with jax.enable_x64(True):
    got = case.fn(*(jnp.asarray(a, jnp.float64) for a in case.args))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-12)
  got32 = case.fn(*(jnp.asarray(a, jnp.float32) for a in case.args))
  np.testing.assert_allclose(np.asarray(got32), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
  case = CASES[name]
  for argnum in range(len(case.args)):
    numerics.check_grad(case.fn, list(case.args), argnum=argnum)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_output_is_float32_per_example(name, dtype, x64):
  # Under x64 too: default hyperparameters (outcome=1.0, margin=0.0) are Python
  # numbers and must not widen float32 inputs to float64.
  case = CASES[name]
  with jax.enable_x64(x64):
    out = case.fn(*(jnp.asarray(a, dtype) for a in case.args))
  assert out.shape == case.out_shape and out.dtype == jnp.float32
  rounded = [np.asarray(jnp.asarray(a, dtype)).astype(np.float64) for a in case.args]
  np.testing.assert_allclose(out, case.ref(*rounded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_grad(name):
  case = CASES[name]
  args = [jnp.asarray(a, jnp.float32) for a in case.args]
  # jit(vmap) over an extra leading axis (e.g. microbatches) of two different batches.
  flipped = [a[::-1] for a in args]
  stacked = [jnp.stack([a, f]) for a, f in zip(args, flipped)]
  np.testing.assert_allclose(jax.jit(jax.vmap(case.fn))(*stacked),
                             np.stack([case.fn(*args), case.fn(*flipped)]), rtol=1e-6, atol=1e-7)
  grad_fn = jax.jit(jax.grad(lambda *a: case.fn(*a).sum(), argnums=tuple(range(len(args)))))
  for argnum, grad in enumerate(grad_fn(*args)):
    analytic = numerics.jax_grad_f64(case.fn, case.args, argnum)
    np.testing.assert_allclose(grad, analytic, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gap", [1e4, -1e4])
@pytest.mark.parametrize("name", [n for n in NAMES if n != "center_penalty"])
def test_finite_at_extreme_reward_gaps(name, gap):
  case = CASES[name]
  args = [jnp.zeros(a.shape, jnp.float32) for a in case.args]
  if len(args) == 2:
    args[0] = args[0] + gap / 2
    args[1] = args[1] - gap / 2
  else:  # Plackett–Luce: alternate huge gaps along the list.
    args[0] = args[0] + gap * jnp.array([1.0, -1.0, 0.5])
  loss = case.fn(*args)
  grads = jax.grad(lambda *a: case.fn(*a).sum(), argnums=tuple(range(len(args))))(*args)
  assert np.all(np.isfinite(loss)), loss
  assert all(np.all(np.isfinite(g)) for g in grads), grads


# ----------------------------------------------------------------------- Bradley–Terry.

def test_bradley_terry_decreases_as_chosen_reward_rises():
  r_chosen = jnp.linspace(-10.0, 10.0, 41)
  loss = np.asarray(preference.bradley_terry(r_chosen, jnp.zeros(41), margin=0.5))
  assert np.all(np.diff(loss) < 0)
  np.testing.assert_allclose(loss[20], np.log1p(np.exp(0.5)), rtol=1e-6)  # Δ = 0, margin 0.5.


def test_bradley_terry_smoothing_is_expected_loss_under_flips():
  rc, rr = jnp.asarray(_rewards(20, B), jnp.float32), jnp.asarray(_rewards(21, B), jnp.float32)
  mixture = (0.7 * preference.bradley_terry(rc, rr) + 0.3 * preference.bradley_terry(rr, rc))
  np.testing.assert_allclose(preference.bradley_terry(rc, rr, label_smoothing=0.3), mixture,
                             rtol=1e-5)


@pytest.mark.parametrize("outcome", [0.0, 0.3, 0.5])
def test_bt_with_a_margin_does_not_depend_on_which_side_is_called_chosen(outcome):
  """Outcome o for (c, r) is outcome 1 − o for (r, c): the margin goes with the winner."""
  rc, rr = jnp.asarray(_rewards(24, B), jnp.float32), jnp.asarray(_rewards(25, B), jnp.float32)
  kwargs = dict(margin=MARGIN, label_smoothing=0.1)
  np.testing.assert_allclose(preference.bt(rc, rr, outcome=outcome, **kwargs),
                             preference.bt(rr, rc, outcome=1.0 - outcome, **kwargs), rtol=1e-5)


def test_bradley_terry_margin_is_a_shift():
  rc, rr = jnp.asarray(_rewards(22, B), jnp.float32), jnp.asarray(_rewards(23, B), jnp.float32)
  m = jnp.asarray(MARGIN, jnp.float32)
  np.testing.assert_allclose(preference.bradley_terry(rc, rr, margin=m),
                             preference.bradley_terry(rc - m, rr), rtol=1e-5)


# ----------------------------------------------------------------------------- Davidson.

@pytest.mark.parametrize("outcome", [1.0, 0.0])
def test_ties_tend_to_bradley_terry_as_nu_vanishes(outcome):
  ra, rb = jnp.asarray(_rewards(24, B), jnp.float32), jnp.asarray(_rewards(25, B), jnp.float32)
  bt = preference.bradley_terry(ra, rb) if outcome else preference.bradley_terry(rb, ra)
  gaps = [np.max(np.abs(preference.bradley_terry_ties(ra, rb, outcome, nu=nu) - bt))
          for nu in (1e-1, 1e-3, 1e-5)]
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5, gaps
  with pytest.raises(ValueError, match=r"nu=0.0 is outside \(0.0, inf\]"):
    preference.bradley_terry_ties(ra, rb, outcome, nu=0.0)


def test_ties_probabilities_sum_to_one_and_tie_likelihood_peaks_at_equal_rewards():
  ra, rb = jnp.asarray(_rewards(26, B), jnp.float32), jnp.asarray(_rewards(27, B), jnp.float32)
  total = sum(jnp.exp(-preference.bradley_terry_ties(ra, rb, o, nu=0.8)) for o in (0.0, 0.5, 1.0))
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  gaps = jnp.linspace(-4.0, 4.0, 41)
  tie_nll = np.asarray(preference.bradley_terry_ties(gaps, -gaps, 0.5, nu=0.8))
  assert np.argmin(tie_nll) == 20 and np.allclose(tie_nll, tie_nll[::-1], rtol=1e-5)


def test_ties_soft_outcome_interpolates_between_labels():
  ra, rb = jnp.asarray(_rewards(28, B), jnp.float32), jnp.asarray(_rewards(29, B), jnp.float32)
  loss = lambda o: preference.bradley_terry_ties(ra, rb, o, nu=0.5)
  np.testing.assert_allclose(loss(0.75), 0.5 * loss(1.0) + 0.5 * loss(0.5), rtol=1e-5)
  np.testing.assert_allclose(loss(0.1), 0.8 * loss(0.0) + 0.2 * loss(0.5), rtol=1e-5)


def test_ties_nu_is_learnable():
  ra, rb = _rewards(30, B), _rewards(31, B)  # NumPy float64: promoted inside the x64 check.
  f = lambda log_nu: preference.bradley_terry_ties(ra, rb, OUTCOME, nu=jnp.exp(log_nu))
  numerics.check_grad(f, [np.array(-0.3)], argnum=0)


# ------------------------------------------------------------------------- Plackett–Luce.

def test_plackett_luce_with_two_items_is_bradley_terry():
  r = jnp.asarray(_rewards(32, (B, 2)), jnp.float32)
  np.testing.assert_allclose(preference.plackett_luce(r),
                             preference.bradley_terry(r[:, 0], r[:, 1]), rtol=1e-6)


def test_plackett_luce_padding_does_not_change_the_loss():
  r = jnp.asarray(_rewards(33, (B, K)), jnp.float32)
  mask = jnp.asarray(PL_MASK)
  garbage = jnp.where(mask, r, jnp.array([[1e4, -1e4, 3.0]]))
  np.testing.assert_allclose(preference.plackett_luce(garbage, mask),
                             preference.plackett_luce(r, mask), rtol=1e-6)
  # Row 1 keeps items 0 and 1: the same as the unpadded 2-list.
  np.testing.assert_allclose(preference.plackett_luce(r, mask)[1],
                             preference.plackett_luce(r[1:2, :2])[0], rtol=1e-6)
  g = jax.grad(lambda r: preference.plackett_luce(r, mask).sum())(garbage)
  np.testing.assert_array_equal(np.asarray(g)[~PL_MASK], 0.0)


def test_plackett_luce_prefers_the_given_order():
  r = jnp.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
  loss = preference.plackett_luce(r)
  assert loss[0] < loss[1]
  assert loss.shape == (2,) and loss.dtype == jnp.float32


def test_plackett_luce_empty_row_is_zero_with_zero_gradient():
  r = jnp.asarray(_rewards(34, (2, K)), jnp.float32)
  mask = jnp.array([[0, 0, 0], [1, 1, 1]])
  loss, g = jax.value_and_grad(lambda r: preference.plackett_luce(r, mask)[0])(r)
  assert loss == 0.0 and np.all(np.asarray(g) == 0.0)


# ----------------------------------------------------------------------------- bad input.

def test_shape_mismatch_names_the_tensors():
  with pytest.raises(AssertionError, match="r_chosen, r_rejected"):
    preference.bradley_terry(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(AssertionError, match="rewards, mask"):
    preference.plackett_luce(jnp.zeros((3, 4)), jnp.ones((3, 5)))


def test_bad_margin_shape_is_named():
  with pytest.raises(ValueError, match="margin has shape"):
    preference.bradley_terry(jnp.zeros((4, 2)), jnp.zeros((4, 2)), margin=jnp.zeros(2))


@pytest.mark.parametrize("kwargs", [{"label_smoothing": -0.1}, {"label_smoothing": 1.2}])
def test_out_of_range_label_smoothing_raises(kwargs):
  with pytest.raises(ValueError, match="label_smoothing"):
    preference.bradley_terry(jnp.zeros(3), jnp.zeros(3), **kwargs)


def test_negative_nu_raises():
  with pytest.raises(ValueError, match="nu"):
    preference.bradley_terry_ties(jnp.zeros(3), jnp.zeros(3), 0.5, nu=-1.0)
