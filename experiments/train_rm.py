r"""Trains a reward model (single, ensemble, multi-objective) on preference pairs.

  python -m experiments.train_rm --config=configs/rm/tiny.py --workdir=/tmp/rm_tiny \
      [--config.loop.num_steps=200 ...]

Rerunning with the same workdir resumes (params, optimizer, RNG and the data
iterator position are checkpointed by ``prefjax.train``).

Losses (``config.loss.name``), per pair, reduced as Σ_i w_i·ℓ_i / (number of
real pairs), w_i = ``weight`` (padded pairs have ``pair_mask`` 0 and weigh 0):
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

Evaluation (every ``loop.eval_every`` steps and at the end) runs the model over
the whole eval split and writes ``eval_<step>.json`` (metrics + reliability
bins) and ``figures/reliability_<step>.png``; its metrics go to
``metrics.jsonl`` through the train core's eval path (``eval/...``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import logging
from flax import nnx

from experiments import common
from prefjax import experiment
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.evals import preference as evals
from prefjax.losses import preference as pref_losses
from prefjax.models import heads as heads_lib
from prefjax.models import segments as seg
from prefjax.train import sharding as sharding_lib
from prefjax.train import summary as summary_lib

LOSSES = ("bt", "ties", "plackett_luce")
LOSS_FIELDS = {"name", "margin", "label_smoothing", "center_coef", "nu", "bootstrap",
               "first_member"}
Batch = Mapping[str, Any]


# ----------------------------------------------------------------------------- rewards


def pair_rewards(model: nnx.Module, batch: Batch, num_segments: int | None
                 ) -> tuple[jax.Array, jax.Array]:
  """Rewards of the chosen and rejected side of every pair: ``[B]`` or ``[B, K]``."""
  if "segment_ids" in batch:
    out = model(batch["tokens"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], num_segments=num_segments)
    return (seg.gather_pairs(out, batch["chosen_index"]),
            seg.gather_pairs(out, batch["rejected_index"]))
  out = model(batch["tokens"], attention_mask=batch["attention_mask"])
  num_pairs = batch["pair_mask"].shape[0]
  return out[:num_pairs], out[num_pairs:]


def per_pair_loss(cfg: Mapping[str, Any], r_chosen: jax.Array, r_rejected: jax.Array,
                  outcome: jax.Array) -> jax.Array:
  """Unreduced loss, shape of the rewards (``[B]`` or ``[B, K]``)."""
  name = cfg["name"]
  if name == "bt":
    eps = cfg.get("label_smoothing", 0.0)
    preferred = (1.0 - eps) * outcome + eps * (1.0 - outcome)
    loss = pref_losses.bradley_terry(r_chosen, r_rejected, margin=cfg.get("margin", 0.0),
                                     label_smoothing=1.0 - preferred)
  elif name == "ties":
    loss = pref_losses.bradley_terry_ties(r_chosen, r_rejected, outcome, nu=cfg["nu"])
  elif name == "plackett_luce":
    first = outcome >= 0.5
    if r_chosen.ndim == 2:
      first = first[:, None]
    ranked = jnp.stack([jnp.where(first, r_chosen, r_rejected),
                        jnp.where(first, r_rejected, r_chosen)], axis=1)
    if ranked.ndim == 3:  # [B, 2, K]: one ranking loss per member.
      loss = jax.vmap(pref_losses.plackett_luce, in_axes=2, out_axes=1)(ranked)
    else:
      loss = pref_losses.plackett_luce(ranked)
  else:
    raise ValueError(f"loss.name must be one of {LOSSES}, got {name!r}")
  if cfg.get("center_coef", 0.0):
    loss = loss + cfg["center_coef"] * pref_losses.center_penalty(r_chosen, r_rejected)
  return loss


def bootstrap_weights(rng: jax.Array, num_pairs: int, first_member: int,
                      num_members: int) -> jax.Array:
  """Poisson(1) online-bagging weights ``[B, K]``; member k uses ``fold_in(rng, k)``."""
  draws = [jax.random.poisson(jax.random.fold_in(rng, first_member + k), 1.0, (num_pairs,))
           for k in range(num_members)]
  return jnp.stack(draws, axis=1).astype(jnp.float32)


def make_loss_fn(loss_cfg: Mapping[str, Any], *, num_columns: int, objectives: Sequence[str],
                 num_segments: int | None):
  """``(model, batch, rng) -> (loss, metrics)`` for the train core.

  ``num_columns`` is the number of reward outputs (1, K members or O objectives).
  """
  loss_cfg = dict(loss_cfg)
  unknown = sorted(set(loss_cfg) - LOSS_FIELDS)
  if unknown or loss_cfg.get("name") not in LOSSES:
    raise ValueError(f"loss config: name must be one of {LOSSES} (got {loss_cfg.get('name')!r}); "
                     f"unknown fields {unknown}; known: {sorted(LOSS_FIELDS)}")
  bootstrap = bool(loss_cfg.get("bootstrap")) and not objectives
  first_member = int(loss_cfg.get("first_member", 0))

  def loss_fn(model, batch, rng):
    r_c, r_r = pair_rewards(model, batch, num_segments)
    r_c2 = r_c.reshape(r_c.shape[0], -1)
    r_r2 = r_r.reshape(r_r.shape[0], -1)
    losses = per_pair_loss(loss_cfg, r_c2, r_r2, batch["outcome"])
    column_mask = jnp.broadcast_to(batch["pair_mask"][:, None], losses.shape)
    if objectives:
      column_mask = column_mask * batch["objective_mask"]
    weights = batch["weight"][:, None] * column_mask
    if bootstrap:
      weights = weights * bootstrap_weights(rng, losses.shape[0], first_member, num_columns)
    count = jnp.maximum(jnp.sum(column_mask, axis=0), 1.0)
    column_loss = jnp.sum(jnp.where(weights > 0, weights * losses, 0.0), axis=0) / count
    margin = r_c2 - r_r2
    decisive = column_mask * (batch["outcome"] != 0.5)[:, None]
    signed = jnp.where(batch["outcome"][:, None] > 0.5, margin, -margin)
    metrics = {
        "accuracy": jnp.sum(decisive * (signed > 0)) / jnp.maximum(jnp.sum(decisive), 1.0),
        "mean_margin": jnp.sum(decisive * signed) / jnp.maximum(jnp.sum(decisive), 1.0),
        "num_pairs": jnp.sum(batch["pair_mask"]),
    }
    names = objectives or [str(k) for k in range(num_columns)]
    if num_columns > 1:
      prefix = "objective_loss/" if objectives else "member_loss/"
      metrics.update({prefix + n: column_loss[k] for k, n in enumerate(names)})
    return jnp.sum(column_loss), metrics

  return loss_fn


# ----------------------------------------------------------------------------- data


def objective_table(source: Any, objectives: Sequence[str], data_cfg: Mapping[str, Any]
                    ) -> np.ndarray:
  """``[len(source), O]`` 0/1: which objectives each source row is labelled with."""
  fixed, field = data_cfg.get("objective"), data_cfg.get("objective_field") or "objective"
  table = np.zeros((len(source), len(objectives)), np.float32)
  unlabelled = 0
  for i in range(len(source)):
    row = source[i]
    labels = fixed if fixed else (row.get("meta") or {}).get(field)
    if labels is None:
      unlabelled += 1
      continue
    for label in [labels] if isinstance(labels, str) else labels:
      if label not in objectives:
        raise ValueError(f"row {row.get('id', i)}: meta[{field!r}]={label!r} is not one of "
                         f"the model's objectives {list(objectives)}")
      table[i, objectives.index(label)] = 1.0
  if unlabelled:
    logging.warning("%d of %d pairs have no objective label (meta[%r]); they contribute "
                    "no loss", unlabelled, len(source), field)
  return table


class ObjectiveMaskIterator:
  """Adds ``objective_mask [B, O]`` (looked up by ``example_index``); checkpointable."""

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]], table: np.ndarray):
    self._it, self._table = iterator, table

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return add_objective_mask(next(self._it), self._table)

  def get_state(self) -> Any:
    return self._it.get_state()

  def set_state(self, state: Any) -> None:
    self._it.set_state(state)


def add_objective_mask(batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
  index = batch["example_index"]
  mask = np.where((index >= 0)[:, None], table[np.maximum(index, 0)], 0.0)
  return {**batch, "objective_mask": mask.astype(np.float32)}


def eval_batches(config: Any, source: Any, tokenizer: Any, table: np.ndarray | None
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
  """The whole eval split as padded pair batches (fixed order, padded last batch)."""
  pcfg = experiment.pipeline_config(
      config.data, mode="padded", shuffle=False, num_epochs=1, drop_remainder=False,
      batch_size=int(config.eval.batch_size))
  iterator = iter(pipeline_lib.preference_dataset(source, tokenizer, pcfg))
  batches = list(iterator)
  if table is not None:
    batches = [add_objective_mask(b, table) for b in batches]
  dropped = {k: v for k, v in iterator.counters.items() if k.startswith("dropped_") and v}
  if dropped:
    logging.warning("eval split: pairs dropped by the pipeline: %s", dropped)
  return batches, dropped


# ----------------------------------------------------------------------------- eval


class Evaluator:
  """Full-pass reward-model evaluation; plugs into ``train_loop`` as hook + eval path.

  The hook remembers the latest state; when the loop asks for eval data, the
  evaluator scores the eval split with that state, writes ``eval_<step>.json``
  and the reliability plot, and hands the loop one "batch" holding the
  finished metrics, which ``passthrough`` returns unchanged, so they are logged
  to ``metrics.jsonl``/TensorBoard like any eval metric.
  """

  def __init__(self, *, graphdef, batches, dropped, source, mesh, workdir, config,
               objectives: Sequence[str], num_columns: int):
    self._batches, self._dropped, self._source = batches, dropped, source
    self._mesh, self._workdir = mesh, workdir
    self._objectives, self._num_columns = tuple(objectives), num_columns
    self._num_bins = int(config.eval.num_bins)
    self._subset_field = config.eval.get("subset_field")
    self._forward = jax.jit(lambda params, extra, batch: pair_rewards(
        train.merge_model(graphdef, params, extra), batch, None))
    self._state, self._step = None, None
    self._subset_cache: list[str] | None = None
    self.last: tuple[int, dict[str, float]] | None = None

  def record_state(self, step: int, state: Any, metrics: Any) -> None:
    del metrics
    self._state, self._step = state, step

  def _put(self, batch):
    if self._mesh is None:
      return jax.device_put(batch)
    return jax.device_put(batch, sharding_lib.batch_shardings(batch, self._mesh))

  def _collect(self, params, extra) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "r_c", "r_r", "outcome", "c_len", "r_len", "index", "objective_mask")}
    for batch in self._batches:
      r_c, r_r = jax.device_get(self._forward(params, extra, self._put(batch)))
      real = batch["pair_mask"] > 0
      b = real.shape[0]
      response_len = batch["loss_mask"].sum(axis=1)
      parts["r_c"].append(np.asarray(r_c).reshape(b, -1)[real])
      parts["r_r"].append(np.asarray(r_r).reshape(b, -1)[real])
      parts["outcome"].append(batch["outcome"][real])
      parts["c_len"].append(response_len[:b][real])
      parts["r_len"].append(response_len[b:][real])
      parts["index"].append(batch["example_index"][real])
      if "objective_mask" in batch:
        parts["objective_mask"].append(batch["objective_mask"][real])
    return {k: np.concatenate(v) for k, v in parts.items() if v}

  def _subsets(self, index: np.ndarray) -> list[str] | None:
    """``meta[eval.subset_field]`` of every eval pair, when every pair has one."""
    if not self._subset_field:
      return None
    if self._subset_cache is None:
      values = [(self._source[int(i)].get("meta") or {}).get(self._subset_field) for i in index]
      self._subset_cache = [] if any(v is None for v in values) else [str(v) for v in values]
    return self._subset_cache or None

  def _metrics(self, d: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, list]]:
    common_args = dict(outcome=d["outcome"], chosen_len=d["c_len"], rejected_len=d["r_len"],
                       num_bins=self._num_bins)
    if self._objectives:
      labelled = d["objective_mask"].sum(axis=1) > 0
      column = np.argmax(d["objective_mask"], axis=1)
      pick = lambda r: np.take_along_axis(r, column[:, None], axis=1)[:, 0]  # noqa: E731
      sel = {k: v[labelled] for k, v in common_args.items() if k != "num_bins"}
      main = evals.evaluate_preferences(
          pick(d["r_c"])[labelled], pick(d["r_r"])[labelled], num_bins=self._num_bins,
          subsets=self._maybe(self._subsets(d["index"]), labelled), **sel)
      metrics, reliability = self._symmetric_calibration(
          main.metrics, pick(d["r_c"])[labelled], pick(d["r_r"])[labelled], sel["outcome"])
      metrics["unlabelled_pairs"] = float((~labelled).sum())
      for k, name in enumerate(self._objectives):
        on = d["objective_mask"][:, k] > 0
        if on.any():
          res = evals.evaluate_preferences(d["r_c"][on, k], d["r_r"][on, k],
                                           outcome=d["outcome"][on], num_bins=self._num_bins)
          metrics.update({f"objective/{name}/{m}": res.metrics[m]
                          for m in ("accuracy", "mean_margin", "bt_log_loss")})
      return metrics, reliability
    r_c, r_r = d["r_c"].mean(axis=1), d["r_r"].mean(axis=1)
    main = evals.evaluate_preferences(r_c, r_r, subsets=self._subsets(d["index"]),
                                      **common_args)
    metrics, reliability = self._symmetric_calibration(main.metrics, r_c, r_r, d["outcome"])
    if self._num_columns > 1:
      for k in range(self._num_columns):
        res = evals.evaluate_preferences(d["r_c"][:, k], d["r_r"][:, k], **common_args)
        metrics.update({f"member/{k}/{m}": res.metrics[m]
                        for m in ("accuracy", "bt_log_loss")})
      signed = np.where(d["outcome"][:, None] >= 0.5, 1.0, -1.0) * (d["r_c"] - d["r_r"])
      metrics.update(evals.ensemble_disagreement(signed))
    return metrics, reliability

  def _symmetric_calibration(self, metrics, r_c, r_r, outcome):
    """ECE and reliability bins of P(a ≻ b) over both orders (a, b) and (b, a) of each pair.

    With the chosen side always first every label is 1, and the ECE of σ(Δ)
    would reward overconfidence; scoring both orders balances the labels.
    The one-sided value stays as ``ece_chosen_first``.
    """
    decisive = outcome != 0.5
    prob = 1.0 / (1.0 + np.exp(-(r_c - r_r)[decisive]))
    label = (outcome[decisive] > 0.5).astype(np.float64)
    probs, labels = np.concatenate([prob, 1 - prob]), np.concatenate([label, 1 - label])
    metrics = dict(metrics, ece_chosen_first=metrics["ece"],
                   ece=evals.expected_calibration_error(probs, labels, self._num_bins))
    return metrics, evals.reliability_diagram(probs, labels, self._num_bins)

  @staticmethod
  def _maybe(subsets, keep):
    return None if subsets is None else [s for s, k in zip(subsets, keep) if k]

  def evaluate(self, params, extra, step: int) -> dict[str, float]:
    """Scores the eval split; writes ``eval_<step>.json`` and the reliability PNG."""
    start = time.time()
    data = self._collect(params, extra)
    metrics, reliability = self._metrics(data)
    metrics.update({f"pipeline/{k}": float(v) for k, v in self._dropped.items()})
    figure = os.path.join(self._workdir, "figures", f"reliability_{step}.png")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(figure), exist_ok=True)
      evals.plot_reliability(reliability, figure, title=f"reward model, step {step}")
      summary_lib.write_json(os.path.join(self._workdir, f"eval_{step}.json"),
                            {"step": step, "metrics": metrics, "reliability": reliability,
                             "figure": os.path.relpath(figure, self._workdir)})
    logging.info("eval at step %d (%.1fs): accuracy=%.4f ece=%.4f length-only=%s", step,
                 time.time() - start, metrics["accuracy"], metrics["ece"],
                 metrics.get("length_baseline_accuracy"))
    self.last = (step, metrics)
    return metrics

  def eval_data(self) -> list[dict[str, np.ndarray]]:
    if self._state is None:  # Resumed past the last step: ``run`` evaluates afterwards.
      return [{"unavailable": np.float32(1.0)}]
    metrics = self.evaluate(self._state.params, self._state.extra, self._step)
    return [{k: np.float32(v) for k, v in metrics.items()}]

  @staticmethod
  def passthrough(model, batch):
    del model
    return dict(batch)


# ----------------------------------------------------------------------------- model


def clip_per_member(max_norm: float) -> optax.GradientTransformation:
  """Clips each deep-ensemble member's gradient (leading axis of every leaf) to ``max_norm``."""

  def update(updates, state, params=None):
    del params
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
             for g in jax.tree.leaves(updates))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))
    return jax.tree.map(
        lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype),
        updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg: Any, deep_ensemble: bool):
  cfg = train.OptimizerConfig.from_mapping(opt_cfg)
  if not (deep_ensemble and cfg.grad_clip_norm > 0):
    return train.make_optimizer(cfg)
  tx, schedule = train.make_optimizer(cfg.__class__(**{**cfg.__dict__, "grad_clip_norm": 0.0}))
  return optax.chain(clip_per_member(cfg.grad_clip_norm), tx), schedule


