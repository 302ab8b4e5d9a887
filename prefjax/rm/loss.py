"""The reward-model training loss: a ``loss_fn`` for ``prefjax.train`` built from a config.

The loss (``config.loss.name``) is any ``prefjax.losses.PREFERENCE_LOSSES``
entry, called per pair as ``fn(r_chosen, r_rejected, outcome=o, **hparams)``
on ``[B, C]`` rewards (C reward columns: 1, K ensemble members or O named
objectives). Per column the reduction is Σ_i w_i·ℓ_i / (number of real pairs),
w_i = ``weight`` (padded pairs have ``pair_mask`` 0 and weigh 0), and the total
loss is the sum over columns, so ensemble members' gradients are independent.
``center_coef`` > 0 adds the reward-centering penalty (r_c + r_r)².

Ensembles: with ``bootstrap`` each member k weighs each pair by a Poisson(1)
draw from ``fold_in(step_rng, first_member + k)`` (online bagging; Oza &
Russell 2001), so a single RM with ``first_member=k`` reproduces member k. The
draws follow the step, not the example: over E epochs a pair's total weight in a
member is Poisson(E), so members trained for many epochs see nearly the same data
(their weights' spread falls as 1/√E; a fixed bootstrap resample would keep it).
Coste et al. 2023 train their members on the same data from different seeds,
which ``model.ensemble="deep"`` without ``bootstrap`` does.

Multi-objective heads (``multi:helpful,harmless``): objective o's loss uses the
pairs labelled with o (``objective_mask`` [B, O], see ``prefjax.rm.labels``),
normalised by their count in the whole batch, also under gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from prefjax import configlib
from prefjax.losses import preference as pref_losses
from prefjax.losses import registry
from prefjax.losses._common import check_config_label_smoothing
from prefjax.models import heads as heads_lib
from prefjax.models import segments as seg
from prefjax.train.step import WEIGHT_OF

Array = jax.Array
Batch = Mapping[str, Any]
# Fields of ``config.loss`` read by ``RewardLoss`` itself; the rest are loss hyperparameters.
OWN_FIELDS = ("name", "center_coef", "bootstrap", "first_member", "kwargs")


@dataclasses.dataclass(frozen=True)
class RewardLoss:
  """What the reward model optimises (``config.loss``).

  Attributes:
    name: a ``PREFERENCE_LOSSES`` name.
    hparams: its hyperparameters, as sorted (name, value) pairs.
    center_coef: weight of the reward-centering penalty.
    bootstrap: Poisson(1) online-bagging weights per ensemble member.
    first_member: index of the first member this model trains (bootstrap draws).
  """
  name: str = "bt"
  hparams: tuple[tuple[str, Any], ...] = ()
  center_coef: float = 0.0
  bootstrap: bool = False
  first_member: int = 0

  @classmethod
  def from_config(cls, loss_cfg: Mapping[str, Any]) -> RewardLoss:
    """From ``config.loss``. ``kwargs`` (a mapping or ``"a=1,b=2"``) gives hyperparameters
    of the named loss by name, e.g. of a loss registered by your own module.
    Hyperparameters of other registered losses are accepted and ignored, with a warning
    when they differ from their defaults (one config can switch ``name``); any other key
    is an error."""
    cfg = dict(loss_cfg)
    name = cfg.get("name", "bt")
    own = pref_losses.preference_loss_hyperparameters(name)  # Lists the registry if unknown.
    defaults = [pref_losses.preference_loss_hyperparameters(n)
                for n in pref_losses.PREFERENCE_LOSSES]
    configlib.check_fields("config.loss", cfg, set(OWN_FIELDS).union(*defaults))
    _warn_ignored(cfg, name, own, defaults)
    # config.loss carries every built-in hyperparameter at its default: a loss of your
    # own with a hyperparameter of the same name (``margin``) keeps its own default
    # unless the field was moved off the built-in's. Only prefjax's own losses count: a
    # loss of yours must not change what a built-in reads.
    builtin = [(n, d) for n, d in zip(pref_losses.PREFERENCE_LOSSES, defaults)
               if n != name and pref_losses.PREFERENCE_LOSSES[n].__module__.startswith(
                   "prefjax.")]
    carried = {k for k in own if k in cfg and cfg[k] != own[k]
               and any(k in d and d[k] == cfg[k] for _, d in builtin)}
    kwargs = configlib.parse_kwargs(cfg.get("kwargs"))
    for k in sorted(carried - set(kwargs)):  # set in kwargs: trained at that value
      logging.warning("config.loss.%s=%r is the built-in losses' default that config.loss "
                      "carries, so %r keeps its own default %s=%r; to train it at %r, set "
                      "--config.loss.kwargs=%s=%r", k, cfg[k], name, k, own[k], cfg[k], k,
                      cfg[k])
    hparams = {k: cfg[k] for k in own if k in cfg and k not in carried}
    configlib.check_kwargs("config.loss.kwargs", name, kwargs, own)
    # So only a field moved off those defaults is a second setting.
    if twice := {k: hparams[k] for k in kwargs if k in hparams and hparams[k] != own[k]}:
      raise ValueError(f"config.loss.kwargs sets {sorted(twice)}, and config.loss sets them too "
                       f"({', '.join(f'{k}={v!r}' for k, v in sorted(twice.items()))}): set "
                       "each in one place")
    hparams.update(kwargs)
    center_coef = float(cfg.get("center_coef", 0.0))
    if not 0.0 <= center_coef < float("inf"):  # also NaN
      raise ValueError(f"config.loss.center_coef={center_coef} must be >= 0 and finite (a "
                       "negative weight rewards |r_chosen + r_rejected| without bound)")
    first_member = int(cfg.get("first_member", 0))
    if first_member < 0:
      raise ValueError(f"config.loss.first_member={first_member} must be >= 0 (the index of "
                       "this run's first member in a bagged ensemble)")
    if first_member and not cfg.get("bootstrap", False):
      logging.warning("config.loss.first_member=%d is not read without config.loss.bootstrap="
                      "True (it picks the members' bootstrap draws)", first_member)
    loss = cls(name=name, hparams=tuple(sorted(hparams.items())),
               center_coef=center_coef,
               bootstrap=bool(cfg.get("bootstrap", False)), first_member=first_member)
    try:  # The loss's own range checks (ε, ν…), now rather than at the first step.
      loss.per_pair(jnp.zeros(1), jnp.zeros(1), jnp.ones(1))
    except ValueError as e:
      raise ValueError(f"config.loss {name!r} with {dict(loss.hparams)}: {e}") from e
    check_config_label_smoothing("config.loss label_smoothing", hparams.get("label_smoothing"))
    return loss

  def per_pair(self, r_chosen: Array, r_rejected: Array, outcome: Array) -> Array:
    """Unreduced loss, shape of the rewards (``[B]`` or ``[B, C]``)."""
    return self.per_pair_and_metrics(r_chosen, r_rejected, outcome)[0]

  def per_pair_and_metrics(self, r_chosen: Array, r_rejected: Array, outcome: Array
                           ) -> tuple[Array, dict[str, Array]]:
    """``per_pair`` and the loss's own metrics (``registry.split_loss_output``)."""
    fn = pref_losses.get_preference_loss(self.name)
    loss, metrics = registry.split_loss_output(
        fn(r_chosen, r_rejected, outcome=outcome, **dict(self.hparams)), "preference",
        self.name)
    if jnp.shape(loss) != jnp.shape(r_chosen):
      # A [B] outcome broadcast against [B, K] rewards the wrong way gives [B, B] silently.
      hint = ("spread a [B] outcome over ensemble members with outcome[:, None]"
              if jnp.size(loss) > jnp.size(r_chosen) else "do not reduce over the pairs: "
              "the trainer weighs and averages them")
      raise ValueError(f"preference loss {self.name!r} returned shape {jnp.shape(loss)} for "
                       f"rewards of shape {jnp.shape(r_chosen)}; a loss must return one value "
                       f"per reward ({hint})")
    if self.center_coef:
      loss = loss + self.center_coef * pref_losses.center_penalty(r_chosen, r_rejected)
    return loss, metrics


