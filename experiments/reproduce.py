r"""Reproduces the reward-model overoptimization results and writes a report.

Command (what `make demo` runs):
  python -m experiments.reproduce --config=configs/reproduce/quick.py --workdir=workdirs/demo

Writes into the workdir: ``config.json``, ``figures/*.png``, ``report.md`` (figures
embedded, one paragraph per result: what the paper expects, what this run saw),
``report.json`` (one entry per criterion ``{"pass", "value", "threshold", "figure",
"world"}``, the world seeds, the wall time and the command) and ``proxies/``
(trained proxy scores; a rerun with the same workdir reuses them). Ends by printing
the criteria table and the figure paths. A failed criterion is reported, not
hidden; the exit code is 0 either way (the report is the result).

A rerun replaces the outputs together: the config's numbers are checked before any work
(``study_config.check``), figures are drawn into ``.figures.partial`` and moved into
``figures/`` only once the run has finished (figures the previous report named and this
run did not draw are removed), then the report and last ``config.json`` are written. A
run that fails leaves the previous run's config, report and figures as they were (the
proxies it trained stay cached for the next run).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from typing import Any

from absl import app
from absl import logging

from experiments import common
from experiments import hh_study
from experiments import text_study
from prefjax import experiment
from prefjax import files
from prefjax.overopt import report as report_lib
from prefjax.overopt import study
from prefjax.overopt import study_config
from prefjax.overopt import text_report
from prefjax.overopt import text_world
from prefjax.train import summary as summary_lib


def _world_note(config: Any) -> str:
  seeds = list(config.bandit.world_seeds)
  if len(seeds) == 1:
    return (f"One world (seed {seeds[0]}): the best-of-n decline depends on the world drawn, "
            "so these curves are one draw; `configs/reproduce/full.py` pools several worlds "
            "and shows each.")
  return (f"Worlds {seeds} pooled: each world's prompts are concatenated, so curves average "
          "over worlds and the bootstrap runs over all prompts; the per-world table below "
          "shows the spread.")



FIGURES = "figures"
STAGING = ".figures.partial"  # this run's figures until the run has finished


def _with_text_world(config: Any, workdir: str, found: list,
                     fig_dir: str) -> tuple[list, dict, list, dict]:
  """The text world, or with ``config.text.kind == "hh"`` the SmolLM2 / HH world; returns
  its criteria, figures, report section and (several seeds) its criteria seed by seed."""
  hh = config.text.get("kind") == "hh"
  world_cls, labels = ((hh_study.HHWorld, hh_study.REPORT_LABELS) if hh
                       else (text_study.TextWorld, {}))
  root = os.path.join(workdir, "hh" if hh else "text")
  seeds = config.text.get("world_seeds")
  if not seeds:  # one world, the seed in config.text.world
    results = text_study.run_text_study(config.text, root, study.Progress, world_cls=world_cls)
  else:  # several, pooled as the bandit world pools its worlds
    labels = labels or {"title": f"Text world ({len(seeds)} worlds pooled)"}
    unused = (config.text.get("world") or {}).get("seed")
    if unused is not None and int(unused) not in seeds:
      logging.warning("text.world.seed=%d is not used: text.world_seeds=%s sets each world's "
                      "seed (set text.world_seeds=(%d,) for that world alone)", unused,
                      tuple(seeds), unused)
    runs = []
    for seed in seeds:
      cfg = copy.deepcopy(config.text)
      cfg.world.seed = int(seed)
      runs.append(text_study.run_text_study(cfg, os.path.join(root, f"seed{seed}"),
                                            study.Progress, world_cls=world_cls))
    results = text_world.pool_seeds(runs)
  num_bootstrap = int(config.text.get("num_bootstrap") or config.bandit.num_bootstrap)
  text_found, figs, curves = text_report.text_criteria(
      results, config.text, fig_dir, num_bootstrap=num_bootstrap, **labels)
  by_seed = {int(seed): text_report.text_criteria(run, config.text, None,
                                                  num_bootstrap=num_bootstrap, **labels)[0]
             for seed, run in zip(seeds, runs)} if seeds else {}
  for c in found:
    if c.name in text_report.CARRIES:  # the text world carries it; keep the bandit's beside
      c.name = f"{c.name}-bandit"
  intro = hh_study.describe(results) if hh else None
  section = text_report.report_section(results, curves, figs, intro=intro,
                                       **({"heading": "## SmolLM2 on HH"} if hh else {}))
  return found + text_found, figs, section, by_seed


def run(config: Any, workdir: str) -> dict[str, Any]:
  """The bandit world (``config.bandit``; None = skipped), then the text world when
  ``config.text.enabled``."""
  experiment.require_one_process("the overoptimization study")
  start = time.time()
  study_config.check(config)
  staging = os.path.join(workdir, STAGING)
  shutil.rmtree(staging, ignore_errors=True)  # left by a run that failed
  facts = {"command": " ".join(["python -m experiments.reproduce"] + sys.argv[1:])}
  found, figs, results, by_world = [], {}, None, {}
  if config.get("bandit") is not None:
    results = study.run_bandit_study(config.bandit, workdir)
    picks = dict(smallest=int(config.bandit.smallest), n_fixed=int(config.bandit.data.n_fixed),
                 num_bootstrap=int(config.bandit.num_bootstrap))
    found, figs = report_lib.bandit_criteria(results, staging, **picks)
    by_world["bandit"] = report_lib.world_criteria(results, **picks)
    facts.update(world_seeds=list(config.bandit.world_seeds), wall_s=time.time() - start,
                 world_note=_world_note(config))
  extra = []
  if config.get("text") and config.text.enabled:
    facts["text_world"] = {"seed": (list(config.text.get("world_seeds") or ())
                                    or (config.text.get("world") or {}).get("seed")),
                           "pairs_seed": int(config.text.pairs.seed),
                           "eval_seed": int(config.text.eval.seed)}
    found, text_figs, extra, by_seed = _with_text_world(config, workdir, found, staging)
    for criteria in by_world.get("bandit", {}).values():  # named as the pooled ones are
      for c in criteria:
        if c.name in text_report.CARRIES:
          c.name = f"{c.name}-bandit"
    if by_seed:
      by_world[by_seed[next(iter(by_seed))][0].world] = by_seed
    figs.update(text_figs)
  facts["wall_s"] = time.time() - start
  publish_figures(workdir, staging, figs)
  out = report_lib.write_report(workdir, found, results, figs, facts, extra_sections=extra,
                                by_world=by_world)
  summary_lib.replace_config(workdir, config)
  table = report_lib.criteria_table(found)
  print(table)
  print(report_lib.verdict_line(found))
  for world, seeds in by_world.items():
    if len(seeds) > 1:
      print(report_lib.world_line(found, seeds, world))
  print("figures:\n  " + "\n  ".join(os.path.join(workdir, f) for f in figs.values()))
  print(f"report: {os.path.join(workdir, 'report.md')}  ({facts['wall_s']:.0f} s)")
  return out


def publish_figures(workdir: str, staging: str, figs: dict[str, str]) -> None:
  """This run's figures from ``staging`` into ``workdir/figures``; those the previous
  report named (``report.json``'s ``figures``) and this run did not draw are removed."""
  files.publish_figures(workdir, staging, figs.values(), _previous_figures(workdir))


def _previous_figures(workdir: str) -> list[str]:
  """The figures the report in ``workdir`` names (none if unreadable)."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      return list(dict(json.load(f).get("figures", {})).values())
  except (OSError, ValueError, TypeError, AttributeError):
    return []


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
