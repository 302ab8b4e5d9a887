"""Criteria D1–D3 and P1 of the direct-alignment study (``direct_study``) and the RL reference.

Pure functions of ``direct_study.DaaSweep`` results returning ``{"pass", "value",
"threshold", "detail"}`` (JSON-ready); thresholds are fixed here from the papers'
claims, not tuned per run. Papers: Rafailov et al. 2024 (arXiv:2406.02900; D1, D2),
Azar et al. 2023 (arXiv:2310.12036; D3), Rafailov et al. 2023 (arXiv:2305.18290; P1).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from prefjax.overopt import bandit
from prefjax.overopt import bon
from prefjax.overopt import curves
from prefjax.overopt import exact
from prefjax.overopt import fits
from prefjax.overopt.direct_study import DaaSweep

# D1 compares two 2-parameter fits through the reference: it needs residuals to compare.
D1_MIN_BETAS = 3
# P1's KL bins (nats): DPO and the RL reference are compared within each.
P1_KL_EDGES = tuple(2.0 ** np.arange(-4, 7))


def _result(passed: bool, value: Any, threshold: Any, detail: str) -> dict[str, Any]:
  return {"pass": bool(passed), "value": value, "threshold": threshold, "detail": detail}


def final_curve(sweep: DaaSweep) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(d, gold, per_prompt_kl [P, K+1], per_prompt_gold [P, K+1]) of the final points across β,
  sorted by d, with the reference policy (d = 0, gold = 0) prepended."""
  kl = sweep.per_prompt_kl[:, -1]                       # [K, P]
  gold = sweep.per_prompt_gold[:, -1]
  order = np.argsort(kl.mean(axis=1))
  zeros = np.zeros((1, kl.shape[1]))
  per_kl = np.concatenate([zeros, kl[order]]).T
  per_gold = np.concatenate([zeros, gold[order]]).T
  return np.sqrt(per_kl.mean(axis=0)), per_gold.mean(axis=0), per_kl, per_gold


def criterion_d1(sweep: DaaSweep, *, num_se: float = 2.0, num_bootstrap: int = 1000,
                 seed: int = 0) -> dict:
  """D1 for one loss: final gold vs d across β has an interior maximum, and the RL form
  d(α − β·log d) fits better (lower RMSE) than the quadratic α·KL − β·KL².

  Interior maximum, by the rule G1 uses for best-of-n: the argmax over the points
  (reference d = 0 included) is neither the reference nor the largest-d point,
  and the largest-d point is below it by a z (SE over prompts of the per-prompt
  difference) of at least ``num_se``, raised to the bootstrap-t max critical value
  because the peak is picked from the same points (``bon.Decline``). Fits use the
  same points (CIs over prompts). With fewer than ``D1_MIN_BETAS`` β values D1 is not
  evaluable, which is a failure: both forms pass through the reference and any two more
  points, so their RMSEs would be round-off and the comparison a coin toss.
  """
  d, gold, per_kl, per_gold = final_curve(sweep)
  threshold = (f"interior argmax with drop z >= critical_z (max-t, at least {num_se:g}), "
               f"and rmse_rl < rmse_quadratic_kl, over >= {D1_MIN_BETAS} β values")
  if len(d) - 1 < D1_MIN_BETAS:
    return _result(False, {"evaluable": False, "num_betas": len(d) - 1}, threshold,
                   f"{sweep.loss}: not evaluable: needs >= {D1_MIN_BETAS} β values, got "
                   f"{len(d) - 1} (two-parameter forms through the reference fit two points "
                   "exactly)")
  decline = bon.peak_drop(per_gold, num_bootstrap, seed, z_level=num_se)
  drop, drop_se, peak = decline.drop, decline.se, decline.peak
  kw = dict(per_prompt_gold=per_gold, per_prompt_kl=per_kl, num_bootstrap=num_bootstrap,
            seed=seed)
  rl = fits.fit_rl(d, gold, **kw)
  quad = fits.fit_quadratic_kl(d * d, gold, **kw)
  interior = 0 < peak < len(d) - 1 and decline.significant
  value = {"peak_d": float(d[peak]), "peak_gold": float(gold[peak]),
           "gold_at_max_d": float(gold[-1]), "max_d": float(d[-1]), "drop": drop,
           "drop_se": drop_se, "drop_critical_z": decline.critical_z, "rmse_rl": rl.rmse,
           "rmse_quadratic_kl": quad.rmse,
           "rl_alpha": rl.alpha, "rl_beta": rl.beta, "rl_beta_ci": list(rl.beta_ci),
           "rl_r2": rl.r2, "final_kl": (d[1:] ** 2).tolist()}
  detail = (f"{sweep.loss}: gold peaks at d={d[peak]:.2f} (max d {d[-1]:.2f}, "
            f"{decline.describe('to it')}: "
            f"{'interior' if interior else 'no interior maximum'});"
            f" RMSE RL {rl.rmse:.4f} vs quadratic {quad.rmse:.4f}")
  return _result(interior and rl.rmse < quad.rmse, dict(value, evaluable=True), threshold,
                 detail)


