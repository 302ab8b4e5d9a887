"""Tests for prefjax.overopt.fits: Gao et al. functional forms, bootstrap CIs, peaks."""

import math

import numpy as np
import pytest

from prefjax.overopt import fits

D = np.linspace(0.0, 3.0, 25)          # d = √KL grid including the reference point d = 0
ALPHA, BETA = 1.3, 0.4


def _curve(form, alpha, beta, d=D):
  return fits.predict(fits.Fit(form, alpha, beta, (0, 0), (0, 0), 0, 0, 0, 0, np.size(d)), d)


def _fit(form, d, gold, **kw):
  x = d * d if form == "quadratic_kl" else d
  return {"bon": fits.fit_bon, "rl": fits.fit_rl, "quadratic_kl": fits.fit_quadratic_kl}[form](
      x, gold, **kw)


def test_closed_forms_by_hand():
  d = np.array([0.0, 0.5, 2.0])
  np.testing.assert_allclose(_curve("bon", ALPHA, BETA, d), d * (ALPHA - BETA * d), rtol=1e-15)
  np.testing.assert_allclose(_curve("rl", ALPHA, BETA, d),
                             [0.0, 0.5 * (ALPHA - BETA * math.log(0.5)),
                              2.0 * (ALPHA - BETA * math.log(2.0))], rtol=1e-15)
  np.testing.assert_allclose(_curve("quadratic_kl", ALPHA, BETA, d),
                             ALPHA * d**2 - BETA * d**4, rtol=1e-15)


@pytest.mark.parametrize("form", fits.FORMS)
@pytest.mark.filterwarnings("ignore:fit_.*intervals from the points alone")
def test_recovers_noiseless_parameters(form):
  gold = _curve(form, ALPHA, BETA)
  fit = _fit(form, D, gold, num_bootstrap=50)
  assert fit.form == form and fit.n_points == len(D)
  assert abs(fit.alpha - ALPHA) < 1e-8 and abs(fit.beta - BETA) < 1e-8
  assert fit.r2 == pytest.approx(1.0, abs=1e-12)
  assert fit.rmse < 1e-10
  # Exact data: no residual, so the intervals are the point itself.
  assert fit.alpha_ci[0] == pytest.approx(ALPHA, abs=1e-8)
  assert fit.beta_ci[1] == pytest.approx(BETA, abs=1e-8)


def test_rl_handles_d_zero_and_matches_lstsq_reference():
  rng = np.random.default_rng(0)
  gold = _curve("rl", ALPHA, BETA) + rng.normal(0, 0.05, D.shape)
  se = rng.uniform(0.02, 0.1, D.shape)
  fit = fits.fit_rl(D, gold, se=se, num_bootstrap=0)
  assert np.isfinite([fit.alpha, fit.beta, fit.r2, fit.rmse]).all()
  assert np.isnan(fit.alpha_ci).all()
  with np.errstate(divide="ignore", invalid="ignore"):
    dlogd = np.where(D > 0, D * np.log(D), 0.0)
  design = np.stack([D, -dlogd], axis=1) / se[:, None]
  ref, *_ = np.linalg.lstsq(design, gold / se, rcond=None)
  np.testing.assert_allclose([fit.alpha, fit.beta], ref, rtol=1e-12)
  residual = gold - _curve("rl", fit.alpha, fit.beta)
  assert fit.rmse == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-12)
  assert fit.r2 == pytest.approx(1 - residual @ residual / np.sum((gold - gold.mean())**2),
                                 rel=1e-12)


def test_unweighted_matches_lstsq_reference():
  rng = np.random.default_rng(1)
  gold = _curve("bon", ALPHA, BETA) + rng.normal(0, 0.1, D.shape)
  fit = fits.fit_bon(D, gold, num_bootstrap=0)
  ref, *_ = np.linalg.lstsq(np.stack([D, -D * D], 1), gold, rcond=None)
  np.testing.assert_allclose([fit.alpha, fit.beta], ref, rtol=1e-12)


