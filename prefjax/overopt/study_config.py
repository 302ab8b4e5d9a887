"""Checks the numbers of a reproduce config (``configs/reproduce/*.py``) before the study runs.

``check(config)`` raises one ``ValueError`` naming the dotted field (``bandit.smallest``)
and its allowed range, before anything is trained or written: a bad value would
otherwise surface late, deep in a library function that cannot name the field, or
not at all (an empty list of settings makes a criterion pass vacuously).
Ranges are what the study's code needs, not what the shipped configs happen to use.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

from absl import logging

from prefjax.losses import registry as loss_registry
from prefjax.overopt import bandit
from prefjax.overopt import bon
from prefjax.overopt import direct_criteria
from prefjax.overopt import direct_study
from prefjax.overopt import policy_net
from prefjax.rl import algorithms as rl_algorithms
from prefjax.rl import rewards as rl_rewards


def check(config: Any) -> None:
  """Checks ``config.bandit`` (when not None) and the text-world fields ``reproduce`` reads."""
  text = config.get("text")
  if config.get("bandit") is None and not (text and text.get("enabled")):
    raise ValueError("nothing to run: config.bandit is None and config.text.enabled is not "
                     "True (is this a reproduce config?)")
  if config.get("bandit") is not None:
    check_bandit(config.bandit)
  if text and text.get("enabled"):
    check_text(text)


def check_bandit(cfg: Any, name: str = "bandit") -> None:
  """Every numeric field of a bandit-study config (``study.run_bandit_study``)."""
  _ints(f"{name}.world_seeds", cfg.world_seeds, lo=0, distinct=True)
  _dataclass(f"{name}.world", bandit.WorldConfig, dict(cfg.world))
  if cfg.world.num_prompts < 2:
    raise ValueError(f"{name}.world.num_prompts must be >= 2 (standard errors bootstrap over "
                     f"prompts), got {cfg.world.num_prompts}")
  _int(f"{name}.seeds", cfg.seeds, lo=1)
  _int(f"{name}.num_bootstrap", cfg.num_bootstrap, lo=2)
  widths = _ints(f"{name}.sizes.widths", cfg.sizes.widths, lo=1, increasing=True)
  _int(f"{name}.sizes.num_pairs", cfg.sizes.num_pairs, lo=1)
  _int(f"{name}.smallest", cfg.smallest, lo=1, hi=len(widths),
       why=f" (the number of {name}.sizes.widths)")
  _int(f"{name}.data.width", cfg.data.width, lo=1)
  _ints(f"{name}.data.num_pairs", cfg.data.num_pairs, lo=1, min_len=2, distinct=True)
  _int(f"{name}.ensembles.width", cfg.ensembles.width, lo=1)
  _reals(f"{name}.ensembles.label_noise", cfg.ensembles.label_noise, lo=0.0, hi=0.5,
         hi_open=True, distinct=True)
  _real(f"{name}.ensembles.uwo_lambda", cfg.ensembles.uwo_lambda, lo=0.0)
  _check_grids(cfg, name)
  _check_estimator(cfg.estimator, f"{name}.estimator")
  _check_learned_policy(cfg, name)
  if cfg.direct.enabled:
    _check_direct(cfg.direct, f"{name}.direct")
  _check_proxies(cfg, name)  # last: the settings' own fields are checked above


def check_text(cfg: Any, name: str = "text") -> None:
  """The counts, sizes and seeds the text study (``experiments/text_study.py``) reads
  itself; the binaries it runs check the rest of their own configs."""
  _ints(f"{name}.world_seeds", cfg.get("world_seeds") or (), lo=0, min_len=0, distinct=True)
  if cfg.get("num_bootstrap"):
    _int(f"{name}.num_bootstrap", cfg.num_bootstrap, lo=2)
  # Increasing: G1-text takes the first two as the smallest proxies.
  widths = _ints(f"{name}.proxy.widths", cfg.proxy.widths, lo=1, increasing=True)
  for key in ("num_layers", "steps", "batch_size"):
    _int(f"{name}.proxy.{key}", cfg.proxy[key], lo=1)
  _int(f"{name}.proxy.seed", cfg.proxy.seed, lo=0)
  _int(f"{name}.pairs.num_pairs", cfg.pairs.num_pairs, lo=1)
  _int(f"{name}.pairs.seed", cfg.pairs.seed, lo=0)
  if cfg.get("sft") is not None:
    _int(f"{name}.sft.num_pairs", cfg.sft.num_pairs, lo=1)
    _int(f"{name}.sft.steps", cfg.sft.steps, lo=1)
    _int(f"{name}.sft.data_seed", cfg.sft.data_seed, lo=0)
  _int(f"{name}.bon.num_prompts", cfg.bon.num_prompts, lo=2, why=" (SEs bootstrap over prompts)")
  samples = _int(f"{name}.bon.num_samples", cfg.bon.num_samples, lo=1)
  points = _int(f"{name}.bon.num_points", cfg.bon.num_points, lo=3, why=" (the fits need 3)")
  if len(bon.log_spaced_ns(samples, points)) < 3:
    raise ValueError(f"{name}.bon.num_samples={samples} and {name}.bon.num_points={points} give "
                     "fewer than 3 distinct n; the fits need 3")
  _ints(f"{name}.rl.widths", cfg.rl.widths, lo=1, distinct=True)
  if not set(cfg.rl.widths) <= set(widths):
    raise ValueError(f"{name}.rl.widths must be among {name}.proxy.widths {tuple(widths)}, got "
                     f"{tuple(cfg.rl.widths)}")
  _real(f"{name}.rl.kl_coef", cfg.rl.kl_coef, lo=0.0)
  _reals(f"{name}.dpo.betas", cfg.dpo.betas, lo=0.0, lo_open=True, distinct=True)
  loss_betas = dict(cfg.dpo.get("loss_betas") or {})
  for loss, betas in loss_betas.items():
    _reals(f"{name}.dpo.loss_betas.{loss}", betas, lo=0.0, lo_open=True, distinct=True)
  few = [loss for loss in cfg.dpo.losses
         if len(loss_betas.get(loss, cfg.dpo.betas)) < direct_criteria.D1_MIN_BETAS]
  if few:  # a smoke run's two β are fine; its D1 then reports itself not evaluable
    logging.warning("%s.dpo: %s run fewer than %d β, so D1 will be not evaluable (a failure)",
                    name, few, direct_criteria.D1_MIN_BETAS)
  if cfg.dpo.get("learning_rate") is not None:
    _real(f"{name}.dpo.learning_rate", cfg.dpo.learning_rate, lo=0.0, lo_open=True)
  for stage in ("rl", "dpo"):
    steps = _int(f"{name}.{stage}.steps", cfg[stage].steps, lo=1)
    _int(f"{name}.{stage}.eval_every", cfg[stage].eval_every, lo=1, hi=steps,
         why=f" (at most {name}.{stage}.steps)")
  _int(f"{name}.eval.num_prompts", cfg.eval.num_prompts, lo=2,
       why=" (SEs bootstrap over prompts)")
  _int(f"{name}.eval.samples_per_prompt", cfg.eval.samples_per_prompt, lo=1)
  _int(f"{name}.eval.seed", cfg.eval.seed, lo=0)
  _check_text_names(cfg, name)


def _check_text_names(cfg: Any, name: str) -> None:
  """The world, RL algorithms and DPO losses by name: each would otherwise fail only when
  its stage starts, minutes in, with a message that does not name the field."""
  if cfg.get("world") is not None:  # the text world's (the HH world has none)
    try:
      world = rl_rewards.world_from_config(dict(cfg.world))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}.world: {e}") from e
    _real(f"{name}.world.repeat_threshold", world.repeat_threshold, lo=0.0, hi=1.0,
          lo_open=True, why=" (the share of a response one character may fill before gold "
                            "falls)")
  algorithms = [("algorithm", cfg.rl.get("algorithm", "rloo"))]
  algorithms += [("frontier_algorithms", a) for a in cfg.rl.get("frontier_algorithms", ())]
  for field, algorithm in algorithms:
    if algorithm not in rl_algorithms.algorithm_names():
      raise ValueError(f"{name}.rl.{field}: {algorithm!r} is not one of "
                       f"{rl_algorithms.algorithm_names()}")
  for loss in cfg.dpo.losses:
    try:
      loss_registry.direct_loss_spec(loss)
    except KeyError as e:
      raise ValueError(f"{name}.dpo.losses: {e.args[0]}") from e


def _check_grids(cfg: Any, name: str) -> None:
  n_max = _int(f"{name}.bon.n_max", cfg.bon.n_max, lo=3)
  num_ns = _int(f"{name}.bon.num_ns", cfg.bon.num_ns, lo=3)
  distinct = len(bon.log_spaced_ns(n_max, num_ns))
  if distinct < 3:  # rounding log-spaced values to integers merges the small ones
    raise ValueError(f"{name}.bon.n_max={n_max} and {name}.bon.num_ns={num_ns} give only "
                     f"{distinct} distinct n; the fits need >= 3")
  _int(f"{name}.data.n_fixed", cfg.data.n_fixed, lo=1, hi=n_max,
       why=f" (a best-of-n n, at most {name}.bon.n_max)")
  beta_min = _real(f"{name}.rl.beta_min", cfg.rl.beta_min, lo=0.0, lo_open=True)
  _real(f"{name}.rl.beta_max", cfg.rl.beta_max, lo=beta_min, lo_open=True,
        why=f" (above {name}.rl.beta_min)")
  _int(f"{name}.rl.num_betas", cfg.rl.num_betas, lo=3, why=" (the fits need 3 points)")


def _check_proxies(cfg: Any, name: str) -> None:
  """The proxy config with every setting's overrides, as ``study.proxy_config`` builds it."""
  settings = [(f"{name}.sizes", dict(width=w, num_pairs=cfg.sizes.num_pairs))
              for w in cfg.sizes.widths]
  settings += [(f"{name}.data", dict(width=cfg.data.width, num_pairs=n))
               for n in cfg.data.num_pairs]
  settings += [(f"{name}.ensembles", dict(width=cfg.ensembles.width, label_noise=x))
               for x in cfg.ensembles.label_noise]
  if cfg.direct.enabled:
    settings.append((f"{name}.direct", dict(width=cfg.direct.proxy_width,
                                            num_pairs=cfg.direct.num_pairs)))
  for where, overrides in settings:
    _dataclass(f"{name}.proxy", bandit.ProxyConfig, {**dict(cfg.proxy), **overrides},
               context=f" (the proxies of {where}: "
                       + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")")


