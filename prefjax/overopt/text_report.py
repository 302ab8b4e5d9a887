"""Curves, criteria and figures of the text world (``experiments/text_study.py``).

The text world carries the direct-alignment results (D1, D2: DPO / IPO / SLiC
trained by ``train_dpo`` on gold-labelled pairs of π_ref samples; P1: DPO vs RL
trained by ``train_rl`` against a learned proxy) and repeats Gao et al.'s
best-of-n and RL results with transformer proxies trained by ``train_rm``
(criteria suffixed ``-text``). Every number is in gold standard deviations under
π_ref, with π_ref at 0; standard errors bootstrap over the held-out prompts.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping, Sequence

import numpy as np

from prefjax.data import tiny_world
from prefjax.overopt import bon
from prefjax.overopt import criteria as C
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import direct_criteria
from prefjax.overopt import direct_study
from prefjax.overopt import exact
from prefjax.overopt import figures
from prefjax.overopt import text_world

WORLD = "text"


def bon_curve(samples: Mapping[str, np.ndarray], scales: Mapping[str, text_world.GoldScale],
              proxy_name: str, num_points: int, num_bootstrap: int) -> bon.Curve:
  """Unbiased best-of-n estimate over the ``[P, N]`` π_ref samples of ``best_of_n``
  (KL = log n − (n−1)/n), in standardised units, each prompt relative to its own π_ref
  mean (as the RL trajectories are), so the prompt bootstrap sees only the gains."""
  proxy = scales[proxy_name](samples["proxy"])
  gold = scales["gold"](samples["gold"])
  ns = bon.log_spaced_ns(proxy.shape[1], num_points)
  return bon.unbiased_best_of_n(proxy - proxy.mean(axis=1, keepdims=True),
                                gold - gold.mean(axis=1, keepdims=True), ns,
                                num_bootstrap=num_bootstrap)


def trajectory_curve(traj: text_world.Trajectory, proxy_name: str,
                     num_bootstrap: int) -> bon.Curve:
  """A training run's checkpoints as a curve (knob = step)."""
  pp = traj.per_prompt
  return bon.summarize(traj.steps, pp["kl"].T, pp[proxy_name].T, pp["gold"].T,
                       num_bootstrap=num_bootstrap)


def setting(label: str, bon_c: bon.Curve, rl_c: bon.Curve | None,
            num_bootstrap: int) -> curves_lib.SettingCurves:
  return curves_lib.SettingCurves(
      label, bon_c, rl_c, [bon_c], curves_lib.fit_curve("bon", bon_c, num_bootstrap),
      None if rl_c is None else curves_lib.fit_curve("rl", rl_c, num_bootstrap))


def daa_sweep(loss: str, runs: Mapping[float, text_world.Trajectory]) -> direct_study.DaaSweep:
  """The runs of one loss across β as a ``DaaSweep`` (no margins: D3 lives in the bandit)."""
  betas = np.array(sorted(runs))
  trajs = [runs[b] for b in betas]
  kl = text_world.sweep_arrays(trajs, "kl")
  gold = text_world.sweep_arrays(trajs, "gold")
  return direct_study.DaaSweep(
      loss=loss, betas=betas, steps=trajs[0].steps, kl=kl.mean(-1), gold=gold.mean(-1),
      margin=np.full(kl.shape[:2], np.nan), per_prompt_kl=kl, per_prompt_gold=gold,
      wall_s=np.zeros(len(betas)))


def as_scores(traj: text_world.Trajectory, proxy_name: str) -> exact.ExactScores:
  """A trajectory as ``[P, T]`` per-prompt scores (the RL side of P1)."""
  pp = traj.per_prompt
  return exact.ExactScores(pp[proxy_name].T, pp["gold"].T, pp["kl"].T,
                           np.ones_like(pp["kl"].T))


# Criteria the text world carries when it runs (the bandit world's are then "R2-bandit" …).
# R2 is about a learned RL policy (Gao et al.'s PPO): the text world trains one with
# train_rl, while the bandit world's exact path reaches each proxy's argmax within its
# KL ceiling (README, "Reproducing the papers"). The others need train_dpo's policies.
CARRIES = ("R2", "D1", "D2", "P1", "P1_kl_matched")


def p1_reference(algorithms) -> str:
  """The RL run P1 compares DPO with: PPO, Rafailov et al. 2023's algorithm and issue F's
  definition, when the world ran it; otherwise its RL arm. The others get suffixed
  criteria (``P1_rloo``)."""
  names = list(algorithms)
  return "ppo" if "ppo" in names else names[0]