def criterion_d2(sweep: DaaSweep, *, num_se: float = 2.0, kl_tolerance: float = 0.01,
                 num_bootstrap: int = 1000, seed: int = 0) -> dict:
  """D2: at the smallest β, gold peaks before the end of training while KL keeps rising.

  Pass: the gold argmax over evaluation steps is neither the first (the initial policy:
  gold never rose) nor the last one, the final gold
  is below the peak by a z of at least ``num_se`` bootstrap SEs (over prompts, of the
  per-prompt drop), raised for the peak's choice as G1 does (``bon.Decline``), and KL
  after the peak never falls by more than ``kl_tolerance``·KL_final between evaluations
  and ends above its value at the peak.
  """
  k = int(np.argmin(sweep.betas))
  gold, kl = sweep.gold[k], sweep.kl[k]
  decline = bon.peak_drop(sweep.per_prompt_gold[k].T, num_bootstrap, seed,  # [P, T]
                          z_level=num_se)
  drop, drop_se, peak = decline.drop, decline.se, decline.peak
  after = np.diff(kl[peak:])
  rising = bool(kl[-1] > kl[peak] and (after >= -kl_tolerance * kl[-1]).all())
  # As G1: interior. A peak at step 0 never rose: gold only fell from the start.
  declined = 0 < peak < len(gold) - 1 and decline.significant
  value = {"beta": float(sweep.betas[k]), "peak_step": int(sweep.steps[peak]),
           "kl_rising": rising,
           "final_step": int(sweep.steps[-1]), "gold_peak": float(gold[peak]),
           "gold_final": float(gold[-1]), "drop": drop, "drop_se": drop_se,
           "drop_critical_z": decline.critical_z, "kl_at_peak": float(kl[peak]),
           "kl_final": float(kl[-1])}
  if rising:
    kl_text = "KL rising after the peak"
  elif peak == len(kl) - 1:
    kl_text = "no evaluation after the peak to see KL rise"
  elif kl[-1] > kl[peak]:
    kl_text = (f"KL not rising after the peak: it falls by up to {-after.min():.3g} nats "
               f"between evaluations (allowed {kl_tolerance * kl[-1]:.3g}, "
               f"{kl_tolerance:.0%} of the final)")
  else:
    kl_text = "KL ends below its value at the peak"
  passed = declined and rising
  never_rose = "; gold never rose (its peak is the first evaluation)" if peak == 0 else ""
  detail = (f"{sweep.loss} β={sweep.betas[k]:.3g}: gold peak {gold[peak]:.3f} at step "
            f"{sweep.steps[peak]} (KL {kl[peak]:.2f}), final {gold[-1]:.3f} (KL {kl[-1]:.2f});"
            f" {decline.describe()}; {kl_text}{never_rose}; {'pass' if passed else 'FAIL'}")
  return _result(passed, value,
                 f"peak after the first evaluation and before the last, drop z >= critical_z "
                 f"(max-t, at least {num_se:g}), KL rising after the peak", detail)


