r"""Trains a safety (harm) classifier and picks its precision-targeted threshold.

  python -m experiments.train_safety --config=configs/safety/tiny.py --workdir=/tmp/safety_tiny

Data: preference pairs (``config.data``, as in ``train_rm``); each pair's chosen
response is a harmless example (label 0), its rejected response a harmful one
(label 1) — on HH-RLHF harmless-base a WEAK label (see ``prefjax.feedback.safety``).
A row with outcome < ½ is read with its sides swapped and a tie is skipped
(``safety_runtime.HarmPairs``; counts under ``harm_pairs`` in the report).
``data.name="tiny_world_harm"`` uses the tiny world's programmatic harm instead.

Model: ``config.model`` with head ``"reward"`` (one harm logit) or
``"multi:cat1,cat2"`` (one logit per category; a rejected response is harmful in
the categories listed in ``meta[data.category_field]``).

Loss: class-weighted BCE, w₊ = ``safety.pos_weight`` ("balanced": n₋/n₊ of the
training labels, per category for a ``multi:`` head), through ``prefjax.train.train_loop`` (resume, checkpoints,
metrics.jsonl). The evaluator reports validation ROC-AUC at every eval.

At the end: the threshold is the validation score of most recall (the highest of equal
recall) whose precision is ≥ ``safety.target_precision``, among those flagging at least
``safety.min_flagged`` validation examples, moved halfway down to the next lower score
(``safety.on_unreachable``: ``error`` stops with the best precision reached;
``max_precision`` keeps the most precise threshold and records a notice).
Outputs besides the usual workdir files: ``threshold.json``,
``safety_report.json`` (validation and test ROC-AUC, precision, recall, FPR and
accuracy at the threshold, each with a 95% pair-bootstrap interval) and the same
under ``safety`` in ``summary.json``. A rerun of a finished workdir only
re-evaluates, e.g. with another ``--config.safety.target_precision``.
``export_hf=True`` also writes the classifier to ``<workdir>/hf`` as a Hugging Face
directory (its harm logit as a reward head; the threshold stays in ``threshold.json``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import app
from absl import logging

from experiments import common
from prefjax import configlib
from prefjax import experiment
from prefjax import rm
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.evals import stats
from prefjax.feedback import safety
from prefjax.feedback import safety_runtime
from prefjax.rm import labels
from prefjax.train import summary as summary_lib

SAFETY_FIELDS = ("pos_weight", "target_precision", "on_unreachable", "min_flagged",
                 "num_resamples", "eval_batch_size", "test_split")
REPORT_FILE = "safety_report.json"


def category_tables(config: Any, model: Any, splits: dict[str, Any]
                    ) -> dict[str, np.ndarray | None]:
  """Per split, the ``[N, C]`` category mask of rejected responses (None for a binary head)."""
  _, categories = rm.reward_columns(model)
  if not categories:
    return {name: None for name in splits}
  cfg = {"objective": "", "objective_field": config.data.get("category_field") or "category"}
  return {name: labels.objective_table(source, categories, cfg)
          for name, source in splits.items()}


def split_batches(config: Any, source: Any, tokenizer: Any, table: np.ndarray | None) -> list:
  pcfg = experiment.pipeline_config(
      config.data, mode="padded", shuffle=False, num_epochs=1, drop_remainder=False,
      batch_size=int(config.safety.eval_batch_size))
  return rm.eval_batches(source, tokenizer, pcfg, table)[0]


def report(scores: dict[str, safety.PairScores], choice: safety.ThresholdChoice,
           config: Any) -> dict[str, Any]:
  """Threshold and per-split metrics with bootstrap intervals (JSON-ready)."""
  out: dict[str, Any] = {"threshold": choice.as_dict()}
  for name, split_scores in scores.items():
    metrics = safety.classifier_metrics(split_scores, choice.threshold,
                                        num_resamples=int(config.safety.num_resamples),
                                        seed=int(config.seed))
    out[name] = {"num_pairs": int(split_scores.p_chosen.size),
                 "num_examples": int(2 * split_scores.p_chosen.size),
                 "pairs_without_category": split_scores.uncategorised,
                 **stats.to_json(metrics)}
    if split_scores.uncategorised:
      logging.warning("safety %s: %d pairs left out, their rejected response naming no "
                      "category (training gives it no target either)", name,
                      split_scores.uncategorised)
    logging.info("safety %s (%d pairs): ROC-AUC %s, precision %s, recall %s at threshold %.4f",
                 name, split_scores.p_chosen.size, metrics["roc_auc"], metrics["precision"],
                 metrics["recall"], choice.threshold)
  return out


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the classifier of ``config`` in ``workdir``; returns its report."""
  experiment.require_one_process("train_safety (its threshold and report are chosen from "
                                 "the scores of one process)")
  configlib.check_fields("config.safety", config.safety, SAFETY_FIELDS)
  safety.check_threshold_options(float(config.safety.target_precision),
                                 config.safety.on_unreachable,
                                 int(config.safety.get("min_flagged", 1)))
  if config.data.pipeline.mode != "padded":
    raise ValueError("train_safety needs data.pipeline.mode='padded'")
  if not config.data.eval_split:
    raise ValueError("train_safety chooses its threshold on the validation split: set "
                     "config.data.eval_split")
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  mesh = experiment.make_mesh(config.mesh)
  splits = {"train": config.data.train_split, "validation": config.data.eval_split,
            "test": config.safety.test_split}
  sources = {name: safety_runtime.load_harm_pairs(config.data, split)
             for name, split in splits.items() if split}
  pcfg = experiment.pipeline_config(config.data, mesh=mesh)
  data_report = experiment.start_data_report(workdir, sources, tokenizer, pcfg,
                                             ("chosen", "rejected"))
  with jax.set_mesh(mesh):
    model = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                  seed=int(config.seed))
    experiment.check_max_length(model, pcfg.max_length)
    tables = category_tables(config, model, sources)
    train_iter = iter(pipeline_lib.preference_dataset(sources["train"], tokenizer, pcfg))
    num_pairs = len(sources["train"])
    if tables["train"] is not None:
      train_iter = labels.ObjectiveMaskIterator(train_iter, tables["train"])
    num_harmful, num_harmless = safety.class_counts(num_pairs, tables["train"])
    pos_weight, neg_weight = safety.class_weights(config.safety.pos_weight, num_harmful,
                                                  num_harmless)
    logging.info("safety: %s harmful / %s harmless training examples; pos_weight %s",
                 num_harmful, num_harmless, pos_weight)
    batches = {name: split_batches(config, source, tokenizer, tables[name])
               for name, source in sources.items() if name != "train"}
    evaluator = safety.SafetyEvaluator(batches["validation"])
    result = train.train_loop(
        workdir=workdir, config=config, model=model,
        loss_fn=safety.make_loss_fn(pos_weight=pos_weight, neg_weight=neg_weight),
        optimizer=train.make_optimizer(config.optimizer), loop=config.loop,
        train_iter=train_iter, evaluators=[evaluator],
        tokens_in_batch=experiment.tokens_in_batch, mesh=mesh,
        partition_rules=experiment.partition_rules(model, mesh),
        start_hooks=[data_report.write])
    if result.preempted:
      return {"summary": result.summary, "preempted": True}
    final_step = result.summary.get("final_step", int(jax.device_get(result.state.step)))
    if evaluator.last is None or evaluator.last[0] != final_step:
      evaluator(final_step, result.model)
    scores = {"validation": evaluator.last[2]}
    scores.update({name: safety.score_pair_batches(result.model, split)
                   for name, split in batches.items() if name != "validation"})
  val = scores["validation"]
  choice = safety.choose_threshold(val.scores, val.labels,
                                   float(config.safety.target_precision),
                                   on_unreachable=config.safety.on_unreachable,
                                   min_flagged=int(config.safety.get("min_flagged", 1)))
  if choice.notice:
    logging.warning("safety: %s", choice.notice)
  out = dict(report(scores, choice, config), pos_weight=pos_weight, neg_weight=neg_weight,
             num_train_pairs=num_pairs, final_step=final_step,
             harm_pairs={name: source.counts for name, source in sources.items()})
  summary_lib.write_json(os.path.join(workdir, safety_runtime.THRESHOLD_FILE),
                         {**choice.as_dict(), "step": final_step})
  summary_lib.write_json(os.path.join(workdir, REPORT_FILE), out)
  data_report.finish(train_iter, result.summary, mesh)
  result.summary["safety"] = out
  summary_lib.write_summary(workdir, result.summary)
  experiment.export_hf(config, workdir, result.model, tokenizer, what="safety classifier")
  return {"summary": result.summary, "report": out, "preempted": False}


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
