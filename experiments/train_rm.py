r"""Trains a reward model (single, ensemble, multi-objective) on preference pairs.

  python -m experiments.train_rm --config=configs/rm/tiny.py --workdir=/tmp/rm_tiny \
      [--config.loop.num_steps=200 ...]

Rerunning with the same workdir resumes (params, optimizer, RNG and the data
iterator position are checkpointed by ``prefjax.train``).

Losses (``config.loss.name``): any ``prefjax.losses.PREFERENCE_LOSSES`` entry,
with its hyperparameters in ``config.loss`` (see ``prefjax.rm.loss``),
per pair, reduced as Σ_i w_i·ℓ_i / (number of real pairs), w_i = ``weight``
(padded pairs have ``pair_mask`` 0 and weigh 0):
  bt             Bradley–Terry with ``margin``, ``label_smoothing`` ε and the
                 ``outcome`` as a soft label: ε_i = 1 − [(1−ε)·o_i + ε·(1−o_i)]
                 (o = 1: the usual ε; o = 0.5: a tie pulls the margin to zero).
  ties           Davidson ties with ν = ``nu`` (PandaLM-style 0.5 outcomes).
  plackett_luce  Plackett–Luce on the ranking [preferred, other] (K = 2; the
                 pipeline yields pairs), ordered by outcome ≥ 0.5.
``center_coef`` > 0 adds the reward-centering penalty (r_c + r_r)².

Ensembles (head ``reward_ensemble:K``): ``model.ensemble="deep"`` trains K full
models (parameters stacked, one jitted step, optionally sharded over an
``ensemble`` mesh axis via ``mesh.ensemble=K``); ``"heads"`` trains K heads on
one trunk. The loss is Σ_k mean-loss_k, so members' gradients are
independent. Members see the same batches in the same order; they differ by
init seed (``seed + k``) and, with ``loss.bootstrap`` (on in
``configs/rm/ensemble_tiny.py``), by Poisson(1) bootstrap weights per pair drawn
from ``fold_in(step_rng, k)``
(online bagging; Oza & Russell 2001). A single RM with ``loss.bootstrap=True``
and ``loss.first_member=k`` draws exactly member k's weights, so a member can
be reproduced alone. Global-norm gradient clipping is applied per member for
deep ensembles.

Multi-objective (head ``multi:helpful,harmless``): objective o's loss is the
BT loss over the pairs labelled with o, normalised by their count; the label is
``meta[data.objective_field]`` of each source row (a name or a list of names),
or ``data.objective`` for every row. The total loss is the sum over objectives.
Pairs with no label are counted and logged and contribute no loss.

Evaluation (every ``loop.eval_every`` steps and at the end) is the evaluator
``prefjax.rm.RewardModelEvaluator``: it scores the whole eval split and writes
``eval_<step>.json`` (metrics + reliability bins) and
``figures/reliability_<step>.png``; its metrics go to ``metrics.jsonl``
(``eval/...``).

``export_hf=True`` also writes the trained model to ``<workdir>/hf`` as a Hugging
Face ``*ForSequenceClassification`` directory (a deep ensemble: ``hf/member_<k>/``)
that ``transformers``, TRL and ``eval_rm``'s ``hf:`` scorer load
(``prefjax.models.hf_export``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import app
from absl import logging
from flax import nnx

from experiments import common
from prefjax import experiment
from prefjax import rm
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.models import heads as heads_lib
from prefjax.rm import labels
from prefjax.train import summary as summary_lib

EVAL_FIELDS = ("enabled", "batch_size", "num_bins", "subset_field")


def make_evaluator(config: Any, model: nnx.Module, source: Any, tokenizer: Any,
                   table: np.ndarray | None, mesh: Any, workdir: str
                   ) -> rm.RewardModelEvaluator:
  """The full-pass evaluator over ``data.eval_split`` (padded, fixed order)."""
  pcfg = experiment.pipeline_config(
      config.data, mesh=mesh, mode="padded", shuffle=False, num_epochs=1, drop_remainder=False,
      batch_size=experiment.eval_batch_size(config, source, mesh))
  batches, dropped = rm.eval_batches(source, tokenizer, pcfg, table, mesh)
  num_columns, objectives = rm.reward_columns(model)
  return rm.RewardModelEvaluator(
      batches=batches, dropped=dropped, source=source, mesh=mesh, workdir=workdir,
      num_bins=int(config.eval.num_bins), subset_field=config.eval.get("subset_field"),
      objectives=objectives, num_columns=num_columns)


def check_config(config: Any) -> None:
  """What ``run`` checks first, before the binary touches the workdir."""
  experiment.check_eval_section(config, EVAL_FIELDS, "train_rm")


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the reward model of ``config`` in ``workdir``.

  Returns:
    ``{"summary": summary.json contents, "eval": final eval metrics, "preempted": bool}``.
  """
  check_config(config)
  with summary_lib.naming_recorded_imports(workdir):  # A bad loss fails before data and model.
    loss = rm.RewardLoss.from_config(config.loss)
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  mesh = experiment.make_mesh(config.mesh)
  train_source = experiment.load_split(config.data, config.data.train_split)
  eval_source = experiment.load_split(config.data, config.data.eval_split)
  pcfg = experiment.pipeline_config(config.data, mesh=mesh)
  data_report = experiment.start_data_report(
      workdir, {"train": train_source, "eval": eval_source}, tokenizer, pcfg,
      ("chosen", "rejected"), weighted=("train",))
  num_segments = pcfg.max_segments_per_row if pcfg.mode == "packed" else None
  with jax.set_mesh(mesh):
    model = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                  seed=int(config.seed))
    experiment.check_max_length(model, pcfg.max_length)
    num_columns, objectives = rm.reward_columns(model)
    train_ds = pipeline_lib.preference_dataset(train_source, tokenizer, pcfg)
    train.check_batch_shapes(train_ds, mesh,
                             accum_steps=int(config.loop.get("accum_steps", 1)))
    train_iter = iter(train_ds)
    eval_table = None
    if objectives:
      train_table = labels.objective_table(train_source, objectives, config.data)
      labels.check_every_objective_labelled(train_table, objectives, config.data,
                                            config.data.train_split)
      train_iter = labels.ObjectiveMaskIterator(train_iter, train_table)
      eval_table = labels.objective_table(eval_source, objectives, config.data)
      for split, table in (("train", train_table), ("eval", eval_table)):
        data_report.report[split]["objective_labels"] = labels.objective_counts(table,
                                                                                objectives)
    rm_eval = None  # a fork may append evaluators of its own to ``evaluators``
    if config.eval.get("enabled", True):
      rm_eval = make_evaluator(config, model, eval_source, tokenizer, eval_table, mesh, workdir)
    evaluators = [rm_eval] if rm_eval else []
    deep = isinstance(model, heads_lib.DeepEnsemble)
    logging.info("reward-model loss %r with %s", loss.name, dict(loss.hparams))
    result = train.train_loop(
        workdir=workdir, config=config, model=model,
        loss_fn=rm.make_loss_fn(loss, num_columns=num_columns, objectives=objectives,
                                num_segments=num_segments),
        optimizer=train.make_optimizer(config.optimizer, clip_per_member=deep),
        loop=config.loop, train_iter=train_iter, evaluators=evaluators,
        tokens_in_batch=experiment.tokens_in_batch,
        mesh=mesh, partition_rules=experiment.partition_rules(model, mesh),
        start_hooks=[data_report.write])
    final_step = result.summary.get("final_step", int(jax.device_get(result.state.step)))
    # A rerun of a finished run still reports its eval.
    if rm_eval and not result.preempted and (rm_eval.last is None
                                             or rm_eval.last[0] != final_step):
      rm_eval(final_step, result.model)
  data_report.finish(train_iter, result.summary, mesh)
  if not result.preempted:
    experiment.export_hf(config, workdir, result.model, tokenizer, what="reward model")
    logging.info("done: %s/summary.json. Next: python -m experiments.eval_rm --config=configs/"
                 "eval/tiny.py --workdir=EVAL --config.scorers=rm:%s --config.datasets=run:%s%s; "
                 "as best_of_n's or train_rl's proxy: --config.proxy.kind=model "
                 "--config.proxy.checkpoint=%s", workdir, workdir, workdir,
                 common.imports_flag(), workdir)
  last = rm_eval.last if rm_eval else None
  return {"summary": result.summary, "eval": last[1] if last else None,
          "preempted": result.preempted}


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run, check=check_config))