def _check_estimator(cfg: Any, name: str) -> None:
  num_samples = _int(f"{name}.num_samples", cfg.num_samples, lo=1)
  _ints(f"{name}.ns", cfg.ns, lo=1, hi=num_samples, why=f" (at most {name}.num_samples)")
  _int(f"{name}.mc_repeats", cfg.mc_repeats, lo=1)


def _check_learned_policy(cfg: Any, name: str) -> None:
  lp, name = cfg.learned_policy, f"{name}.learned_policy"
  if not lp.enabled:
    return
  _reals(f"{name}.lams", lp.lams, lo=0.0, lo_open=True)
  # More than the world has means all of them, as 0 does (``study.learned_policy_rows``).
  _int(f"{name}.num_prompts", lp.num_prompts, lo=0, why=" (0 = all)")
  _dataclass(f"{name}.policy", policy_net.PolicyConfig, dict(lp.policy))


def _check_direct(cfg: Any, name: str) -> None:
  unknown = sorted(set(cfg.losses) - set(direct_study.LOSSES))
  if not cfg.losses or unknown:
    raise ValueError(f"{name}.losses must be a non-empty subset of {direct_study.LOSSES}, "
                     f"got {tuple(cfg.losses)}")
  _int(f"{name}.num_betas", cfg.num_betas, lo=direct_criteria.D1_MIN_BETAS,
       why=" (D1 compares two fits through the reference on them)")
  kl_range = _reals(f"{name}.kl_range", cfg.kl_range, lo=0.0, lo_open=True, min_len=2)
  if len(kl_range) != 2 or not kl_range[0] < kl_range[1]:
    raise ValueError(f"{name}.kl_range must be (low, high) with 0 < low < high, got "
                     f"{tuple(kl_range)}")
  _int(f"{name}.proxy_width", cfg.proxy_width, lo=1)
  _int(f"{name}.num_pairs", cfg.num_pairs, lo=direct_study.BATCH_SIZE,
       why=" (the sweeps' batch size, direct_study.BATCH_SIZE)")
  _int(f"{name}.d3.num_pairs", cfg.d3.num_pairs, lo=1)  # D3 trains full-batch
  for sub, c in ((name, cfg), (f"{name}.d3", cfg.d3)):
    steps = _int(f"{sub}.steps", c.steps, lo=1)
    _int(f"{sub}.eval_every", c.eval_every, lo=1, hi=steps, why=f" (at most {sub}.steps)")