def _warn_ignored(cfg: Mapping[str, Any], name: str, own: Mapping[str, Any],
                  defaults: list[dict[str, Any]]) -> None:
  """Warns of a hyperparameter of another loss set away from its default: ``name`` ignores it."""
  for key, value in sorted(cfg.items()):
    if key in OWN_FIELDS or key in own:
      continue
    if all(value != d[key] for d in defaults if key in d):
      logging.warning("config.loss.%s=%r is not a hyperparameter of %r: ignored (it takes %s)",
                      key, value, name, sorted(own) or "none")


def pair_rewards(model: nnx.Module, batch: Batch, num_segments: int | None
                 ) -> tuple[Array, Array]:
  """Rewards of the chosen and rejected side of every pair: ``[B]`` or ``[B, C]``."""
  if "segment_ids" in batch:
    shared = {"prefix_ids": batch["prefix_ids"]} if "prefix_ids" in batch else {}
    out = model(batch["tokens"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], num_segments=num_segments, **shared)
    return (seg.gather_pairs(out, batch["chosen_index"]),
            seg.gather_pairs(out, batch["rejected_index"]))
  out = model(batch["tokens"], attention_mask=batch["attention_mask"])
  num_pairs = batch["pair_mask"].shape[0]
  return out[:num_pairs], out[num_pairs:]


