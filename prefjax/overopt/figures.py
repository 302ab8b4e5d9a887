"""Figures of the overoptimization study (matplotlib `Figure`s outside pyplot, PNG).

Every figure plots seed-averaged means with ±1 bootstrap-SE bands over prompts,
gold solid and proxy dashed, x = √KL(π ‖ π_ref) in nats^½ as in Gao et al.
(2022, arXiv:2210.10760). Rewards are in gold / proxy standard deviations under
π_ref, shifted so that π_ref scores 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib
from matplotlib import figure as mpl_figure
from matplotlib import ticker
import numpy as np

from prefjax import files
from prefjax.overopt import bon
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import direct_criteria
from prefjax.overopt import fits

REWARD_UNITS = "reward (SD under π_ref, π_ref = 0)"
SQRT_KL = "√KL(π ‖ π_ref)  [nats^½]"
# Best-of-n over sampled responses: the analytic KL, which bounds the exact one from above.
SQRT_KL_BON_BOUND = "√(log n − (n−1)/n) ≥ √KL(π ‖ π_ref)  [nats^½]"
# One colour per method and per aggregation, the same in every panel and figure.
METHOD_COLORS = {"bon": "tab:blue", "rl": "tab:orange"}
AGGREGATION_COLORS = {"single": "black", "mean": "tab:blue", "wco": "tab:red",
                      "uwo": "tab:green"}
# Losses shown under their papers' names ("hinge" is SLiC's, Zhao et al. 2023).
DISPLAY_NAMES = {"hinge": "SLiC (hinge)", "dpo": "DPO", "ipo": "IPO"}


def _band(ax, x, mean, se, color, style="-", label=None):
  (line,) = ax.plot(x, mean, style, color=color, label=label, lw=1.6)
  ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.18, lw=0)


def _curve(ax, curve: bon.Curve, color, label, *, field="gold", style="-"):
  _band(ax, np.sqrt(curve.kl), getattr(curve, field), getattr(curve, f"{field}_se"), color,
        style, label)


def _fit_line(ax, fit: fits.Fit, d_max: float, color):
  d = np.linspace(0.0, d_max, 200)
  ax.plot(d, fits.predict(fit, d), ":", color=color, lw=1.2)
  if 0.02 * d_max < fit.peak_d <= d_max and fit.peak_value > 0:  # a peak inside the data
    ax.plot(fit.peak_d, fit.peak_value, "x", color=color, ms=6)


def _data_peak(ax, curve: bon.Curve, color):
  """A triangle on a curve's highest gold point, when it is neither the first nor the last
  (a rise and a fall seen)."""
  peak = int(np.argmax(curve.gold))
  if 0 < peak < len(curve.gold) - 1:
    ax.plot(np.sqrt(curve.kl[peak]), curve.gold[peak], "v", color=color, ms=6)


def _axes(ax, xlabel: str, ylabel: str, *, zero_line: bool = False, legend: bool = True,
          title: str | None = None, fontsize: int = 8) -> None:
  """Labels, grid and legend, the same on every panel."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if zero_line:
    ax.axhline(0.0, color="grey", lw=0.6)
  ax.grid(alpha=0.3)
  if legend:
    ax.legend(fontsize=fontsize, title=title)


def _plain_log_ticks(ax, which: str) -> None:
  """Log ticks labelled 0.5, 2, 100 (not 10^k) with unlabelled minor ticks (no "3×10⁻¹"
  clutter): at 1, 2, 5 × 10^k within two decades, so a narrow range still gets labels,
  and a few plain ones within a factor of 3."""
  low, high = ax.get_xlim() if which == "x" else ax.get_ylim()
  axis = ax.xaxis if which == "x" else ax.yaxis
  if high / low <= 3:  # no 1-2-5 tick inside: a few evenly spaced ones
    axis.set_major_locator(ticker.MaxNLocator(nbins=4))
  else:
    subs = (1.0, 2.0, 5.0) if high / low <= 100 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
  axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
  axis.set_minor_formatter(ticker.NullFormatter())


def _colors(n: int):
  return matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, n))


def _save(fig, path: str) -> str:
  return files.save_figure(fig, path, dpi=110)