def reward_columns(model: nnx.Module) -> tuple[int, tuple[str, ...]]:
  """(number of reward outputs, objective names or ())."""
  if isinstance(model, heads_lib.MultiObjectiveRewardModel):
    return len(model.names), tuple(model.names)
  if isinstance(model, (heads_lib.MultiHeadEnsemble, heads_lib.DeepEnsemble)):
    return model.num_members, ()
  if isinstance(model, heads_lib.RewardModel):
    return 1, ()
  raise ValueError(f"model.head must be 'reward', 'reward_ensemble:K' or 'multi:...'; "
                   f"got a {type(model).__name__}")


# ----------------------------------------------------------------------------- run


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the reward model of ``config`` in ``workdir``.

  Returns:
    ``{"summary": summary.json contents, "eval": final eval metrics}``.
  """
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  mesh = experiment.make_mesh(config.mesh)
  train_source = experiment.load_split(config.data, config.data.train_split)
  eval_source = experiment.load_split(config.data, config.data.eval_split)
  pcfg = experiment.pipeline_config(config.data)
  num_segments = pcfg.max_segments_per_row if pcfg.mode == "packed" else None
  with jax.set_mesh(mesh):
    model = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                  seed=int(config.seed))
    num_columns, objectives = reward_columns(model)
    tables = [None, None]
    if objectives:
      tables = [objective_table(s, objectives, config.data) for s in (train_source, eval_source)]
    train_iter = iter(pipeline_lib.preference_dataset(train_source, tokenizer, pcfg))
    if objectives:
      train_iter = ObjectiveMaskIterator(train_iter, tables[0])
    batches, dropped = eval_batches(config, eval_source, tokenizer, tables[1])
    graphdef = train.split_model(model)[0]
    evaluator = Evaluator(graphdef=graphdef, batches=batches, dropped=dropped,
                          source=eval_source, mesh=mesh, workdir=workdir, config=config,
                          objectives=objectives, num_columns=num_columns)
    loss_fn = make_loss_fn(config.loss, num_columns=num_columns, objectives=objectives,
                           num_segments=num_segments)
    deep = isinstance(model, heads_lib.DeepEnsemble)
    real_key = "segment_ids" if num_segments else "attention_mask"
    evaluate = config.eval.get("enabled", True)
    result = train.train_loop(
        workdir=workdir, config=config, model=model, loss_fn=loss_fn,
        optimizer=make_optimizer(config.optimizer, deep), loop=config.loop,
        train_iter=train_iter, eval_fn=evaluator.passthrough if evaluate else None,
        eval_data=evaluator.eval_data if evaluate else None,
        tokens_in_batch=lambda b: float(np.count_nonzero(b[real_key])),
        mesh=mesh, partition_rules=experiment.partition_rules(model, mesh),
        hooks=[evaluator.record_state] if evaluate else [])
    final_step = result.summary.get("final_step", int(jax.device_get(result.state.step)))
    if evaluate and (evaluator.last is None or evaluator.last[0] != final_step):
      evaluator.evaluate(result.state.params, result.state.extra, final_step)
  return {"summary": result.summary, "eval": evaluator.last[1] if evaluator.last else None,
          "preempted": result.preempted}


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
