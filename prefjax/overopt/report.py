"""Criteria, figures and the written report of the overoptimization study.

``bandit_criteria`` turns a ``study.BanditResults`` into figures under
``workdir/figures`` and a list of ``criteria.Criterion``; ``write_report``
writes ``report.json`` (one entry per criterion plus the run's facts) and
``report.md`` (figures embedded, one paragraph per result: what the paper
expects, what this run saw).
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import numpy as np

from prefjax import files
from prefjax.overopt import criteria as C
from prefjax.overopt import direct_criteria
from prefjax.overopt import figures
from prefjax.overopt import study as study_lib
from prefjax.train import summary as summary_lib

EXPECTED = {
    "G0": "Estimator sanity: the proxy under best-of-n cannot fall as n grows; the unbiased "
          "estimator and brute-force Monte Carlo agree with exact best-of-n; the exact KL of "
          "best-of-n is below the analytic log n − (n−1)/n (Beirami et al. 2024).",
    "G1": "Gao et al. 2022, Fig. 1: for small proxies, gold under best-of-n peaks at an interior n "
          "and then falls while the proxy keeps rising.",
    "G2": "Gao et al. 2022, Eq. 1: gold under best-of-n follows d(α − βd), d = √KL.",
    "G3": "Gao et al. 2022, Fig. 3: larger proxies overoptimise less (β falls with size) and "
          "reach a higher gold peak.",
    "G5": "Gao et al. 2022, §3.4: more proxy training data gives higher gold at a fixed n.",
    "R1": "Along the RL path π_β ∝ π_ref·exp(β·r_proxy), KL and the proxy rise monotonically.",
    "R2": "Gao et al. 2022, Fig. 1b: gold under RL peaks then falls for small proxies.",
    "R3": "Gao et al. 2022, Eq. 2: gold under RL fitted by d(α − β log d) has β > 0.",
    "R4": "Gao et al. 2022, §3.2: RL uses more KL than best-of-n to reach its gold peak.",
    "C1": "Coste et al. 2023: with label noise (25% in the paper; {label_noise} in this run), "
          "WCO and UWO ensembles remove the best-of-n decline and beat a single proxy at "
          "large n.",
    "C2": "Coste et al. 2023: under RL the ensembles' gold drop after the peak is smaller than "
          "a single proxy's.",
    "C3": "Coste et al. 2023: optimising the ensemble mean drives the policy where members "
          "disagree; UWO's variance penalty holds disagreement down.",
    "D1": "Rafailov et al. 2024: for DPO, IPO and SLiC, gold vs d = √KL across β is a hump "
          "(interior maximum) that d(α − β log d) fits better than a quadratic in KL.",
    "D2": "Rafailov et al. 2024: at small β gold peaks early in training while KL keeps rising.",
    "D3": "Azar et al. 2023: on deterministic preferences DPO's log-ratio margin grows without "
          "bound while IPO's settles at its target 1/(2β).",
    "P1": "Rafailov et al. 2023, Fig. 2: DPO's reward–KL frontier is at least as good as RL's.",
    "P1_kl_matched": "P1 compared at matched KL (the RL curve interpolated to each DPO "
                     "point's KL) instead of in KL bins.",
    "P1_rloo": "P1 against RLOO (the study's own RL arm, trained against the same proxy on as "
               "many samples per step as PPO): a stricter reference than issue F's PPO.",
    "P1_kl_matched_rloo": "P1_rloo compared at matched KL (RLOO's checkpoints interpolated to "
                          "each DPO point's KL).",
}


# What P1's RL reference is, by the world that ran it.
P1_REFERENCE = {
    "bandit": "In the bandit world the reference is the exact KL-regularised optimum against "
              "a proxy trained on the same pairs.",
    "text": "In the text world the reference is PPO (train_rl, the paper's algorithm) trained "
            "against the widest RL proxy when the world runs it, else the world's RL arm; every "
            "checkpoint is a point.",
}


def expected(name: str, world: str = "", *, label_noise: float | None = None) -> str:
  """What the paper expects for criterion ``name`` (``G1-text``: as G1, in the text world),
  run in ``world`` (a ``Criterion.world``); ``label_noise``: the ensembles' noise level
  that C1 was measured at (None: not known)."""
  base = name.partition("-")[0]
  text = EXPECTED.get(name) or EXPECTED.get(base, "")
  noise = "not recorded" if label_noise is None else f"{label_noise:.0%}"
  text = text.replace("{label_noise}", noise)
  if base in ("P1", "P1_kl_matched"):
    text += " " + P1_REFERENCE.get(world.split()[0] if world else "", "")
  return text.strip()


def coste_noise(results: study_lib.BanditResults) -> float:
  """The label noise that C1 and C3 (and their figures) are measured at: the highest."""
  return max(results.ensembles)


def bandit_criteria(results: study_lib.BanditResults, fig_dir: str, *, smallest: int = 2,
                    n_fixed: int = 1000, num_bootstrap: int = 1000
                    ) -> tuple[list[C.Criterion], dict[str, str]]:
  """Draws the bandit-world figures and evaluates G0–G5, R1–R4, C1–C3; G1 and R2 look at
  the ``smallest`` widths (1 ≤ smallest ≤ number of widths), G5 at best-of-n n ≈ ``n_fixed``;
  standard errors bootstrap ``num_bootstrap`` resamples of the prompts."""
  if not 1 <= smallest <= len(results.sizes):
    raise ValueError(f"smallest={smallest} must be in [1, {len(results.sizes)}] (the number "
                     "of proxy widths)")
  path = lambda name: os.path.join(fig_dir, name)
  pooled = (f"pooled over {len(results.per_world)} bandit worlds, "
            if len(results.per_world) > 1 else "bandit world, ")
  figs = {
      "gao_fig1": figures.gold_and_proxy(results.sizes, path("gao_fig1_sizes.png"),
                                         title=f"Gold and proxy vs √KL by proxy width ("
                                               f"{pooled}±1 SE over prompts, worlds fixed)"),
      "gao_fig3_size": figures.fit_coefficients(results.widths, results.sizes,
                                                path("gao_fig3_size.png"),
                                                xlabel="proxy width (hidden units)",
                                                title="Fit coefficients vs proxy size"),
      "data_curves": figures.gold_and_proxy(results.data, path("data_size_curves.png"),
                                            title="Best-of-n by proxy training pairs"),
      "gao_fig3_data": figures.fit_coefficients(results.data_sizes, results.data,
                                                path("gao_fig3_data.png"),
                                                xlabel="proxy training pairs",
                                                title="Best-of-n fit coefficients vs data size"),
      "coste": figures.ensembles(results.ensembles, path("coste_ensembles.png")),
      "estimators": figures.estimator_check(results.estimator_checks[0],
                                            path("estimator_check.png")),
  }
  noisy = coste_noise(results)
  figs["disagreement"] = figures.disagreement(
      results.disagreement[noisy], _disagreement_ns(results.ns), path("disagreement.png"),
      title=f"Member disagreement under best-of-n ({noisy:.0%} label noise)")
  if results.learned_policy:
    figs["learned_policy"] = figures.learned_policy(results.learned_policy,
                                                    path("learned_policy.png"))
  rel = {k: os.path.join("figures", os.path.basename(v)) for k, v in figs.items()}
  out = _criteria(results, results.sizes, results.data, results.ensembles[noisy],
                  results.disagreement[noisy], results.estimator_checks, rel,
                  smallest=smallest, n_fixed=n_fixed, num_bootstrap=num_bootstrap)
  if results.direct is not None:
    direct_found, direct_figs = direct_stage_criteria(results.direct, fig_dir,
                                                      num_bootstrap=num_bootstrap)
    out += direct_found
    rel.update(direct_figs)
  return out, rel


def direct_stage_criteria(direct: dict, fig_dir: str, *, num_bootstrap: int = 1000
                          ) -> tuple[list[C.Criterion], dict[str, str]]:
  """D1–D3 and P1 from the DPO-family sweeps (``study.direct_study_results``)."""
  sweeps = direct["sweeps"]
  figs = {"direct": figures.direct_sweeps(sweeps, os.path.join(fig_dir, "daa_gold_vs_kl.png"))}
  d3 = direct["d3_sweeps"]
  figs["margins"] = figures.margins(d3["dpo"], d3["ipo"], os.path.join(fig_dir, "daa_margins.png"))
  if "dpo" in sweeps:
    figs["frontier"] = figures.frontier(sweeps["dpo"], direct["ppo"],
                                        os.path.join(fig_dir, "dpo_vs_rl_frontier.png"))
  rel = {k: os.path.join("figures", os.path.basename(v)) for k, v in figs.items()}
  figure_of = {"D1": "direct", "D2": "direct", "D3": "margins", "P1": "frontier",
               "P1_kl_matched": "frontier"}
  found = []
  for name, r in direct_criteria.criteria(sweeps, direct["ppo"], d3_sweeps=d3,
                                          num_bootstrap=num_bootstrap).items():
    found.append(C.Criterion(name, r["pass"], r["value"], r["threshold"], r["detail"],
                             rel.get(figure_of[name], ""), world="bandit (first world)"))
  return found, rel


def _disagreement_ns(ns: np.ndarray) -> np.ndarray:
  return ns[np.linspace(0, len(ns) - 1, 9).round().astype(int)]


def _fit_table(settings, name: str) -> list[str]:
  """α, β (95% CI), R² and the fitted peak d* of each setting's fits; a d* past the data's
  largest d, or none at all (β ≤ 0), says the fit has no peak within the data."""
  lines = [f"| {name} | α_bon | β_bon [95% CI] | R²_bon | d*_bon | α_RL | β_RL [95% CI] | "
           "R²_RL | d*_RL | peak gold (BoN) | peak n |", "|---|---|---|---|---|---|---|---|---|"
           "---|---|"]
  for s in settings:
    rl = s.fit_rl
    rl_cols = _fit_cols(rl, s.rl) if rl is not None else "– | – | – | –"
    peak = int(np.argmax(s.bon.gold))
    lines.append(f"| {s.label} | {_fit_cols(s.fit_bon, s.bon)} | {rl_cols} | "
                 f"{s.bon.gold[peak]:.3f} ± {s.bon.gold_se[peak]:.3f} | "
                 f"{s.bon.knob[peak]:.0f} |")
  return lines


def _fit_cols(fit, curve) -> str:
  lo, hi = fit.beta_ci
  ci = "[–]" if np.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"
  return (f"{fit.alpha:.3f} | {fit.beta:.3f} {ci} | {fit.r2:.3f} | "
          f"{peak_text(fit.peak_d, float(np.sqrt(np.max(curve.kl))))}")


def peak_text(peak_d: float, d_max: float) -> str:
  """The fitted peak d* for a table: "none" when unbounded, marked when past the data."""
  if not np.isfinite(peak_d):
    return "none"
  return f"{peak_d:.3g}" + (f" (> data's max d {d_max:.2f})" if peak_d > d_max else "")


def _proxy_table(stats: Sequence[dict]) -> list[str]:
  lines = ["| world | setting | gold accuracy (held-out π_ref pairs) | train accuracy | "
           "train loss |", "|---|---|---|---|---|"]
  for r in stats:
    lines.append(f"| {r['world']} | {r['setting']} | {np.mean(r['gold_accuracy']):.3f} "
                 f"(min {np.min(r['gold_accuracy']):.3f}) | {np.mean(r['train_accuracy']):.3f} "
                 f"| {np.mean(r['train_loss']):.3f} |")
  return lines


def _criteria(results: study_lib.BanditResults, sizes: Sequence, data: Sequence,
              ensembles: dict, disagreement: dict, checks: Sequence[dict],
              rel: dict[str, str], *, smallest: int, n_fixed: int,
              num_bootstrap: int) -> list[C.Criterion]:
  """G0–G5, R1–R4 and C1–C3 on one set of curves (pooled, or one world's)."""
  noisy = coste_noise(results)
  ens = {k: v for k, v in ensembles.items() if k != "single"}
  return [
      C.g0(sizes, checks, rel["estimators"]),
      C.g1(sizes[:smallest], rel["gao_fig1"], num_bootstrap=num_bootstrap),
      C.g2(sizes, rel["gao_fig1"]),
      C.g3(results.widths, sizes, rel["gao_fig3_size"]),
      C.g5(results.data_sizes, data, n_fixed, rel["data_curves"]),
      C.r1(sizes, rel["gao_fig1"]),
      C.r2(sizes[:smallest], rel["gao_fig1"], num_bootstrap=num_bootstrap),
      C.r3(sizes, rel["gao_fig3_size"]),
      C.r4(sizes, rel["gao_fig1"]),
      C.c1(ensembles["single"], ens, rel["coste"], label_noise=noisy,
           num_bootstrap=num_bootstrap),
      C.c2(ensembles["single"], ens, rel["coste"]),
      C.c3(disagreement, rel["disagreement"], num_bootstrap=num_bootstrap),
  ]


def world_criteria(results: study_lib.BanditResults, *, smallest: int = 2,
                   n_fixed: int = 1000, num_bootstrap: int = 1000
                   ) -> dict[int, list[C.Criterion]]:
  """The bandit criteria in each world on its own (world seed -> criteria, no figures).

  The pooled criteria bootstrap over the prompts of all worlds, which treats the worlds'
  teachers and proxies as fixed; a criterion that fails in some world rests on the draw
  of the others.
  """
  noisy = coste_noise(results)
  no_figures = collections.defaultdict(str)
  return {seed: _criteria(results, w.sizes, w.data, w.ensembles[noisy],
                          w.disagreement[noisy], [w.estimator_check], no_figures,
                          smallest=smallest, n_fixed=n_fixed, num_bootstrap=num_bootstrap)
          for seed, w in (results.worlds or {}).items()}


def world_table(found: Sequence[C.Criterion], by_world: dict[int, list[C.Criterion]],
                world: str = "bandit") -> list[str]:
  """Pooled verdict beside each world seed's, for the criteria of ``world``."""
  base = lambda name: name.removesuffix(f"-{world}")  # noqa: E731
  pooled = {base(c.name): c.passed for c in found if c.world == world}
  seeds = list(by_world)
  word = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
  lines = ["| criterion | pooled | " + " | ".join(f"world {s}" for s in seeds) + " |",
           "|---" * (2 + len(seeds)) + "|"]
  for i, c in enumerate(by_world[seeds[0]]):
    name = base(c.name)
    cells = [word(by_world[s][i].passed) for s in seeds]
    lines.append(f"| {name} | {word(pooled[name]) if name in pooled else '–'} | "
                 + " | ".join(cells) + " |")
  return lines


def world_line(found: Sequence[C.Criterion], by_world: dict[int, list[C.Criterion]],
               world: str = "bandit") -> str:
  """How many criteria of ``world`` that pass pooled also pass in every world seed."""
  base = lambda name: name.removesuffix(f"-{world}")  # noqa: E731
  failing: dict[str, list[str]] = {}
  for seed, criteria in by_world.items():
    for c in criteria:
      if not c.passed:
        failing.setdefault(base(c.name), []).append(str(seed))
  names = {base(c.name) for c in next(iter(by_world.values()))}
  pooled = [c for c in found if c.world == world and c.passed and base(c.name) in names]
  fails = [f"{c.name} (world {', '.join(failing[base(c.name)])})"
           for c in pooled if base(c.name) in failing]
  out = (f"{len(pooled) - len(fails)} of the {len(pooled)} {world} criteria that pass pooled "
         f"pass in each of the {len(by_world)} worlds")
  return out + (f"; failing in some world: {', '.join(fails)}" if fails else "")


def world_sections(found: Sequence[C.Criterion],
                   by_world: dict[str, dict[int, list[C.Criterion]]]) -> list[str]:
  """Markdown: for each world kind run with several seeds, its criteria seed by seed."""
  md = []
  for world, seeds in by_world.items():
    md += [f"## The {world} criteria world by world", "",
           "Every standard error above is a bootstrap over the prompts of all worlds pooled, "
           "so it treats each world's draw (its teacher or gold, proxies and policies) as "
           "fixed. Evaluated in each world on its own (with its own prompts only, so with "
           "larger standard errors): " + world_line(found, seeds, world) + ".", ""]
    md += world_table(found, seeds, world) + [""]
  return md


def _per_world_table(per_world: dict) -> list[str]:
  lines = ["The drops are in SE units beside the z that a drop from a peak picked out of the "
           "curve must reach (one-sided 2.3%).", "",
           "| world | setting | BoN peak n | BoN drop (z / needed) | β_bon | R² | RL peak β | "
           "RL drop (z / needed) |", "|---|---|---|---|---|---|---|---|"]
  for world, rows in per_world.items():
    for label, r in rows.items():
      rl = (f"{r['rl_peak_beta']:.3g} | {r['rl_drop']:.3f} ({_z_text(r, 'rl')})"
            if "rl_drop" in r else "– | –")
      lines.append(f"| {world} | {label} | {r['bon_peak_n']:.0f} | {r['bon_drop']:.3f} "
                   f"({_z_text(r, 'bon')}) | {r['beta_bon']:.3f} | {r['r2_bon']:.3f} | {rl} |")
  return lines


def _z_text(row: dict, path: str) -> str:
  return f"{row[f'{path}_drop_z']:.1f} / {row[f'{path}_drop_critical_z']:.1f}"


def criteria_table(found: Sequence[C.Criterion]) -> str:
  lines = ["| criterion | world | result | measured |", "|---|---|---|---|"]
  for c in found:
    lines.append(f"| {c.name} | {c.world} | {'PASS' if c.passed else 'FAIL'} | "
                 f"{c.detail.replace('|', chr(92) + '|')} |")
  return "\n".join(lines)


# Issue F's criteria; any other test in a report (P1_rloo, P1_kl_matched …) is an extra.
ISSUE_CRITERIA = ("G0", "G1", "G2", "G3", "G5", "R1", "R2", "R3", "R4", "C1", "C2", "C3",
                  "D1", "D2", "D3", "P1")


def verdicts(found: Sequence[C.Criterion]) -> dict[str, dict[str, Any]]:
  """Per criterion (``G1``, ``R2``, …): the world that carries it, its verdict there, and
  the verdicts of the same test in the other worlds.

  The carrier is the world of the unsuffixed entry (``R2``), or the only world that ran
  the test; ``G1-text`` is the same test in the text world, and ``D1-bandit`` the bandit
  world's version of a criterion the text world carries (``text_report.CARRIES``).
  """
  out: dict[str, dict[str, Any]] = {}
  for c in found:
    base = c.name.partition("-")[0]
    entry = out.setdefault(base, {"carried_by": None, "pass": None, "by_world": {}})
    entry["by_world"][c.world] = bool(c.passed)
    if c.name == base:
      entry["carried_by"], entry["pass"] = c.world, bool(c.passed)
  for entry in out.values():  # measured in one world only (e.g. the HH study's "G1-hh")
    if entry["carried_by"] is None and len(entry["by_world"]) == 1:
      (entry["carried_by"], entry["pass"]), = entry["by_world"].items()
  return out


def verdict_table(found: Sequence[C.Criterion]) -> str:
  lines = ["| criterion | carried by | verdict | the same test elsewhere |", "|---|---|---|---|"]
  word = lambda ok: "PASS" if ok else "FAIL"
  for base, v in verdicts(found).items():
    others = ", ".join(f"{w}: {word(ok)}" for w, ok in v["by_world"].items()
                       if w != v["carried_by"])
    verdict = "–" if v["pass"] is None else word(v["pass"])
    name = base if base in ISSUE_CRITERIA else f"{base} (extra)"
    lines.append(f"| {name} | {v['carried_by'] or '–'} | {verdict} | {others or '–'} |")
  return "\n".join(lines)


def verdict_line(found: Sequence[C.Criterion]) -> str:
  """One line for the end of a run: how many criteria pass in the world carrying them."""
  carried = {k: e for k, e in verdicts(found).items() if e["pass"] is not None}
  def count(names: list[str], what: str) -> str:
    failed = [k for k in names if not carried[k]["pass"]]
    return (f"{len(names) - len(failed)}/{len(names)} {what}"
            + (f" (failed: {', '.join(failed)})" if failed else ""))
  line = count([k for k in carried if k in ISSUE_CRITERIA],
               "criteria pass in the world carrying them")
  extras = [k for k in carried if k not in ISSUE_CRITERIA]
  return line + (f"; extra tests: {count(extras, 'pass')}" if extras else "")


def _bandit_json(results: study_lib.BanditResults) -> dict[str, Any]:
  return {"fits": {s.label: {"bon": s.fit_bon._asdict(),
                             "rl": None if s.fit_rl is None else s.fit_rl._asdict()}
                   for s in list(results.sizes) + list(results.data)},
          "proxies": list(results.proxy_stats), "per_world": results.per_world,
          "estimator_checks": results.estimator_checks,
          "learned_policy": results.learned_policy}


def _bandit_sections(results: study_lib.BanditResults, figs: dict[str, str]) -> list[str]:
  md = ["## Fits by proxy size", ""] + _fit_table(results.sizes, "width") + [""]
  md += ["## Fits by proxy training pairs", ""] + _fit_table(results.data, "setting") + [""]
  if figs.get("gao_fig3_data"):
    md += [f"![fit coefficients by training pairs]({figs['gao_fig3_data']})", ""]
  md += ["## Proxies", ""] + _proxy_table(results.proxy_stats) + [""]
  md += ["## Each world on its own", ""] + _per_world_table(results.per_world) + [""]
  if results.learned_policy:
    md += ["## RL with a learned policy", "", f"![learned policy]({figs['learned_policy']})", ""]
  return md


def write_report(workdir: str, found: Sequence[C.Criterion],
                 results: study_lib.BanditResults | None, figs: dict[str, str],
                 facts: dict[str, Any], extra_sections: Sequence[str] = (),
                 by_world: dict[str, dict[int, list[C.Criterion]]] | None = None
                 ) -> dict[str, Any]:
  """Writes ``report.json`` and ``report.md``; returns the JSON object. ``results`` None:
  no bandit world was run (only ``extra_sections`` follow the criteria). ``by_world``:
  world kind -> seed -> its criteria (``world_criteria``), shown beside the pooled
  verdicts for the kinds run with several seeds."""
  by_world = {k: v for k, v in (by_world or {}).items() if len(v) > 1}
  report = {"criteria": {c.name: C.Criterion.as_json(c) for c in found},
            "verdicts": verdicts(found), **facts,
            **({"criteria_by_world": {
                world: {str(s): {c.name: C.Criterion.as_json(c) for c in cs}
                        for s, cs in seeds.items()} for world, seeds in by_world.items()}}
               if by_world else {}),
            **({} if results is None else _bandit_json(results)), "figures": figs}
  summary_lib.write_json(os.path.join(workdir, "report.json"), report)
  seeds = f"World seeds: {facts['world_seeds']}; " if "world_seeds" in facts else ""
  md = [f"# Reward-model overoptimization: reproduction report", "",
        f"Command: `{facts.get('command', '')}`  ",
        f"{seeds}wall time {facts.get('wall_s', 0):.0f} s.",
        "", facts.get("world_note", ""), "", "## Criteria", "", criteria_table(found), "",
        "## Verdict by criterion", "", verdict_line(found) + ".", "", verdict_table(found), ""]
  md += world_sections(found, by_world)
  noise = None if results is None else coste_noise(results)
  for c in found:
    where = c.world if "world" in c.world else f"{c.world} world"  # "bandit (first world)"
    md += [f"### {c.name} — {'PASS' if c.passed else 'FAIL'} ({where})", "",
           f"*Expected.* {expected(c.name, c.world, label_noise=noise)}", "",
           f"*Seen.* {c.detail}.", ""]
    if c.figure:
      md += [f"![{c.name}]({c.figure})", ""]
  if results is not None:
    md += _bandit_sections(results, figs)
  md += list(extra_sections)
  files.write_atomically(os.path.join(workdir, "report.md"),
                         lambda f: f.write("\n".join(md) + "\n"), mode="w")
  return report