def gold_and_proxy(settings: Sequence[curves_lib.SettingCurves], path: str, *,
                   title: str, rl_name: str = "RL (KL-regularised path)",
                   bon_xlabel: str = SQRT_KL) -> str:
  """Gao et al. Fig. 1: gold (with fits) and proxy vs √KL, BoN and RL, one line per setting.

  ``bon_xlabel`` names the best-of-n row's x axis: the exact √KL (the default, bandit
  worlds) or :data:`SQRT_KL_BON_BOUND` where the analytic KL stands in for it.
  """
  with_rl = settings[0].rl is not None
  fig = mpl_figure.Figure(figsize=(11, 8.5 if with_rl else 4.5))
  axes = fig.subplots(2 if with_rl else 1, 2, squeeze=False)
  for row, method in enumerate(["bon", "rl"][:2 if with_rl else 1]):
    name = "best-of-n" if method == "bon" else rl_name
    for s, color in zip(settings, _colors(len(settings))):
      curve = getattr(s, method)
      _curve(axes[row, 0], curve, color, s.label)
      _data_peak(axes[row, 0], curve, color)
      _fit_line(axes[row, 0], getattr(s, f"fit_{method}"), float(np.sqrt(curve.kl.max())), color)
      _curve(axes[row, 1], curve, color, s.label, field="proxy", style="--")
    axes[row, 0].set_title(f"{name}: gold (▼ peak), fit (dotted, × peak if in range)",
                           fontsize=10)
    axes[row, 1].set_title(f"{name}: proxy")
    for col, ax in enumerate(axes[row]):
      _axes(ax, bon_xlabel if method == "bon" else SQRT_KL, REWARD_UNITS, zero_line=True,
            legend=col == 0, title="proxy")
  fig.suptitle(title)
  return _save(fig, path)


def fit_coefficients(sizes: Sequence[float], settings: Sequence[curves_lib.SettingCurves],
                     path: str, *, xlabel: str, title: str) -> str:
  """Gao et al. Fig. 3: α and β (95% bootstrap CIs) of the BoN (and RL) fits vs size.

  Both α are gains per √nat, so they share a panel. The two β are not in the same units
  (best-of-n's d(α − βd): per nat; RL's d(α − β ln d): per √nat), so each has its own.
  """
  methods = ["bon"] + (["rl"] if settings[0].fit_rl is not None else [])
  panels = [("alpha", methods, "α (gain per √nat)"),
            ("beta", ["bon"], "best-of-n β (per nat, in d(α − β·d))")]
  if "rl" in methods:
    panels.append(("beta", ["rl"], "RL β (per √nat, in d(α − β·ln d))"))
  fig = mpl_figure.Figure(figsize=(5 * len(panels), 4))
  axes = fig.subplots(1, len(panels))
  for ax, (coef, panel_methods, ylabel) in zip(axes, panels):
    for method in panel_methods:
      fitted = [getattr(s, f"fit_{method}") for s in settings]
      value = np.array([getattr(f, coef) for f in fitted])
      lo, hi = np.array([getattr(f, f"{coef}_ci") for f in fitted], dtype=float).T
      # The bar is the interval itself: a percentile interval need not contain the
      # estimate. A missing CI (too few prompts to bootstrap) draws no bar.
      ax.errorbar(sizes, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", capsize=3,
                  color=METHOD_COLORS[method])
      ax.plot(sizes, value, marker="o" if method == "bon" else "s",
              color=METHOD_COLORS[method],
              label=f"{'best-of-n' if method == 'bon' else 'RL'} {coef}")
    ax.set_xscale("log", base=2)
    _axes(ax, xlabel, ylabel, zero_line=coef == "beta")
  fig.suptitle(f"{title} (error bars: 95% bootstrap CIs over prompts)")
  return _save(fig, path)


def ensembles(by_noise: dict[float, dict[str, curves_lib.SettingCurves]], path: str) -> str:
  """Coste et al.: single proxy vs mean / WCO / UWO, BoN and RL, one row per noise level."""
  noises = sorted(by_noise)
  fig = mpl_figure.Figure(figsize=(11, 4.2 * len(noises)))
  axes = fig.subplots(len(noises), 2, squeeze=False)
  for row, noise in enumerate(noises):
    for col, method in enumerate(("bon", "rl")):
      ax = axes[row, col]
      for name, s in by_noise[noise].items():
        _curve(ax, getattr(s, method), AGGREGATION_COLORS.get(name), name)
      ax.set_title(f"{'best-of-n' if method == 'bon' else 'RL path'}, "
                   f"{noise:.0%} label noise: gold")
      _axes(ax, SQRT_KL, REWARD_UNITS, zero_line=True, title="aggregation")
  return _save(fig, path)