def criterion_d3(dpo: DaaSweep, ipo: DaaSweep, *, growth: float = 0.05,
                 tolerance: float = 0.2) -> dict:
  """D3 (Azar et al. 2023): DPO's margin keeps growing, IPO's settles near 1/(2β).

  At every β of each sweep: DPO's mean training-pair margin h grows over the
  second half of training, h(T) ≥ (1 + ``growth``)·h(T/2) and h(T) > h(3T/4)
  (unbounded growth: under gradient descent on a separable logistic loss h grows
  like log t, ≥ 10% from T/2 to T for T ≤ 1000); IPO's h is within ``tolerance``
  of 1/(2β) at every evaluation in the second half of training. The claim is
  about each loss's optimum on fixed data, so measure it on full-batch sweeps
  trained to convergence (``batch_size=None``): with minibatches of 256 and
  constant-lr Adam, IPO's margin sat at ≈ 0.5–0.6 of its target after 100–500
  steps on the default world. h(T/2) and h(3T/4) are read at the first evaluation at or
  after those steps; where that makes T/2, 3T/4 and T fewer than three distinct
  evaluations, D3 is not evaluable (a failure): the growth would compare a point with
  itself.
  """
  def at(sweep, fraction):
    return int(np.searchsorted(sweep.steps, fraction * sweep.steps[-1]))
  threshold = {"dpo_growth_2nd_half": growth, "ipo_rel_error": tolerance}
  for sweep in (dpo, ipo):
    if not at(sweep, 0.5) < at(sweep, 0.75) < len(sweep.steps) - 1:
      return _result(False, {"evaluable": False}, threshold,
                     f"not evaluable: {sweep.loss} is evaluated at steps "
                     f"{[int(t) for t in sweep.steps]}, which do not hold distinct "
                     "evaluations at or after T/2 and 3T/4 before T")
  dpo_ok, ipo_ok, value = [], [], {"dpo": [], "ipo": []}
  for k, beta in enumerate(dpo.betas):
    h = dpo.margin[k]
    half, three_q = h[at(dpo, 0.5)], h[at(dpo, 0.75)]
    ok = bool(h[-1] >= (1 + growth) * half and h[-1] > three_q)
    dpo_ok.append(ok)
    value["dpo"].append({"beta": float(beta), "h_half": float(half), "h_final": float(h[-1]),
                         "growth": float(h[-1] / half - 1) if half else float("nan")})
  for k, beta in enumerate(ipo.betas):
    target = 1.0 / (2.0 * beta)
    tail = ipo.margin[k, at(ipo, 0.5):]
    error = np.abs(tail / target - 1.0)
    ipo_ok.append(bool((error <= tolerance).all()))
    value["ipo"].append({"beta": float(beta), "target": target, "h_final": float(tail[-1]),
                         "max_rel_error_2nd_half": float(error.max())})
  detail = (f"DPO growing at {sum(dpo_ok)}/{len(dpo_ok)} β, IPO within {tolerance:.0%} of "
            f"1/(2β) at {sum(ipo_ok)}/{len(ipo_ok)} β")
  return _result(all(dpo_ok) and all(ipo_ok), value, threshold, detail)


def ppo_reference(world: bandit.World, proxy: np.ndarray,
                  rl_betas: Sequence[float] = tuple(np.logspace(-2, 2, 41))) -> exact.ExactScores:
  """The "PPO" reference: the exact KL-regularised path π ∝ π_ref·exp(β·proxy), ``[P, S]``.

  Gold is shifted so that π_ref scores 0 (as in :func:`evaluate_policy`).
  """
  proxy = np.asarray(proxy, np.float64)
  if proxy.shape != world.gold.shape:
    raise ValueError(f"ppo_reference: proxy {proxy.shape} must be [P, M] = {world.gold.shape}")
  scores = exact.rl_path_scores(world.ref_logits, proxy, world.gold, np.asarray(rl_betas))
  ref_gold = curves.reference_scores(world, world.gold)
  return scores._replace(gold=scores.gold - ref_gold[:, None])


