"""Gold and proxy curves of learned proxies in a bandit world, averaged over seeds.

A *setting* is one way of training proxies (width, number of gold-labelled pairs,
label noise); its K seeds are K proxies ``[K, P, M]``, each standardised under
π_ref. For every seed this module computes the exact best-of-n curve and the
closed-form KL-regularised (RL) path (``prefjax.overopt.exact``), then averages
the per-prompt values over seeds before the bootstrap over prompts, so that the
standard errors are over prompts of seed-averaged curves (the study's notes:
per-seed declines vary a lot; plot seed averages and report the spread).

Ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization", arXiv:2310.02743) aggregate the K members with
``prefjax.rewards.aggregate`` (mean, WCO, UWO) and standardise the aggregate
under π_ref again, so an RL path's β means the same thing for every aggregation.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from prefjax.overopt import bandit
from prefjax.overopt import bon
from prefjax.overopt import exact
from prefjax.overopt import fits
from prefjax.rewards import aggregate


class SettingCurves(NamedTuple):
  """Seed-averaged curves of one proxy setting (or one ensemble aggregation)."""
  label: str
  bon: bon.Curve                 # knob n
  rl: bon.Curve | None           # knob β (None when the RL path was not run)
  bon_seeds: list[bon.Curve]     # one per seed (for the spread across seeds)
  fit_bon: fits.Fit
  fit_rl: fits.Fit | None


def _concatenate_prompts(curves: Sequence[bon.Curve], num_bootstrap: int) -> bon.Curve:
  return bon.summarize(curves[0].knob, *(np.concatenate([getattr(c, f) for c in curves])
                                         for f in ("per_prompt_kl", "per_prompt_proxy",
                                                   "per_prompt_gold")),
                       num_bootstrap=num_bootstrap)


def pool_worlds(settings: Sequence[SettingCurves], *, num_bootstrap: int = 1000) -> SettingCurves:
  """Pools one setting's curves over worlds by concatenating their prompts, then refits.

  Each world's prompts are i.i.d. draws of the same generator, so the pooled curve is
  the average over worlds and the bootstrap over prompts covers all of them.
  """
  if len(settings) == 1:
    return settings[0]
  cat = lambda curves: _concatenate_prompts(curves, num_bootstrap)
  bon_curve = cat([s.bon for s in settings])
  rl_curve = None if settings[0].rl is None else cat([s.rl for s in settings])
  seeds = [cat([s.bon_seeds[k] for s in settings]) for k in range(len(settings[0].bon_seeds))]
  return SettingCurves(settings[0].label, bon_curve, rl_curve, seeds,
                       fit_curve("bon", bon_curve, num_bootstrap),
                       None if rl_curve is None else fit_curve("rl", rl_curve, num_bootstrap))


def average_curves(curves: Sequence[bon.Curve], *, num_bootstrap: int = 1000,
                   seed: int = 0) -> bon.Curve:
  """Averages per-prompt values over seeds, then bootstraps over prompts."""
  if not curves:
    raise ValueError("average_curves: need at least one curve")
  stack = lambda name: np.mean([getattr(c, name) for c in curves], axis=0)
  return bon.summarize(curves[0].knob, stack("per_prompt_kl"), stack("per_prompt_proxy"),
                       stack("per_prompt_gold"), num_bootstrap=num_bootstrap, seed=seed)


def shift_to_reference(curve: bon.Curve, reference_gold: np.ndarray,
                       reference_proxy: np.ndarray) -> bon.Curve:
  """Subtracts each prompt's π_ref scores ``[P]`` so that the reference policy scores 0."""
  return curve._replace(per_prompt_gold=curve.per_prompt_gold - reference_gold[:, None],
                        per_prompt_proxy=curve.per_prompt_proxy - reference_proxy[:, None])


def reference_scores(world: bandit.World, scores: np.ndarray) -> np.ndarray:
  """E_{π_ref}[scores] per prompt, ``[P]`` float64."""
  return np.sum(np.exp(world.ref_logits) * scores, axis=-1)


def fit_curve(form: str, curve: bon.Curve, num_bootstrap: int) -> fits.Fit:
  """Gao et al.'s ``form`` ("bon" or "rl") fitted to a curve, CIs by prompt bootstrap."""
  fit = fits.fit_bon if form == "bon" else fits.fit_rl
  return fit(np.sqrt(curve.kl), curve.gold, per_prompt_gold=curve.per_prompt_gold,
             per_prompt_kl=curve.per_prompt_kl, num_bootstrap=num_bootstrap)


