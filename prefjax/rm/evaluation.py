"""Full-pass reward-model evaluation, an evaluator ``fn(step, model) -> metrics`` for ``train_loop``.

Each call scores the whole eval split (padded pairs, fixed order) and returns
the metrics of ``prefjax.evals.preference.evaluate_preferences`` (accuracy,
BT log-loss, ECE, length-only baseline, length slices, subsets), with the ECE
and reliability bins computed over both orders of each pair; ensembles add
per-member metrics and disagreement, multi-objective models per-objective
metrics. It also writes ``eval_<step>.json`` (metrics + reliability bins) and
``figures/reliability_<step>.png`` into the workdir.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from prefjax import parallel
from prefjax.data import pipeline as pipeline_lib
from prefjax.evals import preference as evals
from prefjax.rm import labels
from prefjax.rm import loss as loss_lib
from prefjax.train import evaluators as evaluators_lib
from prefjax.train import sharding as sharding_lib
from prefjax.train import summary as summary_lib

Rewards = dict[str, np.ndarray]

# The subset of the rows that lack ``meta[subset_field]`` when other rows have it.
NO_SUBSET = "(none)"


def subset_names(metas: Sequence[dict[str, Any] | None], field: str
                 ) -> tuple[list[str] | None, int]:
  """(each row's ``meta[field]`` as a subset name, how many rows are in `NO_SUBSET`); a
  list of names is one subset, its names joined by ``+``.

  The rows without the field are the `NO_SUBSET` subset, so that no row leaves the
  table unseen; ``(None, 0)`` when no row has the field (the data has no subsets).
  """
  values = [(meta or {}).get(field) for meta in metas]
  if NO_SUBSET in values:
    raise ValueError(f"row {values.index(NO_SUBSET)} of the eval split has meta.{field} = "
                     f"{NO_SUBSET!r}, the name kept for rows without a subset: rename it")
  missing = sum(v is None for v in values)
  if missing == len(values):
    return None, 0
  return [NO_SUBSET if v is None else _subset_name(v) for v in values], missing


def _subset_name(value: Any) -> str:
  """A row labelled with several names (a pair rated on two objectives) is the subset of
  them all, ``a+b``, not of each."""
  if isinstance(value, (list, tuple)):
    return "+".join(str(v) for v in value)
  return str(value)


def missing_subset_text(missing: int, total: int, field: str) -> str:
  return (f"{missing} of {total} pairs have no meta.{field}; they form the subset "
          f"{NO_SUBSET!r}")


def eval_batches(source: Any, tokenizer: Any, pcfg: pipeline_lib.PipelineConfig,
                 table: np.ndarray | None, mesh: Any = None
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
  """The whole eval split as batches (``pcfg``: padded, one epoch, no shuffle; this
  process's shard), and the pipeline's nonzero ``dropped_*`` counters of every process's
  shard of ``mesh`` (a collective under several processes)."""
  iterator = iter(pipeline_lib.preference_dataset(source, tokenizer, pcfg))
  batches = list(iterator)
  if table is not None:
    batches = [labels.add_objective_mask(b, table) for b in batches]
  counters = parallel.summed_counts(iterator.counters, mesh)
  dropped = {k: v for k, v in counters.items() if k.startswith("dropped_") and v}
  if dropped:
    logging.warning("eval split: pairs dropped by the pipeline: %s", dropped)
  return batches, dropped


@functools.partial(jax.jit, static_argnames="graphdef")
def jitted_pair_rewards(graphdef, state, batch):
  """``pair_rewards`` of ``nnx.merge(graphdef, state)`` on a pair batch, jitted."""
  return loss_lib.pair_rewards(nnx.merge(graphdef, state), batch, None)


class RewardModelEvaluator:
  """``evaluator(step, model) -> metrics`` over the whole eval split (see the module doc).

  Args:
    batches, dropped: :func:`eval_batches`' batches and pipeline drop counts (logged as
      ``pipeline/dropped_*``).
    source: the eval split's data source; its rows' ``meta`` give the subsets.
    mesh: the run's mesh (None: one device).
    workdir: where ``eval_<step>.json`` and the reliability figures go.
    num_bins: reliability bins of the ECE.
    subset_field: the ``meta`` field naming each pair's subset (RewardBench style); None:
      no per-subset metrics.
    objectives, num_columns: :func:`reward_columns` of the model: its objective heads'
      names (per-objective metrics) and reward columns (members or objectives).

  Attributes:
    last: ``(step, metrics)`` of the latest call, or None.
  """

  def __init__(self, *, batches: list[dict[str, np.ndarray]], dropped: dict[str, int],
               source: Any, mesh: jax.sharding.Mesh | None, workdir: str, num_bins: int,
               subset_field: str | None, objectives: Sequence[str], num_columns: int):
    self._batches, self._dropped, self._source = batches, dropped, source
    self._mesh, self._workdir = mesh, workdir
    self._objectives, self._num_columns = tuple(objectives), num_columns
    self._num_bins, self._subset_field = num_bins, subset_field
    self._subset_cache: list[str] | None = None
    self.last: tuple[int, dict[str, float]] | None = None

  def __call__(self, step: int, model: nnx.Module) -> dict[str, float]:
    start = time.time()
    metrics, reliability = self._metrics(self._collect(model))
    metrics.update({f"pipeline/{k}": float(v) for k, v in self._dropped.items()})
    self._write(step, metrics, reliability)
    length_only = metrics.get("length_baseline_accuracy")
    logging.info("eval at step %d (%.1fs): accuracy=%.4f ece=%.4f length-only=%s", step,
                 time.time() - start, metrics["accuracy"], metrics["ece"],
                 "n/a" if length_only is None else f"{length_only:.4f}")
    self.last = (step, metrics)
    return metrics

  def _put(self, batch):
    if self._mesh is None or jax.process_count() > 1:  # several: each its own rows
      return sharding_lib.put_batch(batch, self._mesh)
    return jax.device_put(batch, sharding_lib.batch_shardings(batch, self._mesh))

  def _local_batches(self) -> list[dict[str, np.ndarray]]:
    """This process's eval batches, padded with empty ones (``pair_mask`` 0) to the most
    any process has: every process must join every global batch."""
    return list(evaluators_lib.JoinedByEveryProcess(self._batches))

  def _collect(self, model: nnx.Module) -> Rewards:
    """Rewards ``[N, C]``, outcomes, response lengths, indices of the N real eval pairs
    (of every process's rows: the rewards and the host fields are gathered alike)."""
    graphdef, state = nnx.split(model)
    several = jax.process_count() > 1
    # The rewards: the global arrays' values; the host fields: one copy of each data shard,
    # joined in the same order (processes that hold the same rows read the same shard).
    values = ((lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)))
              if several else np.asarray)
    gather = (lambda x: parallel.gather_rows(x, self._mesh)) if several else np.asarray
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "r_c", "r_r", "outcome", "c_len", "r_len", "index", "objective_mask")}
    for batch in self._local_batches():
      r_c, r_r = (values(x) for x in jitted_pair_rewards(graphdef, state, self._put(batch)))
      b = batch["pair_mask"].shape[0]
      response_len = batch["loss_mask"].sum(axis=1)
      real = gather(batch["pair_mask"]) > 0
      parts["r_c"].append(r_c.reshape(real.shape[0], -1)[real])
      parts["r_r"].append(r_r.reshape(real.shape[0], -1)[real])
      parts["outcome"].append(gather(batch["outcome"])[real])
      parts["c_len"].append(gather(response_len[:b])[real])
      parts["r_len"].append(gather(response_len[b:])[real])
      parts["index"].append(gather(batch["example_index"])[real])
      if "objective_mask" in batch:
        parts["objective_mask"].append(gather(batch["objective_mask"])[real])
    return {k: np.concatenate(v) for k, v in parts.items() if v}

  def _subsets(self, index: np.ndarray) -> list[str] | None:
    """``meta[eval.subset_field]`` of every eval pair (`subset_names`), or None."""
    if not self._subset_field:
      return None
    if self._subset_cache is None:
      metas = [self._source[int(i)].get("meta") for i in index]
      names, missing = subset_names(metas, self._subset_field)
      if missing:
        logging.warning("eval split: %s", missing_subset_text(missing, len(metas),
                                                              self._subset_field))
      self._subset_cache = names or []
    return self._subset_cache or None

  def _metrics(self, d: Rewards) -> tuple[dict[str, float], dict]:
    if self._objectives:
      return self._objective_metrics(d)
    r_c, r_r = d["r_c"].mean(axis=1), d["r_r"].mean(axis=1)
    main = evals.evaluate_preferences(
        r_c, r_r, subsets=self._subsets(d["index"]), outcome=d["outcome"],
        chosen_len=d["c_len"], rejected_len=d["r_len"], num_bins=self._num_bins)
    metrics, reliability = dict(main.metrics), main.reliability
    if self._num_columns > 1:
      metrics.update(self._member_metrics(d))
    return metrics, reliability

  def _member_metrics(self, d: Rewards) -> dict[str, float]:
    metrics = {}
    for k in range(self._num_columns):
      res = evals.evaluate_preferences(d["r_c"][:, k], d["r_r"][:, k], outcome=d["outcome"],
                                       chosen_len=d["c_len"], rejected_len=d["r_len"],
                                       num_bins=self._num_bins)
      metrics.update({f"member/{k}/{m}": res.metrics[m] for m in ("accuracy", "bt_log_loss")})
    signed = np.where(d["outcome"][:, None] >= 0.5, 1.0, -1.0) * (d["r_c"] - d["r_r"])
    metrics.update(evals.ensemble_disagreement(signed))
    return metrics

  def _objective_metrics(self, d: Rewards) -> tuple[dict[str, float], dict]:
    """Each labelled pair scored by (the first of) its objectives' heads, plus per objective."""
    labelled = d["objective_mask"].sum(axis=1) > 0
    column = np.argmax(d["objective_mask"], axis=1)
    r_c = np.take_along_axis(d["r_c"], column[:, None], axis=1)[:, 0][labelled]
    r_r = np.take_along_axis(d["r_r"], column[:, None], axis=1)[:, 0][labelled]
    subsets = self._subsets(d["index"])
    if subsets is not None:
      subsets = [s for s, keep in zip(subsets, labelled) if keep]
    main = evals.evaluate_preferences(
        r_c, r_r, outcome=d["outcome"][labelled], chosen_len=d["c_len"][labelled],
        rejected_len=d["r_len"][labelled], num_bins=self._num_bins, subsets=subsets)
    metrics, reliability = dict(main.metrics), main.reliability
    metrics["unlabelled_pairs"] = float((~labelled).sum())
    for k, name in enumerate(self._objectives):
      on = d["objective_mask"][:, k] > 0
      if on.any():
        res = evals.evaluate_preferences(d["r_c"][on, k], d["r_r"][on, k],
                                         outcome=d["outcome"][on], num_bins=self._num_bins)
        metrics.update({f"objective/{name}/{m}": res.metrics[m]
                        for m in ("accuracy", "mean_margin", "bt_log_loss")})
    return metrics, reliability

  def _write(self, step: int, metrics: dict[str, float], reliability: dict) -> None:
    if jax.process_index() != 0:
      return
    figure = os.path.join(self._workdir, "figures", f"reliability_{step}.png")
    os.makedirs(os.path.dirname(figure), exist_ok=True)
    evals.plot_reliability({"reward model": reliability}, figure,
                           title=f"reward model, step {step} (both orders of each pair, "
                                 f"ECE {metrics['ece']:.3f})",
                           xlabel="predicted P(a ≻ b) = σ(r_a − r_b)")
    summary_lib.write_json(os.path.join(self._workdir, f"eval_{step}.json"),
                           {"step": step, "metrics": metrics, "reliability": reliability,
                            "figure": os.path.relpath(figure, self._workdir)})
