"""The overoptimization study's pass/fail criteria, computed from curves.

Each function returns a ``Criterion``: whether it holds, the measured value, the
threshold it was held to and a one-line account. The thresholds are the ones in
the study's specification and are fixed here, not tuned per run; a criterion
that fails is reported as failed. Papers:

* Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization",
  arXiv:2210.10760 (G*, R*).
* Coste, Anwar, Kirk & Krueger 2023, "Reward Model Ensembles Help Mitigate
  Overoptimization", arXiv:2310.02743 (C*).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from scipy import stats

from prefjax.overopt import bandit
from prefjax.overopt import bon
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import exact

# Monotonicity is checked up to float64 round-off of sums over 8k candidates.
_MONOTONE_TOL = 1e-9


@dataclasses.dataclass
class Criterion:
  name: str
  passed: bool
  value: Any
  threshold: Any
  detail: str
  figure: str = ""
  world: str = "bandit"

  def as_json(self) -> dict[str, Any]:
    return {"pass": bool(self.passed), "value": self.value, "threshold": self.threshold,
            "figure": self.figure, "world": self.world, "detail": self.detail}


def non_decreasing(values: np.ndarray) -> bool:
  return bool(np.all(np.diff(np.asarray(values)) >= -_MONOTONE_TOL))


# --------------------------------------------------------------------------- G0: estimators


def estimator_check(world: bandit.World, proxy: np.ndarray, ns: Sequence[int], *,
                    num_samples: int = 512, mc_repeats: int = 2048,
                    seed: int = 0) -> dict[str, Any]:
  """Exact best-of-n vs the unbiased estimator and vs plain Monte Carlo, per n.

  Both estimate E[gold of the best of n i.i.d. draws from π_ref]: the unbiased
  estimator from ``num_samples`` draws per prompt, Monte Carlo by drawing n
  candidates ``mc_repeats`` times. Returns the largest |z| of each against the
  exact value (z = mean over prompts of the difference / its bootstrap SE) and
  the largest violation of KL_exact ≤ log n − (n−1)/n.
  """
  rng = np.random.default_rng(seed)
  ns = np.asarray(ns, np.int64)
  probs = np.exp(world.ref_logits)
  exact_scores = exact.exact_bon_scores(world.ref_logits, proxy, world.gold, ns)
  num_prompts = probs.shape[0]
  draws = np.stack([rng.choice(probs.shape[1], size=num_samples, p=p / p.sum())
                    for p in probs])
  rows = np.arange(num_prompts)[:, None]
  unbiased = bon.unbiased_bon_scores(proxy[rows, draws], world.gold[rows, draws], ns)
  mc = np.zeros((num_prompts, len(ns)))
  for j, n in enumerate(ns):
    picks = np.stack([rng.choice(probs.shape[1], size=(mc_repeats, n), p=p / p.sum())
                      for p in probs])                                   # [P, R, n]
    best = np.argmax(proxy[np.arange(num_prompts)[:, None, None], picks], axis=-1)
    chosen = np.take_along_axis(picks, best[..., None], axis=-1)[..., 0]  # [P, R]
    mc[:, j] = world.gold[np.arange(num_prompts)[:, None], chosen].mean(axis=1)
  kl_excess = float(np.max(exact_scores.kl - bon.bon_kl(ns)[None, :]))
  out = {"ns": ns.tolist(), "max_kl_minus_bound": kl_excess,
         "exact_gold": exact_scores.gold.mean(0).tolist(),
         "unbiased_gold": unbiased.gold.mean(0).tolist(), "mc_gold": mc.mean(0).tolist()}
  for name, estimate in (("unbiased", unbiased.gold), ("mc", mc)):
    mean, se = bon.bootstrap_mean_se(estimate - exact_scores.gold)
    out[f"z_{name}_vs_exact"] = float(np.max(np.abs(mean) / np.maximum(se, 1e-12)))
    out[f"{name}_minus_exact"], out[f"{name}_minus_exact_se"] = mean.tolist(), se.tolist()
  return out


def g0(settings: Sequence[curves_lib.SettingCurves], checks: Sequence[dict],
       figure: str, *, family_alpha: float = 0.01) -> Criterion:
  """Estimator sanity. Each check compares two estimators with exact best-of-n at every n,
  so the agreement threshold on max |z| is Bonferroni-corrected over all comparisons:
  with k of them, |z| ≤ Φ⁻¹(1 − α/(2k)) holds for all with probability ≥ 1 − α when the
  estimators are unbiased (α = ``family_alpha``)."""
  monotone = all(non_decreasing(c.proxy) for s in settings for c in s.bon_seeds)
  # np.max, not max(): a NaN z (a world of one prompt) must fail, wherever it comes.
  z = float(np.max([[c["z_unbiased_vs_exact"], c["z_mc_vs_exact"]] for c in checks]))
  comparisons = sum(2 * len(c["ns"]) for c in checks)
  z_max = float(stats.norm.ppf(1.0 - family_alpha / (2 * comparisons)))
  excess = float(np.max([c["max_kl_minus_bound"] for c in checks]))
  passed = monotone and z <= z_max and excess <= 1e-9
  return Criterion("G0", passed, {"proxy_monotone_every_seed": monotone, "max_abs_z": z,
                                  "comparisons": comparisons,
                                  "max_kl_minus_bound": excess},
                   {"max_abs_z": z_max, "max_kl_minus_bound": 1e-9},
                   f"proxy non-decreasing in n for every seed: {monotone}; unbiased estimator "
                   f"and Monte Carlo agree with exact best-of-n (max |z| {z:.2f} ≤ {z_max:.2f}, "
                   f"Bonferroni over {comparisons} comparisons at 1%); "
                   f"exact KL − (log n − (n−1)/n) ≤ {excess:.2g}", figure)


# --------------------------------------------------------------------------- G: best-of-n


def _need_settings(name: str, settings: Sequence[curves_lib.SettingCurves]) -> None:
  """An empty list would make "every setting declines" hold vacuously."""
  if not settings:
    raise ValueError(f"{name}: need at least one setting, got none")


# The z a drop from a peak picked out of S points must reach (``bon.Decline``).
DECLINE_THRESHOLD = {"drop_z": ">= critical_z (bootstrap-t max over the candidate peaks, "
                                "one-sided 2.3%; at least 2)"}


def _decline_row(d: bon.Decline, num_points: int) -> dict[str, Any]:
  return {"drop": d.drop, "se": d.se, "z": d.z, "critical_z": d.critical_z,
          "significant": d.significant, "interior": 0 < d.peak < num_points - 1,
          "text": d.describe()}


def g1(smallest: Sequence[curves_lib.SettingCurves], figure: str, *,
       num_bootstrap: int = 1000) -> Criterion:
  _need_settings("g1", smallest)
  rows = []
  for s in smallest:
    d = curves_lib.decline(s.bon, num_bootstrap=num_bootstrap)
    rows.append({"setting": s.label, "peak_n": float(s.bon.knob[d.peak]),
                 **_decline_row(d, len(s.bon.gold)),
                 "proxy_rising": non_decreasing(s.bon.proxy)})
  passed = all(r["interior"] and r["significant"] and r["proxy_rising"] for r in rows)
  detail = "; ".join(f"{r['setting']}: peak at n={r['peak_n']:.0f}, {r['text']}"
                     for r in rows)
  return Criterion("G1", passed, rows, DECLINE_THRESHOLD, detail, figure)


def g2(settings: Sequence[curves_lib.SettingCurves], figure: str) -> Criterion:
  rows = [{"setting": s.label, "alpha": s.fit_bon.alpha, "beta": s.fit_bon.beta,
           "r2": s.fit_bon.r2} for s in settings]
  passed = all(r["alpha"] > 0 and r["beta"] > 0 and r["r2"] >= 0.95 for r in rows)
  worst = min(r["r2"] for r in rows)
  failures = []
  for key, symbol in (("alpha", "α"), ("beta", "β")):
    if bad := [r for r in rows if not r[key] > 0]:
      failures.append(f"{symbol} ≤ 0 for " + ", ".join(f"{r['setting']} ({r[key]:+.3f})"
                                                      for r in bad))
  low = [r for r in rows if not r["r2"] >= 0.95]
  if low:
    failures.append("R² < 0.95 for " + ", ".join(f"{r['setting']} ({r['r2']:.3f})"
                                                 for r in low))
  detail = (f"d(α − βd) fits every size, lowest R² {worst:.3f}" if passed else
            "; ".join(failures) + f" (lowest R² {worst:.3f})")
  return Criterion("G2", passed, rows, {"alpha": "> 0", "beta": "> 0", "r2": 0.95}, detail,
                   figure)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  # Rounded: with 4 sizes ρ steps by 0.2, and scipy gives 0.7999999999999999 for 0.8.
  return round(float(stats.spearmanr(x, y).statistic), 12)


G3_MIN_SIZES = 3  # with two, a rank correlation is ±1 whatever the values


def g3(sizes: Sequence[float], settings: Sequence[curves_lib.SettingCurves],
       figure: str) -> Criterion:
  """Spearman of size vs β_bon and vs peak gold; with fewer than ``G3_MIN_SIZES`` sizes
  (or constant values) not evaluable, which is reported as a failure, never a pass."""
  threshold = {"spearman_size_beta": "<= -0.8", "spearman_size_peak_gold": ">= 0.8"}
  if len(sizes) < G3_MIN_SIZES:
    return Criterion("G3", False, {"spearman_size_beta": None,
                                   "spearman_size_peak_gold": None, "evaluable": False},
                     threshold, f"not evaluable: needs >= {G3_MIN_SIZES} sizes, got "
                     f"{len(sizes)}", figure)
  rho_beta = spearman(sizes, [s.fit_bon.beta for s in settings])
  rho_peak = spearman(sizes, [float(np.max(s.bon.gold)) for s in settings])
  passed = rho_beta <= -0.8 and rho_peak >= 0.8
  evaluable = bool(np.isfinite(rho_beta) and np.isfinite(rho_peak))
  detail = (f"Spearman(size, β_bon) = {rho_beta:.2f}, Spearman(size, peak gold) = "
            f"{rho_peak:.2f}")
  if not evaluable:
    detail = f"not evaluable: {detail} (undefined when the values are all equal)"
  return Criterion("G3", passed, {"spearman_size_beta": rho_beta if evaluable else None,
                                  "spearman_size_peak_gold": rho_peak if evaluable else None,
                                  "evaluable": evaluable}, threshold, detail, figure)


def g5(data_sizes: Sequence[int], settings: Sequence[curves_lib.SettingCurves], n_fixed: int,
       figure: str) -> Criterion:
  """Gold at the best-of-n n nearest ``n_fixed`` (which must lie in the curves' n range)."""
  _need_settings("g5", settings)
  lo, hi = min(float(s.bon.knob.min()) for s in settings), max(float(s.bon.knob.max())
                                                              for s in settings)
  if not lo <= n_fixed <= hi:
    raise ValueError(f"g5: n_fixed={n_fixed} must lie in [{lo:.0f}, {hi:.0f}], the best-of-n "
                     "ns of the curves")
  golds, ns = [], []
  for s in settings:
    j = int(np.argmin(np.abs(s.bon.knob - n_fixed)))
    golds.append(float(s.bon.gold[j]))
    ns.append(float(s.bon.knob[j]))
  order = np.argsort(data_sizes)
  increasing = bool(np.all(np.diff(np.asarray(golds)[order]) > 0))
  used = ", ".join(f"{n:g}" for n in sorted(set(ns)))
  return Criterion("G5", increasing, {"num_pairs": list(map(int, data_sizes)), "gold": golds,
                                      "n": ns},
                   "strictly increasing", f"gold at n = {used} (the curves' n nearest "
                   f"{n_fixed}) for "
                   + ", ".join(f"N={n}: {g:.3f}" for n, g in zip(data_sizes, golds)), figure)


# --------------------------------------------------------------------------- R: RL path


def r1(settings: Sequence[curves_lib.SettingCurves], figure: str) -> Criterion:
  ok = {s.label: non_decreasing(s.rl.kl) and non_decreasing(s.rl.proxy) for s in settings}
  return Criterion("R1", all(ok.values()), ok, "non-decreasing in β",
                   "KL and proxy rise along the RL path for "
                   f"{sum(ok.values())}/{len(ok)} sizes", figure)


def r2(smallest: Sequence[curves_lib.SettingCurves], figure: str, *,
       num_bootstrap: int = 1000) -> Criterion:
  _need_settings("r2", smallest)
  rows = []
  for s in smallest:
    d = curves_lib.decline(s.rl, num_bootstrap=num_bootstrap)
    rows.append({"setting": s.label, **_decline_row(d, len(s.rl.gold))})
  passed = all(r["interior"] and r["significant"] for r in rows)
  detail = "; ".join(f"{r['setting']}: {r['text']}" for r in rows)
  return Criterion("R2", passed, rows, DECLINE_THRESHOLD, detail, figure)


def r3(settings: Sequence[curves_lib.SettingCurves], figure: str) -> Criterion:
  rows = [{"setting": s.label, "alpha": s.fit_rl.alpha, "beta": s.fit_rl.beta,
           "r2": s.fit_rl.r2} for s in settings]
  passed = all(r["beta"] > 0 for r in rows)
  # Issue F's R3 is the sign of β alone; the fit's R² is reported beside it, not tested.
  return Criterion("R3", passed, rows, {"beta": "> 0"},
                   "d(α − β log d) fitted: β " + ", ".join(f"{r['beta']:.3f}" for r in rows)
                   + f"; lowest R² {min(r['r2'] for r in rows):.3f} (reported, not tested)",
                   figure)


def r4(settings: Sequence[curves_lib.SettingCurves], figure: str) -> Criterion:
  """RL's gold peak needs more KL than best-of-n's. A best-of-n curve whose gold is
  highest at its largest n has no peak to compare (its peak KL is only bounded below), and
  one highest at n = 1 never rose (a peak at KL 0, which any RL KL exceeds): neither size
  is evaluable, which fails the criterion (interior, as G1). An RL curve highest at its
  largest KL bounds its peak KL from below, which is enough for ">": it passes, marked.
  A trained RL run's KL can fall back late: highest at a last checkpoint below the run's
  largest KL bounds nothing, and that size is not evaluable."""
  rows = []
  for s in settings:
    k, j = int(np.argmax(s.bon.gold)), int(np.argmax(s.rl.gold))
    rl_last = j == len(s.rl.gold) - 1
    rows.append({"setting": s.label, "kl_peak_bon": float(s.bon.kl[k]),
                 "kl_peak_rl": float(s.rl.kl[j]),
                 "bon_peak_interior": 0 < k < len(s.bon.gold) - 1,
                 "rl_peak_interior": not rl_last,
                 "rl_peak_bounded": not rl_last or s.rl.kl[j] >= np.max(s.rl.kl)})
  passed = all(r["bon_peak_interior"] and r["rl_peak_bounded"]
               and r["kl_peak_rl"] > r["kl_peak_bon"] for r in rows)
  return Criterion("R4", passed, rows, "KL_peak(RL) > KL_peak(BoN) for every size",
                   ", ".join(f"{r['setting']}: RL {r['kl_peak_rl']:.1f} vs best-of-n "
                             f"{r['kl_peak_bon']:.1f} nats" + _r4_notes(r) for r in rows),
                   figure)


def _r4_notes(row: dict[str, Any]) -> str:
  notes = ""
  if not row["bon_peak_interior"]:
    notes += (" (best-of-n highest at n = 1: it never rose)" if row["kl_peak_bon"] == 0
              else " (best-of-n not peaked by its largest n)")
  if not row["rl_peak_bounded"]:
    notes += " (RL highest at its last checkpoint, below its largest KL: not evaluable)"
  elif not row["rl_peak_interior"]:
    notes += " (RL highest at its largest KL: a lower bound)"
  return notes


# --------------------------------------------------------------------------- C: ensembles


def c1(single: curves_lib.SettingCurves, ensembles: dict[str, curves_lib.SettingCurves],
       figure: str, *, label_noise: float | None = None, num_bootstrap: int = 1000
       ) -> Criterion:
  rows = {}
  for name in ("wco", "uwo"):
    e = ensembles[name]
    # "No decline" is a failure to find one, so the unadjusted z (the larger) is the
    # stricter side here: a peak-picked z of 2 already counts against the ensemble.
    drop, se = curves_lib.decline(e.bon, num_bootstrap=num_bootstrap)[:2]
    gain, gain_se = curves_lib.paired_difference(e.bon.per_prompt_gold[:, -1],
                                                 single.bon.per_prompt_gold[:, -1],
                                                 num_bootstrap=num_bootstrap)
    rows[name] = {"decline_z": drop / max(se, 1e-12), "gain_at_n_max": gain,
                  "gain_z": gain / max(gain_se, 1e-12)}
  passed = all(r["decline_z"] < 2.0 and r["gain_z"] >= 2.0 for r in rows.values())
  noise = "" if label_noise is None else f"at {label_noise:.0%} label noise: "
  return Criterion("C1", passed, rows, {"decline_z": "< 2", "gain_z": ">= 2"},
                   noise + "; ".join(f"{k}: decline {r['decline_z']:.1f} SE, "
                                     f"{r['gain_at_n_max']:+.2f} gold over the single proxy "
                                     f"at n_max ({r['gain_z']:.1f} SE)"
                                     for k, r in rows.items()), figure)


def c2(single: curves_lib.SettingCurves, ensembles: dict[str, curves_lib.SettingCurves],
       figure: str) -> Criterion:
  drops = {"single": curves_lib.decline(single.rl).drop}
  drops.update({k: curves_lib.decline(e.rl).drop for k, e in ensembles.items()})
  passed = all(drops[k] < drops["single"] for k in ("wco", "uwo"))
  return Criterion("C2", passed, drops, "drop(WCO), drop(UWO) < drop(single)",
                   ", ".join(f"{k} {v:.3f}" for k, v in drops.items()), figure)


def c3(growth: dict[str, np.ndarray], figure: str, *, num_bootstrap: int = 1000) -> Criterion:
  """``growth[name]``: [P, S] disagreement growth; compared at the largest n."""
  diff, se = curves_lib.paired_difference(growth["mean"][:, -1], growth["uwo"][:, -1],
                                          num_bootstrap=num_bootstrap)
  passed = diff >= 2.0 * se  # a NaN SE (one prompt) fails
  return Criterion("C3", passed, {"mean_minus_uwo": diff, "se": se}, ">= 2 SE",
                   f"member disagreement grows {diff:+.3f} ± {se:.3f} more under mean than "
                   "under UWO best-of-n at n_max", figure)
