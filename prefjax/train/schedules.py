"""Learning-rate schedules and optimizers built from a config.

A schedule is ``warmup`` (linear from 0 to the peak learning rate over
``warmup_steps``) followed by one of ``constant``, ``linear`` or ``cosine``
decay to ``peak * end_lr_fraction`` at ``total_steps``. The optimizer is
``adamw``, ``adam`` or ``sgd`` (with optional momentum), wrapped with global
norm clipping when ``grad_clip_norm > 0`` (per ensemble member, by
:func:`clip_by_global_norm_per_member`, for stacked deep ensembles).

Configs may be :class:`OptimizerConfig` instances, ``ml_collections``
``ConfigDict`` objects or plain mappings with the same field names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from prefjax import configlib

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer and learning-rate schedule hyperparameters.

  Attributes:
    name: one of ``adamw``, ``adam``, ``sgd``.
    learning_rate: peak learning rate (reached at the end of warmup).
    schedule: decay after warmup: ``constant``, ``linear`` or ``cosine``.
    warmup_steps: linear warmup length in optimizer updates (0 = none).
    total_steps: update count at which decay reaches its end value; required
      for ``linear`` and ``cosine``.
    end_lr_fraction: final learning rate as a fraction of the peak.
    weight_decay: decoupled weight decay (``adamw``; ``sgd`` adds it as L2 decay on
      the update; ``adam`` refuses it), scaled by the schedule.
    decay_biases_and_norms: also decay biases and norm scales (False: only weight
      matrices and embeddings decay, the rule of Hugging Face's Trainer).
    b1, b2, eps: Adam moments and epsilon.
    momentum: SGD momentum (0 = plain SGD).
    nesterov: SGD Nesterov momentum.
    grad_clip_norm: clip gradients to this global norm (0 = no clipping).
  """
  name: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int | None = None
  end_lr_fraction: float = 0.0
  weight_decay: float = 0.0
  decay_biases_and_norms: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  momentum: float = 0.0
  nesterov: bool = False
  grad_clip_norm: float = 0.0

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | "OptimizerConfig") -> "OptimizerConfig":
    """Builds a config from a mapping (e.g. a ``ConfigDict``); unknown keys are errors."""
    return configlib.dataclass_from_mapping(cls, cfg)


# field -> (low, high, closed_low, closed_high, what an out-of-range value would do)
_RANGES = {
    "end_lr_fraction": (0.0, 1.0, True, True, "a negative end rate ascends the loss"),
    "weight_decay": (0.0, math.inf, True, False, "a negative decay grows the weights"),
    "b1": (0.0, 1.0, True, False, "Adam's first-moment decay"),
    "b2": (0.0, 1.0, True, False, "Adam's second-moment decay"),
    "eps": (0.0, math.inf, False, False, "Adam's denominator needs a positive epsilon"),
    "momentum": (0.0, 1.0, True, False, "SGD's momentum"),
    "grad_clip_norm": (0.0, math.inf, True, False, "0 turns clipping off"),
}


def _check_values(cfg: OptimizerConfig) -> None:
  """An infinite rate trains into NaN parameters; a NaN clip norm turns clipping off; a
  value out of its range (a negative end rate or decay, b1 ≥ 1) trains the wrong way."""
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"optimizer.{field.name}={value} must be finite")
  for name, (low, high, closed_low, closed_high, why) in _RANGES.items():
    value = getattr(cfg, name)
    above = value >= low if closed_low else value > low
    below = value <= high if closed_high else value < high
    if not (above and below):
      interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
      raise ValueError(f"optimizer.{name}={value} must be in {interval} ({why})")


def make_schedule(cfg: OptimizerConfig | Mapping[str, Any]) -> optax.Schedule:
  """Returns ``step -> learning rate``: linear warmup then constant/linear/cosine decay."""
  cfg = OptimizerConfig.from_mapping(cfg)
  _check_values(cfg)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
  if cfg.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={cfg.warmup_steps} must be >= 0")
  if not cfg.learning_rate >= 0:  # also NaN
    raise ValueError(f"optimizer.learning_rate={cfg.learning_rate} must be >= 0 (a negative "
                     "rate ascends the loss)")
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    if cfg.total_steps is None or cfg.total_steps <= cfg.warmup_steps:
      raise ValueError(
          f"optimizer.schedule={cfg.schedule!r} needs total_steps > warmup_steps "
          f"(got total_steps={cfg.total_steps}, warmup_steps={cfg.warmup_steps}; the shipped "
          "configs tie total_steps to loop.num_steps, the update count of every trainer "
          "but train_rl, which updates epochs × num_minibatches times a step): lower "
          "--config.optimizer.warmup_steps, or use optimizer.schedule='constant'")
    decay_steps = cfg.total_steps - cfg.warmup_steps
    if cfg.schedule == "linear":
      decay = optax.linear_schedule(peak, end, decay_steps)
    else:
      decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def clip_by_global_norm_per_member(max_norm: float) -> optax.GradientTransformation:
  """Clips each ensemble member's gradient to global norm ``max_norm``.

  Every leaf carries the members on its leading axis (a vmapped deep
  ensemble); member k's norm is taken over slice k of all leaves, so one
  member's large gradient never shrinks another's update.
  """
  def clip(updates, params=None):
    del params
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
             for g in jax.tree.leaves(updates))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))
    return jax.tree.map(
        lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), updates)

  return optax.stateless(clip)


