r"""Evaluates reward models (and DPO policies, HF reward models, baselines) on preference data.

  python -m experiments.eval_rm --config=configs/eval/tiny.py --workdir=/tmp/eval_tiny \
      --config.scorers=rm:/tmp/rm_tiny,ens=rm:/tmp/rm_ens,dpo:/tmp/dpo_tiny,length,gold \
      --config.datasets=run:/tmp/rm_tiny,pandalm@test

Scorers (``prefjax.evals.scorers``): ``rm:WORKDIR`` (a ``train_rm`` run rebuilt from
the config its checkpoint was saved with; ensembles add members, and ``wco`` and ``uwo`` over members
standardized on each dataset's responses, ``config.ensemble_normalization``), ``dpo:WORKDIR``
(implicit reward β·(log π − log π_ref)), ``hf:PATH`` (a local HF
``*ForSequenceClassification`` dir or a prefjax export, read with the training pipeline it
records; ``prefjax.evals.hf_scorer``), ``length``, ``shorter``, ``gold``. Datasets
(``prefjax.evals.reward_eval``): ``NAME[@SPLIT]`` of ``load_preferences``, or
``run:WORKDIR[@SPLIT]`` (a run's own data; a warning when it changed since the run read
it). With ``config.subset_field`` naming a ``meta`` key (default ``subset``), a dataset
where rows have one gets per-subset accuracy and their category-weighted mean; rows
without one are the ``(none)`` subset (a warning), left out of that mean.

Writes ``report.json``, ``report.md``, ``scores.jsonl`` and ``figures/`` (reliability
and length-bin plots per dataset) into the workdir. Each dataset's section counts its
rows: read, skipped as bad by reason (``--config.on_bad_row=skip``), scored, ties left
out. Metrics carry bootstrap 95% intervals; every pair of scorers gets a
paired-bootstrap difference with a p-value.

``--config.compare=DIR1,DIR2,...`` instead puts those runs' ``report.json`` side by
side in ``compare.md`` (accuracy [CI] per dataset and scorer).

Bad input (a workdir without a checkpoint or of the other kind, a dataset that does not
open, a tokenizer that cannot read the data, a directory without a reward head, a scorer
that keeps no pair) ends the run with one line naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import jax
from absl import app
from absl import logging

from experiments import common
from prefjax import experiment
from prefjax import files
from prefjax.evals import hf_scorer
from prefjax.evals import reward_eval
from prefjax.evals import reward_report
from prefjax.evals import scorers as scorers_lib
from prefjax.train import summary as summary_lib


# This run's figures until it has finished (a failed rerun keeps the previous ones).
STAGING = ".figures.partial"


def compare(config: Any, workdir: str) -> str:
  """Writes ``compare.md`` from the ``report.json`` of each ``config.compare`` run."""
  runs = [os.path.normpath(run) for run in reward_eval.parse_list(config.compare)]
  if len(set(runs)) < len(runs):
    raise scorers_lib.EvalInputError(f"compare: a run is given more than once: {runs}")
  names = [os.path.basename(run) for run in runs]
  reports = {}
  for run, name in zip(runs, names):
    path = os.path.join(run, "report.json")
    if not os.path.isfile(path):
      raise scorers_lib.EvalInputError(f"compare: {run} has no report.json")
    # Runs whose folders share a name (a/eval, b/eval) are labelled by their whole paths.
    reports[run if names.count(name) > 1 else name] = files.read_json(path)
  table = reward_report.compare_table(reports)
  path = os.path.join(workdir, "compare.md")
  files.write_atomically(path, lambda f: f.write(table + "\n"), mode="w")
  print(table)
  logging.info("eval_rm: %d reports compared in %s", len(reports), path)
  return table


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Evaluates ``config.scorers`` on ``config.datasets``; returns the report."""
  experiment.require_one_process("eval_rm")
  os.makedirs(workdir, exist_ok=True)
  out = ({"compare": compare(config, workdir)} if config.get("compare")
         else evaluate(config, workdir))
  # Last, so that a failed rerun leaves the previous config beside the previous report.
  summary_lib.replace_config(workdir, config)
  return out


def evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Writes the report of ``config.scorers`` on ``config.datasets``; returns it."""
  start = time.time()
  for field in ("num_resamples", "num_bins"):
    if int(config[field]) < 1:
      raise scorers_lib.EvalInputError(f"config.{field}={config[field]} must be >= 1")
  specs = scorers_lib.parse_specs(config.scorers)
  hf_scorer.score_labels(config.get("hf_score_label"), specs)  # names checked before loading
  datasets = reward_eval.unique_labels([reward_eval.load_dataset(s, config)
                                        for s in reward_eval.parse_list(config.datasets)])
  if not datasets:
    raise scorers_lib.EvalInputError("no datasets given (config.datasets), e.g. "
                                     "--config.datasets=run:RM_WORKDIR or jsonl:FILE.jsonl")
  mesh = experiment.make_optional_mesh(config)
  scorer_fns = {s.name: scorers_lib.make_scorer(s, config, mesh) for s in specs}
  report = {"command": " ".join(sys.argv), "scorers": [s.name for s in specs],
            "checkpoints": {name: fn.checkpoint for name, fn in scorer_fns.items()
                            if getattr(fn, "checkpoint", None)},
            "num_resamples": int(config.num_resamples), "uwo_lambda": float(config.uwo_lambda),
            "ensemble_normalization": str(config.get("ensemble_normalization",
                                                     "standardize")),
            "datasets": []}
  scores = []
  staging = os.path.join(workdir, STAGING)  # this run's figures until it has finished
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  for dataset in datasets:
    section, arrays = reward_eval.evaluate_dataset(dataset, scorer_fns, config)
    section["figures"] = write_figures(section, arrays, staging, int(config.num_bins))
    report["datasets"].append(section)
    scores += reward_report.score_lines(dataset.label, arrays)
  files.publish_figures(workdir, staging,
                         [f for d in report["datasets"] for f in d["figures"]],
                         _previous_figures(workdir))
  report["wall_seconds"] = time.time() - start
  summary_lib.write_json(os.path.join(workdir, "report.json"), report)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
      f.write(reward_report.markdown(report))
    with open(os.path.join(workdir, "scores.jsonl"), "w", encoding="utf-8") as f:
      f.write("\n".join(scores) + "\n")
  logging.info("eval_rm: %d datasets x %d scorers in %.1fs; report in %s", len(datasets),
               len(specs), report["wall_seconds"], workdir)
  return report


def write_figures(section: dict[str, Any], arrays: dict[str, Any], out_dir: str,
                  num_bins: int) -> list[str]:
  """Draws a dataset's figures into ``out_dir``; returns their report paths
  (``figures/<name>.png``)."""
  label, primary = section["dataset"], arrays["primary"]
  calibrated = [n for n in primary if arrays["calibrated"][n]]
  figures = []
  drawn_at = lambda name: os.path.join(out_dir, os.path.basename(name))  # noqa: E731
  if calibrated:
    figures.append(reward_eval.figure_name("reliability", label))
    reward_report.plot_reliability(arrays["signed"], calibrated, drawn_at(figures[-1]),
                                   f"{label}: both pair orders", num_bins)
  figures.append(reward_eval.figure_name("length_bins", label))
  reward_report.plot_length_bins(section, primary, drawn_at(figures[-1]))
  return figures


def _previous_figures(workdir: str) -> list[str]:
  """The figures the report in ``workdir`` names (none if unreadable)."""
  try:
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
      return [p for d in json.load(f).get("datasets", []) for p in d.get("figures", [])]
  except (OSError, ValueError, TypeError, AttributeError):
    return []


main = common.main_for(run)  # bad input (EvalInputError) ends in one line, exit code 1

if __name__ == "__main__":
  common.define_flags()
  app.run(main)