@pytest.mark.parametrize("form", ["bon", "rl"])
@pytest.mark.filterwarnings("ignore:fit_.*intervals from the points alone")
def test_t_interval_coverage_on_independent_points(form):
  """Without per-prompt data the intervals are least-squares t-intervals. The residual
  bootstrap they replace covered 0.87-0.91 at 95% on 12 points (a helper's simulation)."""
  sigma, hits = 0.05, []
  d = np.linspace(0.25, 3.0, 12)
  for draw in range(200):
    rng = np.random.default_rng(100 + draw)
    gold = _curve(form, ALPHA, BETA, d) + rng.normal(0, sigma, d.shape)
    fit = _fit(form, d, gold, num_bootstrap=2, seed=draw)  # > 0: intervals wanted
    assert fit.alpha_ci[0] < fit.alpha < fit.alpha_ci[1]
    hits.append((fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1],
                 fit.beta_ci[0] <= BETA <= fit.beta_ci[1]))
  coverage = np.mean(hits, axis=0)
  assert (coverage >= 0.91).all(), coverage  # 95% ± 1.5% (binomial SE at 200 draws)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_a_point_at_the_origin_leaves_the_t_intervals_as_they_are(form):
  """The d = 0 point's design row is zero: it fits exactly and adds no degree of freedom."""
  d = D[1:]
  gold = _curve(form, ALPHA, BETA, d) + np.random.default_rng(3).normal(0, 0.05, d.shape)
  with pytest.warns(UserWarning):
    without = _fit(form, d, gold, num_bootstrap=2)
    with_origin = _fit(form, np.concatenate([[0.0], d]), np.concatenate([[0.0], gold]),
                       num_bootstrap=2)
  assert with_origin.alpha == pytest.approx(without.alpha, rel=1e-12)
  np.testing.assert_allclose(with_origin.alpha_ci, without.alpha_ci, rtol=1e-12)
  np.testing.assert_allclose(with_origin.beta_ci, without.beta_ci, rtol=1e-12)
  with (pytest.raises(ValueError, match="2 points away from d = 0"),
        pytest.warns(UserWarning, match="intervals from the points alone")):
    _fit(form, np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.5, 0.7]), num_bootstrap=2)


def test_intervals_without_prompts_warn_and_a_zero_se_is_refused():
  gold = _curve("bon", ALPHA, BETA) + np.random.default_rng(5).normal(0, 0.05, D.shape)
  with pytest.warns(UserWarning, match=r"fit_bon: intervals from the points alone .* "
                                        r"pass per_prompt_gold"):
    fits.fit_bon(D, gold, num_bootstrap=10)
  se = np.linspace(0.01, 0.1, len(D))
  se[0] = 9e-19  # best-of-n's n = 1 point: zero up to rounding, weight ~1e36
  with pytest.raises(ValueError, match=r"se at points \[0\] is zero up to rounding"):
    fits.fit_bon(D, gold, se=se, num_bootstrap=0)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_prompt_bootstrap_ci_coverage(form):
  # Prompt p has gold m_p·R(D) + noise and KL m_p·D² with E[m_p] = 1, so the population
  # curve is R at d = √KL; gold and KL means wobble together across prompt samples.
  num_prompts, hits = 32, []
  truth = _curve(form, ALPHA, BETA)
  for draw in range(50):
    rng = np.random.default_rng(300 + draw)
    scale = rng.uniform(0.5, 1.5, (num_prompts, 1))
    per_prompt = scale * truth[None] + rng.normal(0, 0.3, (num_prompts, len(D))) * D[None]
    per_kl = scale * (D**2)[None]
    gold, d = per_prompt.mean(0), np.sqrt(per_kl.mean(0))
    fit = _fit(form, d, gold, per_prompt_gold=per_prompt, per_prompt_kl=per_kl,
               num_bootstrap=400, seed=draw)
    hits.append((fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1],
                 fit.beta_ci[0] <= BETA <= fit.beta_ci[1]))
  coverage = np.mean(hits, axis=0)
  assert (coverage >= 0.8).all(), coverage


def test_rl_beats_quadratic_on_rl_data_and_vice_versa():
  rng = np.random.default_rng(3)
  noise = rng.normal(0, 0.01, D.shape)
  rl_gold = _curve("rl", 1.0, 0.8) + noise
  assert fits.fit_rl(D, rl_gold, num_bootstrap=0).rmse < 0.5 * fits.fit_quadratic_kl(
      D**2, rl_gold, num_bootstrap=0).rmse
  quad_gold = _curve("quadratic_kl", 0.6, 0.08) + noise
  assert fits.fit_quadratic_kl(D**2, quad_gold, num_bootstrap=0).rmse < 0.5 * fits.fit_rl(
      D, quad_gold, num_bootstrap=0).rmse