ZERO_RATE = 1e-6  # a learning rate below this fraction of the schedule's peak counts as 0
# A cosine decayed to 0 over exactly the run spends its last 2·√ZERO_RATE/π ≈ 0.064% of
# updates below ZERO_RATE (float32 cannot tell those rates from 0): no warning for that.
ZERO_RATE_TAIL = 1e-3


def updates_at_zero_rate(schedule: optax.Schedule | None, num_updates: int) -> int:
  """How many of a run's updates after the first get learning rate 0, with a warning
  when more than ``ZERO_RATE_TAIL`` of them do: ``total_steps`` below the run's update
  count ends the decay early (RL
  runs count every minibatch update: ``loop.num_steps`` × epochs × minibatches). The
  first update of a warmup has rate 0 by design. Also warns when the run ends while the
  rate still rises to a higher value later (a warmup longer than the run)."""
  if schedule is None or num_updates < 2:
    return 0
  try:  # One program: op by op, the schedule's ops compiled for each new length (1.6 s).
    rates, later = (np.asarray(r, np.float64) for r in jax.jit(
        lambda now, then: (schedule(now), schedule(then)))(
            np.arange(num_updates), np.arange(num_updates, 4 * num_updates)))
  except Exception:  # pylint: disable=broad-except  (a user schedule of scalars only)
    return 0
  if rates.shape != (num_updates,) or later.shape != (3 * num_updates,):
    return 0
  peak = max(rates.max(), later.max())
  if not peak > 0:
    logging.warning("the learning rate is 0 at every one of this run's %d optimizer updates "
                    "(optimizer.learning_rate=0?): no update changes the parameters",
                    num_updates)
    return num_updates - 1
  # Compiled as one program, a rate the formula makes exactly 0 can come out ~1e-10.
  zero = int(np.sum(rates[1:] <= ZERO_RATE * peak))
  if zero > ZERO_RATE_TAIL * num_updates:
    logging.warning("%d of this run's %d optimizer updates have learning rate 0: the "
                    "schedule ends (optimizer.total_steps) before the run does", zero,
                    num_updates)
  later = float(later.max())
  if rates[-1] == rates.max() > 0 and later > 1.001 * rates[-1]:
    logging.warning("the learning rate is still rising when this run's %d optimizer updates "
                    "end (optimizer.warmup_steps longer than the run?): it reaches %.3g, "
                    "%.0f%% of the %.3g it rises to later", num_updates, rates[-1],
                    100 * rates[-1] / later, later)
  return zero


def decayed_leaves(params: Any) -> Any:
  """``True`` at every parameter weight decay applies to: all but biases and norm scales
  (leaves named ``bias`` or ``scale``), whatever leading axes stacking adds."""
  def decays(path, _) -> bool:
    return getattr(path[-1], "key", None) not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimizerConfig | Mapping[str, Any], *, clip_per_member: bool = False,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, schedule)`` for the config; ``schedule`` feeds the lr metric.

  ``clip_per_member``: the parameters are a stacked ensemble (leading member
  axis); ``grad_clip_norm`` then clips each member on its own.
  """
  cfg = OptimizerConfig.from_mapping(cfg)
  schedule = make_schedule(cfg)
  mask = None if cfg.decay_biases_and_norms else decayed_leaves
  if cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=mask)
  elif cfg.name == "adam":
    if cfg.weight_decay:
      raise ValueError(f"optimizer.weight_decay={cfg.weight_decay} with name='adam', which "
                       "has none: use 'adamw'")
    tx = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.name == "sgd":
    tx = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.weight_decay:
      tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask), tx)
  else:
    raise ValueError(f"optimizer.name={cfg.name!r}; expected one of {OPTIMIZERS}")
  if cfg.grad_clip_norm < 0:
    raise ValueError(f"optimizer.grad_clip_norm={cfg.grad_clip_norm} must be >= 0")
  if cfg.grad_clip_norm > 0:
    clip = clip_by_global_norm_per_member if clip_per_member else optax.clip_by_global_norm
    tx = optax.chain(clip(cfg.grad_clip_norm), tx)
  return tx, schedule
