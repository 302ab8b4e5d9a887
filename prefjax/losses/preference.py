"""Reward-model losses on scalar rewards (pairwise, ties, k-wise rankings).

All functions are pure, jit/vmap/grad-safe and return the per-example loss;
callers reduce (mean, weighted mean, ...). Rewards are ``[B]`` or ``[B, K]``
(K ensemble members, one loss per member). Losses are computed in float32
(float64 for float64 inputs) and stay finite for reward gaps up to ~1e4.

``PREFERENCE_LOSSES`` maps the name a reward-model config selects
(``config.loss.name``) to a loss on pairs with one signature,
``fn(r_chosen, r_rejected, *, outcome=1.0, **hparams)`` -> the shape of
``r_chosen``, where ``outcome`` (scalar or ``[B]``) is 1 when the chosen side
won, 0 when it lost and 0.5 for a tie; with ``[B, K]`` rewards a ``[B]``
outcome applies to all K members (broadcast it over the trailing axis). Every
hyperparameter has a default. A fork adds one with
``@register_preference_loss("name")``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

from prefjax.losses._common import Array, ArrayLike, as_float, broadcast_leading
from prefjax.losses._common import check_rank, check_same_shape, check_static_range
from prefjax.losses._common import soft_label_smoothing
from prefjax.losses.registry import add_to_registry, check_signature, keyword_hyperparameters
from prefjax.losses.registry import lookup

PreferenceLoss = Callable[..., Array]
_F = TypeVar("_F", bound=PreferenceLoss)

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str) -> Callable[[_F], _F]:
  """Decorator adding ``fn(r_chosen, r_rejected, *, outcome=1.0, **hparams)`` to the registry."""
  def decorator(fn: _F) -> _F:
    check_signature(fn, "preference", name, 2, "outcome",
                    "fn(r_chosen, r_rejected, *, outcome=1.0, **hparams)")
    add_to_registry(PREFERENCE_LOSSES, name, fn, "preference")
    return fn
  return decorator


def get_preference_loss(name: str) -> PreferenceLoss:
  """The registered reward-model loss ``name``; a clear error lists the known names."""
  return lookup(PREFERENCE_LOSSES, name, "preference")


def preference_loss_hyperparameters(name: str) -> dict[str, object]:
  """The keyword hyperparameters of the registered loss ``name`` -> their defaults."""
  return keyword_hyperparameters(get_preference_loss(name), exclude=("outcome",))


def _pair(r_chosen: ArrayLike, r_rejected: ArrayLike, names: str) -> tuple[Array, Array]:
  r_chosen, r_rejected = as_float(r_chosen), as_float(r_rejected)
  check_rank(names, r_chosen, {1, 2})
  check_same_shape(names, r_chosen, r_rejected)
  dtype = jnp.promote_types(r_chosen.dtype, r_rejected.dtype)
  return r_chosen.astype(dtype), r_rejected.astype(dtype)


def bradley_terry(r_chosen: ArrayLike, r_rejected: ArrayLike, *,
                  margin: ArrayLike = 0.0, label_smoothing: ArrayLike = 0.0) -> Array:
  """Bradley–Terry negative log-likelihood of the chosen response winning.

  L = −(1−ε)·logσ(Δ−m) − ε·logσ(−Δ−m),  Δ = r_chosen − r_rejected.

  Bradley & Terry (1952), "Rank Analysis of Incomplete Block Designs: I. The
  Method of Paired Comparisons"; as a reward-model loss in "Training language
  models to follow instructions with human feedback" (arXiv 2203.02155); the
  margin m as in "Llama 2: Open Foundation and Fine-Tuned Chat Models"
  (arXiv 2307.09288). ε (label smoothing) is the probability that the label is
  flipped, and a flipped pair wants the rejected side to win by m; a per-pair
  ε = 1 − p trains on a soft preference p (a tie, p = ½, is then the same loss
  whichever side is called chosen).

  Args:
    r_chosen: ``[B]`` or ``[B, K]`` rewards of the preferred responses.
    r_rejected: same shape as ``r_chosen``.
    margin: scalar or ``[B]`` required reward gap m.
    label_smoothing: scalar or ``[B]`` ε in [0, 1].

  Returns:
    Per-example loss, shape of ``r_chosen``.
  """
  r_chosen, r_rejected = _pair(r_chosen, r_rejected, "r_chosen, r_rejected")
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0)
  margin = broadcast_leading(margin, r_chosen, "margin")
  eps = broadcast_leading(label_smoothing, r_chosen, "label_smoothing")
  delta = r_chosen - r_rejected
  return -(1.0 - eps) * jax.nn.log_sigmoid(delta - margin) - eps * jax.nn.log_sigmoid(
      -delta - margin)


def _outcome_weights(outcome: Array) -> tuple[Array, Array, Array]:
  """Weights of (a wins, tie, b wins) for outcome in [0, 1].

  Exact at 1 (a wins), 0.5 (tie) and 0 (b wins); in between the label is
  linearly interpolated between the two neighbouring outcomes, so that e.g.
  averaged annotator votes give the expected negative log-likelihood.
  """
  win_a = jnp.clip(2.0 * outcome - 1.0, 0.0, 1.0)
  win_b = jnp.clip(1.0 - 2.0 * outcome, 0.0, 1.0)
  return win_a, 1.0 - win_a - win_b, win_b


def bradley_terry_ties(r_a: ArrayLike, r_b: ArrayLike, outcome: ArrayLike, *,
                       nu: ArrayLike) -> Array:
  """Davidson's Bradley–Terry model with ties, negative log-likelihood.

  With π = exp(r) and Z = π_a + π_b + ν·√(π_a·π_b):
  P(a) = π_a/Z, P(b) = π_b/Z, P(tie) = ν·√(π_a·π_b)/Z (computed in log space).
  L = −[w_a·log P(a) + w_tie·log P(tie) + w_b·log P(b)].

  Davidson (1970), "On Extending the Bradley–Terry Model to Accommodate Ties in
  Paired Comparison Experiments", JASA 65(329). As ν → 0 and for decisive
  outcomes this is ``bradley_terry``.

  Args:
    r_a: ``[B]`` or ``[B, K]`` rewards of the first response.
    r_b: same shape as ``r_a``.
    outcome: scalar or ``[B]``: 1 (a wins), 0 (b wins), 0.5 (tie); values in
      between interpolate linearly between neighbouring outcomes.
    nu: tie propensity ν > 0 (scalar, may be a learned array). ν = 0 would give
      a tie probability 0 and an infinite loss on every tie: for no ties use
      ``bradley_terry``, which this tends to as ν → 0.

  Returns:
    Per-example loss, shape of ``r_a``.
  """
  r_a, r_b = _pair(r_a, r_b, "r_a, r_b")
  check_static_range("nu", nu, 0.0, float("inf"), closed_low=False)
  outcome = broadcast_leading(outcome, r_a, "outcome")
  return _davidson_nll(r_a, r_b, outcome, as_float(nu))


# The numerics are jitted (after the static checks above) so that eager calls,
# e.g. in evaluation notebooks, compile one program instead of every primitive.
@jax.jit
def _davidson_nll(r_a: Array, r_b: Array, outcome: Array, nu: Array) -> Array:
  log_nu = jnp.log(nu).astype(r_a.dtype)
  log_tie = log_nu + 0.5 * (r_a + r_b)
  log_z = jax.nn.logsumexp(jnp.stack(jnp.broadcast_arrays(r_a, r_b, log_tie)), axis=0)
  win_a, tie, win_b = _outcome_weights(outcome)
  # `where` keeps ν = 0 with decisive outcomes finite (0·(−inf) would be NaN).
  tie_term = jnp.where(tie > 0, tie * (log_tie - log_z), 0.0)
  return -(win_a * (r_a - log_z) + tie_term + win_b * (r_b - log_z))


def plackett_luce(rewards: ArrayLike, mask: ArrayLike | None = None) -> Array:
  """Plackett–Luce negative log-likelihood of a ranking, best first.

  L = −Σ_k m_k·[r_k − log Σ_{j≥k} m_j·exp(r_j)],  m = mask.

  Plackett (1975), "The Analysis of Permutations", Applied Statistics 24(2);
  Luce (1959); as a K-wise reward-model loss in "Principled Reinforcement
  Learning with Human Feedback from Pairwise or K-wise Comparisons"
  (arXiv 2301.11270). For K = 2 it equals ``bradley_terry``.

  Args:
    rewards: ``[B, K]`` rewards of K responses ordered best first.
    mask: ``[B, K]`` 1 for real entries, 0 for padding (variable list length);
      padding entries take no part in the loss. None means all real.

  Returns:
    Per-example loss ``[B]``.
  """
  rewards = as_float(rewards)
  check_rank("rewards", rewards, 2)
  if mask is None:
    mask = jnp.ones(rewards.shape, bool)
  mask = jnp.asarray(mask)
  check_same_shape("rewards, mask", rewards, mask)
  return _plackett_luce_nll(rewards, mask > 0)


@jax.jit
def _plackett_luce_nll(rewards: Array, mask: Array) -> Array:
  k = rewards.shape[-1]
  # tail[b, i, j]: entry j takes part in the denominator of position i.
  later = jnp.arange(k)[None, :] >= jnp.arange(k)[:, None]
  tail = later[None] & mask[:, None, :]
  # A large finite fill (not −inf) keeps gradients of fully-masked rows finite.
  fill = jnp.finfo(rewards.dtype).min / 4
  scores = jnp.where(tail, rewards[:, None, :], fill)
  log_denominator = jax.nn.logsumexp(scores, axis=-1)
  terms = jnp.where(mask, rewards - log_denominator, 0.0)
  return -jnp.sum(terms, axis=-1)


def center_penalty(r_chosen: ArrayLike, r_rejected: ArrayLike) -> Array:
  """Reward-centering penalty, keeps rewards near zero (identifiable offsets).

  L = (r_chosen + r_rejected)².

  Eisenstein et al. (2023), "Helping or Herding? Reward Model Ensembles
  Mitigate but do not Eliminate Reward Hacking" (arXiv 2312.09244); add it to
  ``bradley_terry`` with a small coefficient (they use 0.01).

  Args:
    r_chosen: ``[B]`` or ``[B, K]`` rewards.
    r_rejected: same shape.

  Returns:
    Per-example penalty, shape of ``r_chosen``.
  """
  r_chosen, r_rejected = _pair(r_chosen, r_rejected, "r_chosen, r_rejected")
  return jnp.square(r_chosen + r_rejected)


def preference_probability(r_a: ArrayLike, r_b: ArrayLike) -> Array:
  """Bradley–Terry probability that a is preferred to b.

  P(a ≻ b) = σ(r_a − r_b).

  Bradley & Terry (1952); see ``bradley_terry``.

  Args:
    r_a: ``[B]`` or ``[B, K]`` rewards.
    r_b: same shape.

  Returns:
    Probabilities, shape of ``r_a``.
  """
  r_a, r_b = _pair(r_a, r_b, "r_a, r_b")
  return jax.nn.sigmoid(r_a - r_b)


# ------------------------------------------------------------------- registered pair losses


@register_preference_loss("bt")
def bt(r_chosen: ArrayLike, r_rejected: ArrayLike, *, outcome: ArrayLike = 1.0,
       margin: ArrayLike = 0.0, label_smoothing: ArrayLike = 0.0) -> Array:
  """Bradley–Terry with the outcome as a soft label.

  L = ``bradley_terry``(r_c, r_r, margin=m, label_smoothing=ε_o),
  ε_o = 1 − [(1−ε)·o + ε·(1−o)]  (o = 1: the usual ε; o = 0: the rejected side must win
  by m; o = ½: a tie pulls Δ to 0).

  See ``bradley_terry`` for the papers.

  Args:
    r_chosen: ``[B]`` or ``[B, K]`` rewards.
    r_rejected: same shape.
    outcome: scalar or ``[B]`` in [0, 1].
    margin: scalar or ``[B]`` margin m.
    label_smoothing: ε in [0, 1].

  Returns:
    Per-example loss, shape of ``r_chosen``.
  """
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0)
  return bradley_terry(r_chosen, r_rejected, margin=margin,
                       label_smoothing=soft_label_smoothing(label_smoothing, outcome))


@register_preference_loss("ties")
def ties(r_chosen: ArrayLike, r_rejected: ArrayLike, *, outcome: ArrayLike = 1.0,
         nu: ArrayLike = 1.0) -> Array:
  """Davidson ties: ``bradley_terry_ties``(r_c, r_r, outcome, nu=ν), ν = 1 by default.

  Davidson (1970), JASA 65(329); see ``bradley_terry_ties``.

  Args:
    r_chosen: ``[B]`` or ``[B, K]`` rewards.
    r_rejected: same shape.
    outcome: scalar or ``[B]``: 1, 0.5 (tie) or 0.
    nu: tie propensity ν > 0.

  Returns:
    Per-example loss, shape of ``r_chosen``.
  """
  return bradley_terry_ties(r_chosen, r_rejected, outcome, nu=nu)


@register_preference_loss("plackett_luce")
def plackett_luce_pair(r_chosen: ArrayLike, r_rejected: ArrayLike, *,
                       outcome: ArrayLike = 1.0) -> Array:
  """Plackett–Luce on a pair's two rankings, weighted by the outcome.

  L = o·PL([r_c, r_r]) + (1 − o)·PL([r_r, r_c]) per ensemble member, ``PL`` =
  ``plackett_luce``: the expected ranking loss when the chosen side ranks first with
  probability o, so a tie (o = ½) pushes neither side. K = 2 is Bradley–Terry with a
  soft label; it is here so that the K-wise code path is trained and tested.

  Plackett (1975), Applied Statistics 24(2); see ``plackett_luce``.

  Args:
    r_chosen: ``[B]`` or ``[B, K]`` rewards.
    r_rejected: same shape.
    outcome: scalar or ``[B]`` in [0, 1].

  Returns:
    Per-example loss, shape of ``r_chosen``.
  """
  r_chosen, r_rejected = _pair(r_chosen, r_rejected, "r_chosen, r_rejected")
  o = broadcast_leading(outcome, r_chosen, "outcome")
  chosen_first = _ranking_loss(jnp.stack([r_chosen, r_rejected], axis=1))
  rejected_first = _ranking_loss(jnp.stack([r_rejected, r_chosen], axis=1))
  return o * chosen_first + (1.0 - o) * rejected_first


def _ranking_loss(ranked: Array) -> Array:
  if ranked.ndim == 3:  # [B, 2, K]: one ranking loss per member.
    return jax.vmap(plackett_luce, in_axes=2, out_axes=1)(ranked)
  return plackett_luce(ranked)