def disagreement(growth: dict[str, np.ndarray], ns: np.ndarray, path: str, *,
                 title: str) -> str:
  """Member disagreement E_π[std_k r_k] − its π_ref value under BoN of each aggregation."""
  fig = mpl_figure.Figure(figsize=(6, 4))
  ax = fig.subplots()
  for name, g in growth.items():
    mean, se = bon.bootstrap_mean_se(g)
    _band(ax, ns, mean, se, AGGREGATION_COLORS.get(name), label=name)
  ax.set_xscale("log")
  ax.set_title(f"{title}\n(±1 SE over prompts)", fontsize=10)
  _axes(ax, "n (best-of-n)", "Δ member std under π  [proxy SD]", title="optimised aggregation")
  return _save(fig, path)


def estimator_check(check: dict, path: str) -> str:
  """G0: exact best-of-n gold vs the unbiased estimator and Monte Carlo, and each one's
  difference from exact with its ±1 bootstrap SE over prompts (what G0's z divides by)."""
  fig = mpl_figure.Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  styles = {"exact": "k-", "unbiased": "o--", "mc": "s:"}
  for name, style in styles.items():
    axes[0].plot(check["ns"], check[f"{name}_gold"], style, label=name)
  for name in ("unbiased", "mc"):
    if f"{name}_minus_exact" in check:
      axes[1].errorbar(check["ns"], check[f"{name}_minus_exact"],
                       yerr=check[f"{name}_minus_exact_se"], fmt=styles[name], capsize=2,
                       label=f"{name} − exact (max |z| {check[f'z_{name}_vs_exact']:.2f})")
  where = f", world {check['world']}" if "world" in check else ""
  axes[0].set_title("gold of best-of-n by estimator")
  axes[1].set_title("difference from exact, ±1 SE over prompts")
  for ax in axes:
    ax.set_xscale("log", base=2)
  _axes(axes[0], "n (best-of-n)", "gold " + REWARD_UNITS)
  _axes(axes[1], "n (best-of-n)", "gold difference", zero_line=True)
  fig.suptitle(f"Best-of-n estimators against exact (G0; smallest proxy, member seed 0{where})")
  return _save(fig, path)


def learned_policy(rows: Sequence[dict], path: str) -> str:
  """Learned softmax-MLP policy vs the closed-form KL-regularised optimum at the same λ."""
  fig = mpl_figure.Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  for ax, key in zip(axes, ("kl", "gold")):
    lams = [r["lam"] for r in rows]
    ax.plot(lams, [r[f"closed_form_{key}"] for r in rows], "ko", label="closed form")
    ax.plot(lams, [r[f"learned_{key}"] for r in rows], "rs", label="learned MLP policy")
    ax.set_xscale("log")  # a tick at each λ, markers clear of the frame (two λs: 0.3, 1)
    ax.set_xlim(min(lams) / 1.6, max(lams) * 1.6)
    ax.set_xticks(sorted(set(lams)), [f"{lam:g}" for lam in sorted(set(lams))])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title("KL(π ‖ π_ref)" if key == "kl" else "gold")
    _axes(ax, "KL penalty λ", "KL [nats]" if key == "kl" else "gold " + REWARD_UNITS)
  fig.suptitle("RL with a learned policy vs the exact KL-regularised optimum")
  return _save(fig, path)


def direct_sweeps(sweeps: dict, path: str) -> str:
  """Rafailov et al. 2024: per loss, gold vs √KL over training (one line per β) and the
  final points across β with the d(α − β log d) and quadratic-in-KL fits."""
  fig = mpl_figure.Figure(figsize=(5 * len(sweeps), 8.5))
  axes = fig.subplots(2, len(sweeps), squeeze=False)
  for col, (name, sweep) in enumerate(sweeps.items()):
    ax = axes[0, col]
    for k, color in zip(range(len(sweep.betas)), _colors(len(sweep.betas))):
      ax.plot(np.sqrt(sweep.kl[k]), sweep.gold[k], "-", color=color, lw=1.2,
              label=f"β={sweep.betas[k]:.3g}")
      ax.plot(np.sqrt(sweep.kl[k, -1]), sweep.gold[k, -1], "o", color=color, ms=4)
    shown = DISPLAY_NAMES.get(name, name)
    ax.set_title(f"{shown}: training trajectories (● = end)")
    ax = axes[1, col]
    d, gold, per_kl, per_gold = direct_criteria.final_curve(sweep)
    _, se = bon.bootstrap_mean_se(per_gold)
    ax.errorbar(d, gold, yerr=se, fmt="ko", capsize=3, label="final points ±1 SE")
    grid = np.linspace(0.0, d.max() * 1.05, 200)
    rl = fits.fit_rl(d, gold, num_bootstrap=0)
    quad = fits.fit_quadratic_kl(d * d, gold, num_bootstrap=0)
    ax.plot(grid, fits.predict(rl, grid), "-", color="tab:red",
            label=f"d(α − β log d), RMSE {rl.rmse:.2g}")
    ax.plot(grid, fits.predict(quad, grid), "--", color="tab:blue",
            label=f"α·KL − β·KL², RMSE {quad.rmse:.2g}")
    ax.set_title(f"{shown}: gold vs √KL across β")
    for ax in axes[:, col]:
      _axes(ax, SQRT_KL, REWARD_UNITS, zero_line=True, fontsize=7)
  return _save(fig, path)