def _scores_curve(knob: np.ndarray, scores: exact.ExactScores, world: bandit.World,
                  proxy: np.ndarray) -> bon.Curve:
  """A per-prompt curve shifted so that π_ref scores 0 (no bootstrap: averaged later)."""
  curve = bon.Curve(knob, *(np.zeros(len(knob)),) * 6, scores.kl, scores.proxy, scores.gold)
  return shift_to_reference(curve, reference_scores(world, world.gold),
                            reference_scores(world, proxy))


def seed_curves(world: bandit.World, proxy: np.ndarray, ns: np.ndarray,
                betas: np.ndarray | None) -> tuple[bon.Curve, bon.Curve | None]:
  """Exact best-of-n and RL-path curves of one proxy ``[P, M]`` (per prompt, unsummarised)."""
  bon_scores = exact.exact_bon_scores(world.ref_logits, proxy, world.gold, ns)
  bon_curve = _scores_curve(np.asarray(ns, np.float64), bon_scores, world, proxy)
  if betas is None:
    return bon_curve, None
  rl_scores = exact.rl_path_scores(world.ref_logits, proxy, world.gold, betas)
  return bon_curve, _scores_curve(np.asarray(betas, np.float64), rl_scores, world, proxy)


def setting_curves(label: str, world: bandit.World, proxies: np.ndarray, ns: np.ndarray,
                   betas: np.ndarray | None, *, num_bootstrap: int = 1000) -> SettingCurves:
  """Curves of K proxies ``[K, P, M]`` averaged over seeds, with Gao et al. fits."""
  per_seed = [seed_curves(world, p, ns, betas) for p in proxies]
  bon_seeds = [average_curves([b], num_bootstrap=num_bootstrap) for b, _ in per_seed]
  bon_curve = average_curves([b for b, _ in per_seed], num_bootstrap=num_bootstrap)
  rl_curve = None if betas is None else average_curves([r for _, r in per_seed],
                                                        num_bootstrap=num_bootstrap)
  return SettingCurves(label, bon_curve, rl_curve, bon_seeds,
                       fit_curve("bon", bon_curve, num_bootstrap),
                       None if rl_curve is None else fit_curve("rl", rl_curve, num_bootstrap))


def aggregate_members(world: bandit.World, members: np.ndarray, method: str,
                      lam: float = 0.0) -> np.ndarray:
  """An ensemble aggregation over members ``[K, P, M]`` → ``[P, M]``, standardised under π_ref."""
  stacked = np.moveaxis(np.asarray(members, np.float32), 0, -1)
  combined = np.asarray(aggregate(stacked, method, lam), np.float64)
  return bandit.standardize(world.ref_logits, combined)


def disagreement_growth(world: bandit.World, members: np.ndarray, aggregate: np.ndarray,
                        ns: np.ndarray) -> np.ndarray:
  """E_π[std over members] under best-of-n of ``aggregate``, minus its π_ref value: ``[P, S]``.

  The member spread std_k r_k(i) of each candidate is averaged under the exact
  best-of-n distribution for each n in ``ns`` (Coste et al.'s disagreement).
  """
  spread = np.std(np.asarray(members, np.float64), axis=0)
  log_pi = exact.exact_bon_log_probs(world.ref_logits, aggregate, ns)
  under_policy = np.einsum("psm,pm->ps", np.exp(log_pi), spread)
  return under_policy - reference_scores(world, spread)[:, None]


def decline(curve: bon.Curve, *, num_bootstrap: int = 1000) -> bon.Decline:
  """Gold drop from the seed-averaged peak to the last point, its bootstrap SE (of the
  paired per-prompt difference gold[peak] − gold[last]) and the z it must reach given
  that the peak was picked from the curve (``bon.peak_drop``)."""
  return bon.peak_drop(curve.per_prompt_gold, num_bootstrap)


def paired_difference(a: np.ndarray, b: np.ndarray, *,
                      num_bootstrap: int = 1000) -> tuple[float, float]:
  """Mean over prompts of a − b (``[P]`` each) and its bootstrap SE."""
  mean, se = bon.bootstrap_mean_se(np.asarray(a) - np.asarray(b), num_bootstrap)
  return float(mean), float(se)