def bootstrap_weights(rng: Array, num_pairs: int, first_member: int,
                      num_members: int) -> Array:
  """Poisson(1) online-bagging weights ``[B, K]``; member k uses ``fold_in(rng, k)``."""
  draws = [jax.random.poisson(jax.random.fold_in(rng, first_member + k), 1.0, (num_pairs,))
           for k in range(num_members)]
  return jnp.stack(draws, axis=1).astype(jnp.float32)


def _pair_metrics(r_c: Array, r_r: Array, batch: Batch, column_mask: Array) -> dict[str, Array]:
  """Train accuracy and mean signed margin over decisive (non-tie) pairs."""
  margin = r_c - r_r
  decisive = column_mask * (batch["outcome"] != 0.5)[:, None]
  signed = jnp.where(batch["outcome"][:, None] > 0.5, margin, -margin)
  num_decisive = jnp.sum(decisive)
  count = jnp.maximum(num_decisive, 1.0)
  right = jnp.where(signed == 0, 0.5, (signed > 0).astype(jnp.float32))  # as the evaluator
  return {"accuracy": jnp.sum(decisive * right) / count,
          "mean_margin": jnp.sum(decisive * signed) / count,
          "num_pairs": jnp.sum(batch["pair_mask"]),
          # Pooled over microbatches by their decisive pairs, not by all pairs (train/step.py).
          WEIGHT_OF + "accuracy": num_decisive, WEIGHT_OF + "mean_margin": num_decisive}


def _check_columns(loss: RewardLoss, num_columns: int) -> None:
  """A loss on ``[B, C]`` rewards (ensemble members, objectives) with a ``[B]`` outcome, now
  rather than as a broadcasting error at the first step (or silently, when B = C)."""
  if num_columns < 2:
    return
  b = num_columns + 2
  try:
    loss.per_pair(jnp.zeros((b, num_columns)), jnp.ones((b, num_columns)),
                  jnp.linspace(0.0, 1.0, b))
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.loss {loss.name!r} on [B, {num_columns}] rewards (ensemble "
                     f"members or objectives) with a [B] outcome: {e}; a loss of your own "
                     "broadcasts it as outcome[:, None]") from e