def margins(dpo, ipo, path: str) -> str:
  """Azar et al. 2023: mean log-ratio margin h on the training pairs over training."""
  fig = mpl_figure.Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  for ax, sweep, name in ((axes[0], dpo, "DPO"), (axes[1], ipo, "IPO")):
    for k, color in zip(range(len(sweep.betas)), _colors(len(sweep.betas))):
      # From the first evaluation after step 0, where h = 0 has no place on a log axis.
      ax.plot(sweep.steps[1:], sweep.margin[k, 1:], "-", color=color,
              label=f"β={sweep.betas[k]:.3g}")
      if name == "IPO":
        ax.axhline(1.0 / (2.0 * sweep.betas[k]), color=color, ls=":", lw=1)
    ax.set_yscale("log")
    _plain_log_ticks(ax, "y")
    _axes(ax, "training step", "mean margin h = Δ log π/π_ref  [nats]", fontsize=7)
    ax.set_title(f"{name} on deterministic preferences" + (" (dotted: 1/(2β))"
                                                         if name == "IPO" else ""))
  return _save(fig, path)


def frontier(dpo, ppo, path: str, *, rl_label: str = "KL-regularised RL optimum (proxy)",
             rl_style: str = "k-", others: Sequence[tuple[Any, str, str]] = ()) -> str:
  """Rafailov et al. 2023, Fig. 2: gold vs KL, DPO (every evaluation) vs RL; ``others``:
  more RL references as ``(scores, label, style)``. A run's checkpoints are drawn as
  markers (``rl_style="ko"``): joined in step order they would look like a frontier.
  Dotted verticals are P1's KL bins."""
  fig = mpl_figure.Figure(figsize=(6.5, 4.5))
  ax = fig.subplots()
  se = lambda per_prompt: per_prompt.std(0, ddof=1) / np.sqrt(per_prompt.shape[0])  # [P, …]
  for scores, label, style in ((ppo, rl_label, rl_style), *others):
    kl, gold = np.asarray(scores.kl), np.asarray(scores.gold)
    shown = kl.mean(0) > 0  # π_ref itself (KL 0) has no place on the log axis; a line to it
    ax.errorbar(kl.mean(0)[shown], gold.mean(0)[shown], yerr=se(gold)[shown], fmt=style,
                capsize=2, label=label)                      # would run flat off the left edge
  dpo_se = se(np.moveaxis(np.asarray(dpo.per_prompt_gold), -1, 0))  # [β, steps]
  for k, color in zip(range(len(dpo.betas)), _colors(len(dpo.betas))):
    ax.errorbar(dpo.kl[k, 1:], dpo.gold[k, 1:], yerr=dpo_se[k, 1:], fmt=".", color=color,
                ms=4, elinewidth=0.6, label=f"DPO β={dpo.betas[k]:.3g}")
  ax.set_xscale("log")
  low, high = ax.get_xlim()
  for edge in direct_criteria.P1_KL_EDGES:
    if low < edge < high:
      ax.axvline(edge, color="grey", ls=":", lw=0.5)
  _plain_log_ticks(ax, "x")  # 0.001, 1, 100 (ScalarFormatter would print 0.001 as "0.00")
  _axes(ax, "KL(π ‖ π_ref)  [nats]", "gold " + REWARD_UNITS, fontsize=7)
  ax.set_title("Reward–KL frontier: DPO vs RL against a learned proxy\n(±1 SE over prompts; "
               "dotted: P1's KL bins)", fontsize=10)
  return _save(fig, path)