def test_peaks():
  bon = fits.fit_bon(D, _curve("bon", ALPHA, BETA), num_bootstrap=0)
  assert bon.peak_d == pytest.approx(ALPHA / (2 * BETA), rel=1e-9)
  assert bon.peak_value == pytest.approx(ALPHA**2 / (4 * BETA), rel=1e-9)
  rl = fits.fit_rl(D, _curve("rl", ALPHA, BETA), num_bootstrap=0)
  assert rl.peak_d == pytest.approx(math.exp(ALPHA / BETA - 1), rel=1e-9)
  assert rl.peak_value == pytest.approx(float(_curve("rl", ALPHA, BETA, rl.peak_d)), rel=1e-9)
  # The peak is a maximum: nearby values are lower.
  for fit in (bon, rl):
    around = fits.predict(fit, fit.peak_d * np.array([0.9, 1.0, 1.1]))
    assert around[1] > around[0] and around[1] > around[2]
  quad = fits.fit_quadratic_kl(D**2, _curve("quadratic_kl", ALPHA, BETA), num_bootstrap=0)
  assert quad.peak_d == pytest.approx(math.sqrt(ALPHA / (2 * BETA)), rel=1e-9)
  # No turn-over (β < 0): unbounded; a falling line (α < 0 = β): peak at the origin.
  rising = fits.fit_bon(D, _curve("bon", 1.0, -0.1), num_bootstrap=0)
  assert rising.peak_d == math.inf and rising.peak_value == math.inf
  falling = fits.fit_rl(D, -D, num_bootstrap=0)  # β is 0 up to round-off, either sign
  assert abs(falling.beta) < 1e-12 and falling.peak_value <= 1e-9
  # The branches themselves (the fit above reaches them only through round-off).
  for form in ("bon", "rl", "quadratic_kl"):
    assert fits._peak(form, -1.0, 0.0) == (0.0, 0.0), form  # pylint: disable=protected-access
    assert fits._peak(form, 1.0, 0.0) == (math.inf, math.inf), form  # pylint: disable=protected-access
    assert all(math.isnan(v) for v in fits._peak(form, 0.0, 0.0)), form  # pylint: disable=protected-access
  assert fits._peak("bon", -1.0, 0.5) == (0.0, 0.0)  # pylint: disable=protected-access
  assert fits._peak("rl", -1.0, 0.5) == pytest.approx(  # pylint: disable=protected-access
      (math.exp(-3.0), 0.5 * math.exp(-3.0)), rel=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(d=np.arange(4.0), gold=np.arange(3.0)), "equal 1-D shapes"),
    (dict(d=np.arange(2.0), gold=np.arange(2.0)), "at least 3 points"),
    (dict(d=np.array([0.0, 1.0, np.nan]), gold=np.ones(3)), "non-finite"),
    (dict(d=np.arange(3.0), gold=np.array([0.0, np.inf, 1.0])), "non-finite"),
    (dict(d=np.array([-1.0, 1.0, 2.0]), gold=np.ones(3)), ">= 0"),
    (dict(d=np.zeros(4), gold=np.zeros(4)), "rank"),
    (dict(d=np.arange(3.0), gold=np.ones(3), se=np.array([1.0, 0.0, 1.0])), "se must"),
    (dict(d=np.arange(3.0), gold=np.ones(3), per_prompt_gold=np.ones((4, 2))), r"\[P, 3\]"),
    (dict(d=np.arange(3.0), gold=np.ones(3), per_prompt_gold=np.zeros((4, 3))), "mean over"),
    (dict(d=np.arange(3.0), gold=np.ones(3), per_prompt_kl=np.ones((4, 3))), "needs"),
    (dict(d=np.arange(3.0), gold=np.ones(3), per_prompt_gold=np.ones((4, 3)),
          per_prompt_kl=np.ones((4, 3))), "does not match"),
])
def test_clear_errors(bad, match):
  d, gold = bad.pop("d"), bad.pop("gold")
  with pytest.raises(ValueError, match=match):
    fits.fit_rl(d, gold, num_bootstrap=10, **bad)


def test_predict_rejects_negative_d():
  fit = fits.fit_bon(D, _curve("bon", ALPHA, BETA), num_bootstrap=0)
  with pytest.raises(ValueError, match=">= 0"):
    fits.predict(fit, [-0.1])


@pytest.mark.parametrize("form", ["bon", "rl"])
@pytest.mark.filterwarnings("ignore:fit_.*intervals from the points alone")
def test_a_curve_not_shifted_to_the_reference_is_warned_about(form):
  """A best-of-n curve in raw units (π_ref at 2.0, not 0) fitted to r² ≪ 0 without a word."""
  gold = _curve(form, ALPHA, BETA)
  with pytest.warns(UserWarning, match=f"fit_{form}: gold at d = 0 is 2, but the form is 0"):
    unshifted = _fit(form, D, gold + 2.0, num_bootstrap=0)
  assert unshifted.r2 < 0.5
  import warnings  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    _fit(form, D, gold, num_bootstrap=0)   # shifted: no warning