def _first_crossing(path_kl: np.ndarray, x: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Where a path of KLs ``[S]`` first reaches each of ``x`` ``[N]``: columns ``lo``,
  ``hi`` and weight ``w`` with ``(1 - w)·kl[lo] + w·kl[hi] = x``; ``lo = -1`` for an ``x``
  below the path's start or above its largest KL."""
  reach = np.argmax(path_kl[None, :] >= x[:, None], axis=1)      # first column at or past x
  inside = (x >= path_kl[0]) & (x <= path_kl.max())
  lo = np.maximum(reach - 1, 0)
  gap = path_kl[reach] - path_kl[lo]
  w = np.where(gap > 0, (x - path_kl[lo]) / np.where(gap > 0, gap, 1.0), 1.0)
  return np.where(inside, lo, -1), reach, w


def criterion_p1(sweep: DaaSweep, ppo: exact.ExactScores, *,
                 kl_edges: Sequence[float] = P1_KL_EDGES,
                 final_only: bool = False, match: str = "bin", num_bootstrap: int = 1000,
                 seed: int = 0) -> dict:
  """P1 (Rafailov et al. 2023, Fig. 2): DPO's reward–KL frontier is not below PPO's.

  DPO points are every evaluation after step 0 of every β (``final_only``: the
  final points); PPO points are the columns of ``ppo`` (per-prompt ``[P, S]``).
  Points are binned by their prompt-mean KL on ``kl_edges`` (nats). In each bin
  holding points of both, each prompt's gold is averaged over the method's
  points, and the per-prompt difference DPO − PPO is bootstrapped over prompts:
  pass when mean ≥ −1 SE in every such bin (and there is at least one).
  ``match="interpolate"`` compares each DPO point with the PPO path at the same
  prompt-mean KL (per-prompt gold interpolated linearly between the path's
  columns; points outside its KL range dropped), removing the bias of comparing
  points at different KL within one bin. A path whose KL falls back somewhere (an
  RL run's checkpoints under an adaptive β) is read where it first reaches each
  DPO point's KL, between the two columns around that crossing.
  """
  steps = slice(-1, None) if final_only else slice(1, None)
  dpo_kl = sweep.per_prompt_kl[:, steps].reshape(-1, sweep.per_prompt_kl.shape[-1])
  dpo_gold = sweep.per_prompt_gold[:, steps].reshape(dpo_kl.shape)      # [N, P]
  ppo_kl, ppo_gold = np.asarray(ppo.kl).T, np.asarray(ppo.gold).T         # [S, P]
  if ppo_kl.shape[1] != dpo_kl.shape[1]:
    raise ValueError(f"criterion_p1: PPO has {ppo_kl.shape[1]} prompts, DPO "
                     f"{dpo_kl.shape[1]}")
  if match not in ("bin", "interpolate"):
    raise ValueError(f"criterion_p1: match={match!r} must be 'bin' or 'interpolate'")
  edges = np.asarray(kl_edges, np.float64)
  dpo_bin = np.digitize(dpo_kl.mean(axis=1), edges)
  ppo_bin = np.digitize(ppo_kl.mean(axis=1), edges)
  if match == "interpolate":
    lo, hi, w = _first_crossing(ppo_kl.mean(axis=1), dpo_kl.mean(axis=1))
    ppo_gold = (1 - w[:, None]) * ppo_gold[lo] + w[:, None] * ppo_gold[hi]   # [N, P]
    dpo_bin = np.where(lo >= 0, dpo_bin, -1)
    ppo_bin = dpo_bin
  bins = []
  for b in range(1, len(edges)):
    in_dpo, in_ppo = dpo_bin == b, ppo_bin == b
    if not (in_dpo.any() and in_ppo.any()):
      continue
    diff = dpo_gold[in_dpo].mean(axis=0) - ppo_gold[in_ppo].mean(axis=0)   # [P]
    mean, se = bon.bootstrap_mean_se(diff, num_bootstrap, seed)
    bins.append({"kl_low": float(edges[b - 1]), "kl_high": float(edges[b]),
                 "dpo_gold": float(dpo_gold[in_dpo].mean()),
                 "ppo_gold": float(ppo_gold[in_ppo].mean()), "diff": float(mean),
                 "se": float(se), "pass": bool(mean >= -se),
                 "num_dpo": int(in_dpo.sum()), "num_ppo": int(in_ppo.sum())})
  failed = [f"[{b['kl_low']:g}, {b['kl_high']:g})" for b in bins if not b["pass"]]
  detail = (f"{len(bins)} shared KL bins; DPO below the RL reference by > 1 SE in "
            f"{', '.join(failed) if failed else 'none'}" if bins else "no shared KL bin")
  return _result(bool(bins) and not failed, bins, "DPO - RL >= -1 SE in every shared bin",
                 detail)


def every_loss(sweeps: Mapping[str, DaaSweep], *, num_bootstrap: int = 1000,
               seed: int = 0) -> dict[str, dict]:
  """D1 and D2, each passing when it passes for every loss (its value: each loss's result)."""
  out = {}
  for name, criterion, threshold in (
      ("D1", criterion_d1, "every loss: interior argmax and rmse_rl < rmse_quadratic_kl, "
                           f"over >= {D1_MIN_BETAS} β values"),
      ("D2", criterion_d2, "every loss at its smallest β")):
    each = {loss: criterion(s, num_bootstrap=num_bootstrap, seed=seed)
            for loss, s in sweeps.items()}
    out[name] = _result(all(r["pass"] for r in each.values()), each, threshold,
                        "; ".join(r["detail"] for r in each.values()))
  return out


def criteria(sweeps: Mapping[str, DaaSweep], ppo: exact.ExactScores | None = None, *,
             d3_sweeps: Mapping[str, DaaSweep] | None = None, num_bootstrap: int = 1000,
             seed: int = 0) -> dict[str, dict]:
  """D1 (all losses present), D2 (each loss), D3 (needs dpo and ipo), P1 (needs dpo, ppo;
  also ``P1_kl_matched``, the same test at matched KL, see :func:`criterion_p1`).

  ``d3_sweeps`` (full-batch sweeps trained to convergence, see :func:`criterion_d3`)
  are used for D3 when given; otherwise ``sweeps``.
  """
  out = every_loss(sweeps, num_bootstrap=num_bootstrap, seed=seed)
  d3 = sweeps if d3_sweeps is None else d3_sweeps
  if "dpo" in d3 and "ipo" in d3:
    out["D3"] = criterion_d3(d3["dpo"], d3["ipo"])
  if "dpo" in sweeps and ppo is not None:
    out["P1"] = criterion_p1(sweeps["dpo"], ppo, num_bootstrap=num_bootstrap, seed=seed)
    out["P1_kl_matched"] = criterion_p1(sweeps["dpo"], ppo, match="interpolate",
                                        num_bootstrap=num_bootstrap, seed=seed)
  return out