def _renamed(c: C.Criterion, base: str, world: str = WORLD) -> C.Criterion:
  c.name, c.world = (base if base in CARRIES else f"{base}-{world}"), world
  return c


def _figures(fig_dir: str, world: str, title: str, policy: str, cfg: Any, widths: list,
             bon_settings: list, rl_settings: list, sweeps: dict, rl_arm: exact.ExactScores,
             others: dict, rl_width: int) -> dict[str, str]:
  """Draws the text world's figures; returns their paths relative to the workdir."""
  path = lambda name: os.path.join(fig_dir, name.replace("text_", f"{world}_", 1))
  algo = str(cfg.rl.algorithm).upper()
  figs = {
      "text_bon": figures.gold_and_proxy(
          bon_settings, path("text_bon_sizes.png"),
          title=f"{title}: best-of-n of {policy} by proxy width (±1 SE)",
          bon_xlabel=figures.SQRT_KL_BON_BOUND),
      "text_fits": figures.fit_coefficients(widths, bon_settings, path("text_fit_sizes.png"),
                                            xlabel="proxy width (hidden units)",
                                            title=f"{title}: best-of-n fit vs proxy size"),
      "text_rl": figures.gold_and_proxy(
          rl_settings, path("text_rl.png"), rl_name=f"{algo} along training",
          bon_xlabel=figures.SQRT_KL_BON_BOUND,
          title=f"{title}: best-of-n and {algo} (train_rl) against the same proxies"),
  }
  if sweeps:
    figs["text_direct"] = figures.direct_sweeps(sweeps, path("text_daa_gold_vs_kl.png"))
  if "dpo" in sweeps:
    figs["text_frontier"] = figures.frontier(
        sweeps["dpo"], rl_arm, path("text_dpo_vs_rl_frontier.png"),
        rl_label=f"{algo} against proxy w{rl_width} (checkpoints)", rl_style="ko",
        others=[(scores, f"{name.upper()} against proxy w{rl_width} (checkpoints)", style)
                for (name, scores), style in zip(others.items(), ("bs", "m^", "cv"))])
  return {k: os.path.join("figures", os.path.basename(v)) for k, v in figs.items()}


def text_criteria(results: Mapping[str, Any], cfg: Any, fig_dir: str | None, *,
                  num_bootstrap: int = 1000, world: str = WORLD, title: str = "Text world",
                  policy: str = "the SFT policy") -> tuple[list[C.Criterion], dict[str, str],
                                                          dict[str, Any]]:
  """Figures and criteria of the text world (or another world run by
  ``experiments/text_study.py``: ``world`` suffixes criteria and names figures, ``title``
  and ``policy`` go in figure titles); also returns the curves for the report.
  ``fig_dir`` None: the criteria alone, no figures drawn."""
  scales, widths = results["scales"], list(results["widths"])
  points = int(cfg.bon.num_points)
  bon_settings = [setting(f"w{w}", bon_curve(results["bon"][w], scales, f"proxy_w{w}", points,
                                             num_bootstrap), None, num_bootstrap)
                  for w in widths]
  rl_settings = [setting(f"w{w}", bon_settings[widths.index(w)].bon,
                         trajectory_curve(traj, f"proxy_w{w}", num_bootstrap), num_bootstrap)
                 for w, traj in sorted(results["rl"].items())]
  sweeps = {}
  for (loss, beta), traj in results["dpo"].items():
    sweeps.setdefault(loss, {})[beta] = traj
  sweeps = {loss: daa_sweep(loss, runs) for loss, runs in sweeps.items()}
  rl_width = max(results["rl"])
  rl_arm = as_scores(results["rl"][rl_width], f"proxy_w{rl_width}")
  # More RL runs against the same proxy (rl.frontier_algorithms): PPO is P1's reference.
  others = {name: as_scores(traj, f"proxy_w{rl_width}")
            for name, traj in results.get("rl_frontier", {}).items()}
  rel = collections.defaultdict(str)
  if fig_dir is not None:
    rel.update(_figures(fig_dir, world, title, policy, cfg, widths, bon_settings, rl_settings,
                        sweeps, rl_arm, others, rl_width))
  smallest = bon_settings[:min(2, len(bon_settings))]
  found = [
      _renamed(C.g1(smallest, rel["text_bon"], num_bootstrap=num_bootstrap), "G1", world),
      _renamed(C.g2(bon_settings, rel["text_bon"]), "G2", world),
      _renamed(C.g3(widths, bon_settings, rel["text_fits"]), "G3", world),
      _renamed(C.r2(rl_settings[:1], rel["text_rl"], num_bootstrap=num_bootstrap), "R2", world),
      _renamed(C.r4(rl_settings, rel["text_rl"]), "R4", world),
  ]
  curves = {"bon": bon_settings, "rl": rl_settings, "sweeps": sweeps}
  if not sweeps:
    return found, dict(rel), curves
  for name, r in direct_criteria.every_loss(sweeps, num_bootstrap=num_bootstrap).items():
    found.append(C.Criterion(name, r["pass"], r["value"], r["threshold"], r["detail"],
                             rel["text_direct"], world=world))
  if "dpo" in sweeps:
    references = {str(cfg.rl.algorithm).lower(): rl_arm, **others}
    p1_algo = p1_reference(references)
    for algo, reference in references.items():
      suffix = "" if algo == p1_algo else f"_{algo}"
      for name, match in (("P1", "bin"), ("P1_kl_matched", "interpolate")):
        r = direct_criteria.criterion_p1(sweeps["dpo"], reference, match=match,
                                         num_bootstrap=num_bootstrap)
        found.append(C.Criterion(name + suffix, r["pass"], r["value"], r["threshold"],
                                 r["detail"], rel["text_frontier"], world=world))
  return found, dict(rel), curves