# --------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _int(name: str, value: Any, *, lo: int, hi: int | None = None, why: str = "") -> int:
  if not _is_int(value) or value < lo or (hi is not None and value > hi):
    raise ValueError(f"{name} must be an integer {_range_text(lo, hi)}{why}, got {value!r}")
  return int(value)


def _real(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, hi_open: bool = False, why: str = "") -> float:
  ok = _is_real(value) and math.isfinite(value)
  if ok and lo is not None:
    ok = value > lo if lo_open else value >= lo
  if ok and hi is not None:
    ok = value < hi if hi_open else value <= hi
  if not ok:
    bound = "" if lo is None else " " + _range_text(lo, hi, lo_open, hi_open)
    raise ValueError(f"{name} must be a finite number{bound}{why}, got {value!r}")
  return float(value)


def _sequence(name: str, values: Any, min_len: int, distinct: bool) -> list:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ValueError(f"{name} must be a tuple, got {values!r}")
  if len(values) < min_len:
    raise ValueError(f"{name} needs at least {min_len} value{'s' * (min_len > 1)}, "
                     f"got {tuple(values)}")
  if distinct and len(set(values)) != len(values):
    raise ValueError(f"{name} must not repeat a value, got {tuple(values)}")
  return list(values)


def _ints(name: str, values: Any, *, lo: int, hi: int | None = None, min_len: int = 1,
          distinct: bool = False, increasing: bool = False, why: str = "") -> list[int]:
  values = _sequence(name, values, min_len, distinct or increasing)
  for v in values:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
      raise ValueError(f"{name} must hold integers {_range_text(lo, hi)}{why}, got "
                       f"{tuple(values)}")
  if increasing and values != sorted(values):
    raise ValueError(f"{name} must be in increasing order, got {tuple(values)}")
  return [int(v) for v in values]


