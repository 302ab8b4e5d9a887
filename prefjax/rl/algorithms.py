"""PPO and RLOO: advantages from a scored rollout and the loss (the update is ``train_loop``'s).

PPO ("Proximal Policy Optimization Algorithms", Schulman et al. 2017,
arXiv:1707.06347, as applied to LMs by Ziegler et al. 2019, arXiv:1909.08593):
per-token reward r_t = −β·kl_t plus the sequence score on the last response
token (``kl_penalized_rewards``), GAE advantages (whitened) and returns from a
value model, clipped surrogate + clipped value loss over minibatch epochs.

RLOO ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs", Ahmadian et al. 2024, arXiv:2402.14740): k
samples per prompt, sequence reward R = score − β·Σ_t kl_t, leave-one-out
baseline A_i = R_i − mean_{j≠i} R_j, the same A on every token of the
sequence; the loss is the (clipped, for epochs > 1) score-function surrogate
summed over a sequence's tokens and averaged over sequences, so one on-policy
epoch is exactly the REINFORCE estimator −A·∇log π(y|x). With epochs > 1 the ratio is
clipped per token, as in PPO; TRL's RLOOTrainer (up to 0.19) clips the sequence's
ratio exp(Σ_t Δlog π) instead. With one epoch (the RLOO configs) the two are the same.

Another method is an :class:`Algorithm` passed to :func:`register_algorithm`: its advantage
function, how its surrogate is aggregated, whether it trains a value model, the group sizes
it samples and the ``HParams`` fields it reads. ``train_rl``, the studies and the configs'
checks read the registry; ``rl.algorithm`` names the entry.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from prefjax import configlib
from prefjax.losses import policy as policy_losses
from prefjax.rl import rollout as rollout_lib
from prefjax.train import state as state_lib

Array = jax.Array
ALWAYS_READ = ("clip_eps", "entropy_coef")  # loss_fn's, for every method
# Keys of ``config.rl`` read by the RL run itself rather than by ``HParams``.
RUN_FIELDS = ("prompts_per_step", "group_size", "epochs", "num_minibatches", "kl_coef",
              "adaptive_kl", "value_trunk", "missing_eos_penalty")


class HParams(NamedTuple):
  """Static loss hyperparameters (hashable: part of the jit cache key)."""
  algorithm: str
  clip_eps: float = 0.2
  vf_coef: float = 0.1
  vf_clip_eps: float | None = 0.2
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  kl_estimator: str = "k1"
  whiten_advantages: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], *, warn: bool = True) -> "HParams":
    """From ``config.rl``; a key that is neither a field nor in ``RUN_FIELDS`` is an error;
    ``warn``: log what is legal but likely unintended (fields the method ignores, k2/k3)."""
    configlib.check_fields("config.rl", cfg, cls._fields + RUN_FIELDS)
    algorithm = cfg["algorithm"]
    method = get_algorithm(algorithm)
    if cfg.get("value_trunk", "separate") not in ("separate", "shared"):
      raise ValueError(f"rl.value_trunk must be 'separate' or 'shared', got "
                       f"{cfg['value_trunk']!r}")
    unread = [f"rl.{k}={cfg[k]!r}" for k in cls._fields[1:]
              if k not in method.reads + ALWAYS_READ and k in cfg
              and cfg[k] != cls._field_defaults[k]]
    if not method.value_model and cfg.get("value_trunk", "separate") != "separate":
      unread.append(f"rl.value_trunk={cfg['value_trunk']!r}")
    if unread and warn:
      logging.warning("%s: not read by %s (its settings: %s)", ", ".join(unread), algorithm,
                      ", ".join(ALWAYS_READ + method.reads))
    estimator = cfg.get("kl_estimator", cls._field_defaults["kl_estimator"])
    if estimator not in ("k1", "k2", "k3"):
      raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")
    if warn and estimator != "k1" and float(cfg.get("kl_coef", 0.0)) > 0:
      logging.warning(
          "rl.kl_estimator=%r: as a penalty in the reward its score-function gradient is not "
          "the KL's (Tang & Munos 2025, arXiv:2506.09477; on the tiny world k3 at β=0.3 ended "
          "at 5.4 nats where k1 held 0.9): the run optimises another objective than "
          "score − β·KL. k1 (the default) is exact; k2/k3 stay for parity with trainers "
          "that use them", estimator)
    fields = {k: cfg[k] for k in cls._fields if k in cfg}
    for name in ("gamma", "lam"):
      if name in fields and not 0.0 <= float(fields[name]) <= 1.0:
        raise ValueError(f"rl.{name}={fields[name]} must be in [0, 1] (GAE discount and "
                         "trace decay)")
    if "clip_eps" in fields and not 0.0 < float(fields["clip_eps"]) < math.inf:
      raise ValueError(f"rl.clip_eps={fields['clip_eps']} must be > 0 and finite (the PPO "
                       "ratio's clip range: at 0 or below every token's gradient is clipped)")
    if "vf_coef" in fields and not 0.0 <= float(fields["vf_coef"]) < math.inf:
      raise ValueError(f"rl.vf_coef={fields['vf_coef']} must be >= 0 and finite (a negative "
                       "weight trains the value head away from the returns)")
    if "entropy_coef" in fields and not 0.0 <= float(fields["entropy_coef"]) < math.inf:
      raise ValueError(f"rl.entropy_coef={fields['entropy_coef']} must be >= 0 and finite (the "
                       "weight of the entropy bonus; 0 turns it off)")
    vf_clip = fields.get("vf_clip_eps")
    if vf_clip is not None and not 0.0 <= float(vf_clip) < math.inf:
      raise ValueError(f"rl.vf_clip_eps={fields['vf_clip_eps']} must be >= 0 and finite (the "
                       "value clip range; 0 or None turns value clipping off)")
    if fields.get("vf_clip_eps") == 0:
      fields["vf_clip_eps"] = None
    return cls(**fields)


def ppo_targets(scores: Array, stats: rollout_lib.TokenStats, loss_mask: Array, *,
                kl_coef: Array, group_size: int, hp: HParams) -> dict[str, Array]:
  """Per-token KL-shaped rewards -> GAE advantages and value targets."""
  del group_size  # one sample per prompt
  rewards, kl = policy_losses.kl_penalized_rewards(
      scores, stats.logp, stats.ref_logp, loss_mask, kl_coef=kl_coef, kind=hp.kl_estimator)
  advantages, returns = policy_losses.gae(rewards, stats.values, loss_mask, gamma=hp.gamma,
                                          lam=hp.lam)
  if hp.whiten_advantages:
    advantages = policy_losses.whiten(advantages, loss_mask)
  return {"advantages": advantages, "returns": returns, "kl": kl}


def rloo_targets(scores: Array, stats: rollout_lib.TokenStats, loss_mask: Array, *,
                 kl_coef: Array, group_size: int, hp: HParams) -> dict[str, Array]:
  """Sequence rewards with the KL penalty -> leave-one-out advantages per sequence.

  ``whiten_advantages`` divides by their population std (ddof 0) without a shift (they sum
  to 0 in each group); TRL's RLOO uses the sample std (ddof 1), 6.9% larger at 8 sequences.
  """
  kl = policy_losses.kl_estimate(stats.logp, stats.ref_logp, loss_mask, hp.kl_estimator)
  rewards = scores - kl_coef * jnp.sum(kl, axis=-1)
  advantages = policy_losses.rloo_advantages(rewards.reshape(-1, group_size)).reshape(-1)
  if hp.whiten_advantages:
    advantages = advantages / (jnp.std(advantages) + 1e-8)
  zeros = jnp.zeros_like(stats.logp)
  return {"advantages": jnp.broadcast_to(advantages[:, None], zeros.shape) * loss_mask,
          "returns": zeros, "kl": jax.lax.stop_gradient(kl)}


class Algorithm(NamedTuple):
  """A policy-optimisation method as ``train_rl`` runs it.

  Attributes:
    targets: ``(scores [N], stats, loss_mask [N, T], *, kl_coef, group_size, hp) ->
      {"advantages": [N, T], "returns": [N, T], "kl": [N, T]}`` (``returns`` are the value
      model's targets; zeros without one). Rows of a group are consecutive.
    loss: the clipped surrogate's aggregation: ``"token_mean"`` (PPO) or
      ``"sequence_sum"`` (summed over a sequence's tokens, averaged over sequences:
      REINFORCE's estimator for one epoch).
    value_model: trains a value head (``value_trunk``) with ``vf_coef`` x the value loss.
    min_group_size, max_group_size: the ``rl.group_size`` it accepts (None: no maximum).
    reads: the ``HParams`` fields it reads besides ``ALWAYS_READ`` (the clipped
      surrogate's and entropy bonus's, which ``loss_fn`` applies to every method); a
      config that sets another one away from its default is warned about.
  """
  targets: Callable[..., dict[str, Array]]
  loss: str
  value_model: bool
  min_group_size: int = 1
  max_group_size: int | None = 1
  reads: tuple[str, ...] = ()

  @property
  def one_per_prompt(self) -> bool:
    """Samples one response per prompt (``rl.group_size`` 1), as PPO does."""
    return self.max_group_size == 1


_ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, algorithm: Algorithm) -> None:
  """Makes ``rl.algorithm=name`` run ``algorithm``; a name taken is an error."""
  if name in _ALGORITHMS:
    raise ValueError(f"RL algorithm {name!r} is already registered")
  if algorithm.loss not in ("token_mean", "sequence_sum"):
    raise ValueError(f"{name}: loss must be 'token_mean' or 'sequence_sum', got "
                     f"{algorithm.loss!r}")
  unknown = set(algorithm.reads) - set(HParams._fields)
  if unknown:
    raise ValueError(f"{name}: reads unknown HParams fields {sorted(unknown)}")
  _ALGORITHMS[name] = algorithm


def algorithm_names() -> tuple[str, ...]:
  return tuple(_ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
  if name not in _ALGORITHMS:
    raise configlib.UnregisteredNameError(
        f"rl.algorithm={name!r} is not one of {algorithm_names()} "
        "(algorithms.register_algorithm adds one; a module of your own that registers one is "
        "imported with --imports=MODULE)")
  return _ALGORITHMS[name]


def check_group_size(name: str, group_size: int) -> int:
  """``group_size`` if ``name`` samples groups of that size, else an error naming the rule."""
  method = get_algorithm(name)
  low, high = method.min_group_size, method.max_group_size
  if group_size < low or (high is not None and group_size > high):
    allowed = f"exactly {low}" if high == low else f"at least {low}" + (
        f" and at most {high}" if high else "")
    raise ValueError(f"rl.group_size={group_size}: {name} samples {allowed} response(s) "
                     "per prompt")
  return group_size


register_algorithm("ppo", Algorithm(
    ppo_targets, "token_mean", value_model=True,
    reads=("kl_estimator", "whiten_advantages", "vf_coef", "vf_clip_eps", "gamma", "lam")))
register_algorithm("rloo", Algorithm(
    rloo_targets, "sequence_sum", value_model=False, min_group_size=2, max_group_size=None,
    reads=("kl_estimator", "whiten_advantages")))


@functools.partial(jax.jit, static_argnames=("graphdef", "hp", "group_size"))
def prepare(graphdef, params, extra, tokens, attention_mask, loss_mask, scores, kl_coef, *,
            hp: HParams, group_size: int) -> dict[str, Array]:
  """Behaviour-policy statistics and advantages of a scored rollout (one jit program)."""
  bundle = state_lib.merge_model(graphdef, params, extra)
  stats = rollout_lib.token_stats(bundle, tokens, attention_mask, loss_mask)
  loss_mask = loss_mask.astype(jnp.float32)
  targets = get_algorithm(hp.algorithm).targets(scores, stats, loss_mask, kl_coef=kl_coef,
                                                group_size=group_size, hp=hp)
  return {"tokens": tokens, "attention_mask": attention_mask, "loss_mask": loss_mask,
          "old_logp": stats.logp, "old_values": stats.values, **targets}


def loss_fn(bundle: rollout_lib.PolicyBundle, batch: Mapping[str, Array],
            hp: HParams) -> tuple[Array, dict[str, Array]]:
  """The clipped surrogate aggregated as the algorithm says (PPO: token mean, RLOO: summed
  over each sequence), plus the value loss when it has a value model."""
  method = get_algorithm(hp.algorithm)
  mask = batch["loss_mask"]
  stats = rollout_lib.token_stats(bundle, batch["tokens"], batch["attention_mask"], mask,
                                  full_vocab=hp.entropy_coef > 0,
                                  with_reference=False)
  ppo = policy_losses.ppo_clip_loss(stats.logp, batch["old_logp"], batch["advantages"], mask,
                                    clip_eps=hp.clip_eps)
  # Token-weighted, like PPO's losses: a sequence's masked mean, spread over its tokens.
  per_token = lambda x: policy_losses.aggregate_loss(  # noqa: E731
      jnp.broadcast_to(x[:, None], mask.shape), mask)
  metrics = {"clip_fraction": per_token(ppo.clip_fraction),
             "approx_kl": per_token(ppo.approx_kl)}
  if method.loss == "token_mean":
    pg_loss = policy_losses.aggregate_loss(ppo.per_token, mask, "token_mean")
  else:
    pg_loss = jnp.mean(jnp.sum(ppo.per_token, axis=-1))
  value_loss = jnp.zeros(())
  if method.value_model:
    vloss = policy_losses.value_loss(stats.values, batch["old_values"], batch["returns"], mask,
                                     clip_eps=hp.vf_clip_eps)
    value_loss = policy_losses.aggregate_loss(vloss.per_token, mask, "token_mean")
    metrics["value_loss"] = value_loss
    metrics["value_clip_fraction"] = per_token(vloss.clip_fraction)
  loss = pg_loss + hp.vf_coef * value_loss
  if hp.entropy_coef > 0:
    entropy = policy_losses.aggregate_loss(stats.entropy, mask, "token_mean")
    loss = loss - hp.entropy_coef * entropy
    metrics["entropy"] = entropy
  metrics["policy_loss"] = pg_loss
  return loss, metrics  # the train step logs ``loss`` itself