def report_section(results: Mapping[str, Any], curves: Mapping[str, Any],
                   figs: Mapping[str, str], *, heading: str = "## The text world",
                   intro: str | None = None) -> list[str]:
  """Markdown of the text world (or of ``heading`` described by ``intro``): what was run,
  proxies, fits, figures."""
  md = [heading, "", intro or _text_intro(results), "",
        "| proxy width | held-out pair accuracy | BoN α | BoN β | R² | training s |",
        "|---:|---:|---:|---:|---:|---:|"]
  for stats, s in zip(results["proxy_stats"], curves["bon"]):
    md.append(f"| {stats['width']} | {stats.get('accuracy', float('nan')):.3f} | "
              f"{s.fit_bon.alpha:.3f} | {s.fit_bon.beta:.3f} | {s.fit_bon.r2:.3f} | "
              f"{stats.get('wall_s', 0):.0f} |")
  md.append("")
  for key in ("text_bon", "text_rl", "text_direct", "text_frontier"):
    if key in figs:
      md += [f"![{key}]({figs[key]})", ""]
  return md


def _gold_description(world: Mapping[str, Any]) -> str:
  if world.get("gold") == "teacher":
    size = len(world.get("alphabet", tiny_world.ALPHABET))
    return (f"a random tanh teacher network ({size} + {size * size} → "
            f"{world.get('teacher_hidden', 256)} → {world.get('teacher_hidden', 256)} → 1, "
            f"weight scale {world.get('teacher_scale', 1.5):g}) of the response's character and "
            "adjacent-pair frequencies + echo bonus")
  gold = "mean character score + echo bonus"
  if world.get("repeat_penalty"):
    gold += (f" − a penalty on any character past {world['repeat_threshold']:.0%} of the "
             f"response (×{world['repeat_penalty']:g}, squared)")
  return gold


def _text_intro(results: Mapping[str, Any]) -> str:
  pairs, world = results["pairs"], results["world"]
  return ("A byte-level decoder SFT'd by `train_sft` on the tiny text world is π_ref. Gold: "
          f"{_gold_description(world)}. Proxies: decoder reward "
          f"models trained by `train_rm` on {pairs_text(pairs)}. Best-of-n by `best_of_n`, RL "
          "by `train_rl`, the DPO family by `train_dpo` on the same pairs; every RL and DPO "
          "checkpoint sampled on the same held-out prompts with the same key"
          + (", each world its own" if "num_pairs_per_world" in pairs else "") + ".")


def pairs_text(pairs: Mapping[str, Any]) -> str:
  """The proxies' training pairs: a pooled study's per world (each trained its own)."""
  per_world = pairs.get("num_pairs_per_world")
  if per_world is None:
    return (f"{pairs['num_pairs']} gold-labelled pairs of π_ref samples "
            f"(dropped: {pairs['skipped']})")
  return (f"{min(per_world)}–{max(per_world)} gold-labelled pairs of π_ref samples in each "
          f"of {len(per_world)} pooled worlds, its own proxies trained on its own pairs "
          f"({per_world}; dropped in all: {pairs['skipped']})")