def _reals(name: str, values: Any, *, lo: float, hi: float | None = None, lo_open=False,
           hi_open=False, min_len: int = 1, distinct: bool = False) -> list[float]:
  values = _sequence(name, values, min_len, distinct)
  for v in values:
    try:
      _real(name, v, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    except ValueError:
      raise ValueError(f"{name} must hold finite numbers {_range_text(lo, hi, lo_open, hi_open)}"
                       f", got {tuple(values)}") from None
  return [float(v) for v in values]


def _dataclass(name: str, cls: type, fields: dict, context: str = "") -> None:
  """Builds ``cls(**fields)`` as the study will, with its errors naming ``name``'s fields."""
  known = {f.name: f for f in dataclasses.fields(cls)}
  for key, value in fields.items():
    if key not in known:
      raise ValueError(f"{name}.{key} is not a field of {cls.__name__} "
                       f"(fields: {', '.join(known)}){context}")
    kind = known[key].type  # a string: the modules use postponed annotations
    if kind == "int" and not _is_int(value):
      raise ValueError(f"{name}.{key} must be an integer, got {value!r}{context}")
    if kind == "float" and not (_is_real(value) and not math.isnan(value)):
      raise ValueError(f"{name}.{key} must be a number, got {value!r}{context}")
  try:
    cls(**fields)
  except ValueError as e:
    raise ValueError(str(e).replace(f"{cls.__name__}.", f"{name}.")
                     .replace(f"{cls.__name__}:", f"{name}:") + context) from None