def make_loss_fn(loss: RewardLoss | Mapping[str, Any], *, num_columns: int = 1,
                 objectives: Sequence[str] = (), num_segments: int | None = None
                 ) -> Callable[[nnx.Module, Batch, Array], tuple[Array, dict[str, Array]]]:
  """``(model, batch, rng) -> (loss, metrics)`` for the train core.

  ``num_columns`` is the number of reward outputs (1, K members or O objectives) and
  ``objectives`` a multi-objective model's head names: both as
  ``reward_columns(model)`` gives them. ``num_segments``: the packed pipeline's
  ``max_segments_per_row`` (None for padded batches).
  """
  if not isinstance(loss, RewardLoss):
    loss = RewardLoss.from_config(loss)
  _check_columns(loss, num_columns)
  if loss.bootstrap and objectives:
    raise ValueError(f"loss.bootstrap=True resamples the pairs of each ensemble member; the "
                     f"heads {list(objectives)} are objectives, not members: set "
                     "loss.bootstrap=False")
  bootstrap = loss.bootstrap

  def loss_fn(model, batch, rng):
    r_c, r_r = pair_rewards(model, batch, num_segments)
    r_c2 = r_c.reshape(r_c.shape[0], -1)
    r_r2 = r_r.reshape(r_r.shape[0], -1)
    if num_columns == 1:  # one reward a pair: a loss sees [B] rewards, as documented
      losses, own_metrics = loss.per_pair_and_metrics(r_c2[:, 0], r_r2[:, 0], batch["outcome"])
      losses = losses[:, None]
      own_metrics = {k: v[:, None] if jnp.ndim(v) == 1 else v for k, v in own_metrics.items()}
    else:
      losses, own_metrics = loss.per_pair_and_metrics(r_c2, r_r2, batch["outcome"])
    column_mask = jnp.broadcast_to(batch["pair_mask"][:, None], losses.shape)
    if objectives:
      column_mask = column_mask * batch["objective_mask"]
    weights = batch["weight"][:, None] * column_mask
    if bootstrap:
      weights = weights * bootstrap_weights(rng, losses.shape[0], loss.first_member,
                                            num_columns)
    count, loss_weight = _column_counts(batch, column_mask, objectives)
    column_loss = jnp.sum(jnp.where(weights > 0, weights * losses, 0.0), axis=0) / count
    metrics = _pair_metrics(r_c2, r_r2, batch, column_mask)
    # Reduced as the loss is: Σ w·v over the real pairs (and columns) / their count, and
    # pooled over microbatches by that count.
    real = jnp.sum(column_mask)
    for k, v in own_metrics.items():
      if jnp.ndim(v) == 0:
        metrics[k] = v
      else:
        metrics[k] = jnp.sum(jnp.where(weights > 0, weights * v, 0.0)) / jnp.maximum(real, 1.0)
        metrics[WEIGHT_OF + k] = real
    metrics["loss_weight"] = loss_weight
    if num_columns > 1:
      names = objectives or [str(k) for k in range(num_columns)]
      prefix = "objective_loss/" if objectives else "member_loss/"
      metrics.update({prefix + n: column_loss[k] for k, n in enumerate(names)})
    return jnp.sum(column_loss), metrics

  return loss_fn


def _column_counts(batch: Batch, column_mask: Array, objectives: Sequence[str]
                   ) -> tuple[Array, Array]:
  """Each column's divisor and the microbatch's ``loss_weight`` (``prefjax.train.step``).

  One reward or ensemble members: the real pairs of the (micro)batch, which is also its
  weight, so accumulated microbatches pool as one batch. Objectives: the sum of the
  pairs' ``objective_share`` (``prefjax.rm.labels``), a 1/A of the whole batch's labelled
  pairs in each of A microbatches; every microbatch then weighs the same, Σ of those
  divisors, and the pooled loss is each objective's sum over the whole batch divided by
  its whole-batch count, as without accumulation.
  """
  if not objectives:
    real = jnp.sum(batch["pair_mask"])
    return jnp.maximum(jnp.sum(column_mask, axis=0), 1.0), real
  if "objective_share" in batch:
    share = jnp.sum(batch["objective_share"], axis=0)
  else:  # a batch built without prefjax.rm.labels: its own labelled pairs
    logging.warning("a multi-objective batch without objective_share "
                    "(prefjax.rm.labels.add_objective_mask): each batch divides an objective "
                    "by its own labelled pairs, so microbatches of gradient accumulation do "
                    "not add up to the whole batch's loss")
    share = jnp.sum(column_mask, axis=0)
  return jnp.where(share > 0, share, 1.0), jnp.sum(share)


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
