"""Direct-alignment losses (the DPO family) on per-sequence log-probabilities.

Every pairwise loss takes a ``PairLogps`` and keyword hyperparameters,
``fn(x, *, beta, **hparams) -> [B]``, and is registered in ``DIRECT_LOSSES`` so
that a config string selects it. Every extra hyperparameter has a default.
A fork adds a loss with::

  @register_direct_loss("my_loss", reference_free=True, length_normalized=True)
  def my_loss(x: PairLogps, *, beta: float, alpha: float = 1.0) -> jax.Array:
    ...

declaring there what a trainer must know about it (reference-free, length-
normalised, soft labels, unpaired, default NLL weight; see
``prefjax.losses.registry.DirectLossSpec``).

Notation used in the docstrings (all per pair, shape ``[B]``):
  ρ_c = policy_chosen − ref_chosen,  ρ_r = policy_rejected − ref_rejected,
  h = ρ_c − ρ_r,  n_c / n_r = response token counts (clamped to ≥ 1),
  h_n = ρ_c/n_c − ρ_r/n_r (token-averaged log-ratio difference),
  ε = label_smoothing.

All losses compute in float32 (float64 for float64 inputs) and return the
per-example loss; callers reduce. Hyperparameters may be Python numbers or
arrays (scalars or ``[B]``), e.g. a schedule or per-pair soft labels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from prefjax.losses._common import Array, ArrayLike, as_float, check_rank
from prefjax.losses._common import check_same_shape, check_static_range
from prefjax.losses._common import smoothed_logistic
from prefjax.losses.registry import DIRECT_LOSS_SPECS  # noqa: F401
from prefjax.losses.registry import DIRECT_LOSSES
from prefjax.losses.registry import DirectLossSpec  # noqa: F401
from prefjax.losses.registry import UNPAIRED_LOSSES
from prefjax.losses.registry import direct_loss_spec  # noqa: F401
from prefjax.losses.registry import register_direct_loss
from prefjax.losses.registry import unregister_direct_loss  # noqa: F401
# KTO has its own signature (unpaired data) and module; re-exported here.
from prefjax.losses.unpaired import kto  # noqa: F401


class PairLogps(NamedTuple):
  """Per-sequence log-probabilities of B preference pairs."""
  policy_chosen: Array      # [B] summed log-prob of the chosen response tokens
  policy_rejected: Array    # [B]
  ref_chosen: Array         # [B] (zeros when reference-free)
  ref_rejected: Array       # [B]
  chosen_tokens: Array      # [B] response token counts (for length-normalised losses)
  rejected_tokens: Array    # [B]


DirectLoss = Callable[..., Array]


def get_direct_loss(name: str) -> DirectLoss:
  """The registered pairwise loss called ``name``; a clear error lists every registered loss."""
  if name in UNPAIRED_LOSSES:
    raise KeyError(f"direct loss {name!r} is unpaired (its own signature, see "
                   f"prefjax.losses.unpaired); registered pairwise: {sorted(DIRECT_LOSSES)}")
  if name not in DIRECT_LOSSES:
    raise KeyError(f"unknown direct loss {name!r}; registered: {sorted(DIRECT_LOSSES)} "
                   f"(pairwise) and {sorted(UNPAIRED_LOSSES)} (unpaired, own signature)")
  return DIRECT_LOSSES[name]


_FIELDS = ", ".join(PairLogps._fields)


def checked(x: PairLogps) -> PairLogps:
  """``x`` in the losses' compute dtype (float32; float64 under x64), every field a
  ``[B]`` array: what each registered loss does first, a loss of your own included."""
  if not isinstance(x, PairLogps) and not (isinstance(x, tuple) and len(x) == 6):
    raise TypeError(f"expected PairLogps({_FIELDS}), got {type(x).__name__}")
  fields = [as_float(v) for v in x]
  dtype = jnp.result_type(*fields)
  fields = [v.astype(dtype) for v in fields]
  check_rank("PairLogps.policy_chosen", fields[0], 1)
  check_same_shape(f"PairLogps fields ({_FIELDS})", *fields)
  return PairLogps(*fields)


def _log_ratios(x: PairLogps) -> tuple[Array, Array]:
  """(ρ_c, ρ_r): policy-minus-reference log-ratios of chosen and rejected."""
  return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected


def _token_mean(value: Array, count: Array) -> Array:
  return value / jnp.maximum(count, 1.0)


def _mean_log_ratios(x: PairLogps) -> tuple[Array, Array]:
  """Token-averaged log-ratios (ρ_c/n_c, ρ_r/n_r)."""
  rho_c, rho_r = _log_ratios(x)
  return _token_mean(rho_c, x.chosen_tokens), _token_mean(rho_r, x.rejected_tokens)


def implicit_rewards(x: PairLogps, beta: ArrayLike) -> tuple[Array, Array]:
  """DPO implicit rewards (β·ρ_c, β·ρ_r), each ``[B]``.

  "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model" (arXiv 2305.18290), Eq. 5 without the prompt-only partition term.
  """
  x = checked(x)
  rho_c, rho_r = _log_ratios(x)
  return beta * rho_c, beta * rho_r


@register_direct_loss("dpo", soft_label=True, bradley_terry=True)
def dpo(x: PairLogps, *, beta: ArrayLike, label_smoothing: ArrayLike = 0.0) -> Array:
  """DPO, and conservative DPO (cDPO) for ε > 0.

  L = −(1−ε)·logσ(β·h) − ε·logσ(−β·h).

  "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model" (arXiv 2305.18290); cDPO from Mitchell (2023), "A note on DPO with
  noisy preferences & relationship to IPO". A per-pair ε = 1 − p trains on a
  soft preference p (ε = 0.5 for a tie pulls h towards 0).

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: KL-regularisation strength β.
    label_smoothing: ε in [0, 1], scalar or ``[B]``.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0)
  rho_c, rho_r = _log_ratios(x)
  return smoothed_logistic(beta * (rho_c - rho_r), label_smoothing)


@register_direct_loss("robust", bradley_terry=True)
def robust(x: PairLogps, *, beta: ArrayLike, label_smoothing: ArrayLike = 0.0) -> Array:
  """Robust DPO: unbiased DPO loss under label flips with rate ε < 1/2.

  L = (−(1−ε)·logσ(β·h) + ε·logσ(−β·h)) / (1−2ε).

  "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
  (arXiv 2403.00409). ε = 0 is ``dpo``.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.
    label_smoothing: assumed flip rate ε in [0, 0.5).

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("label_smoothing", label_smoothing, 0.0, 0.5, closed_high=False)
  eps = as_float(label_smoothing)
  rho_c, rho_r = _log_ratios(x)
  z = beta * (rho_c - rho_r)
  return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@register_direct_loss("ipo", length_normalized=True)
def ipo(x: PairLogps, *, beta: ArrayLike) -> Array:
  """IPO: squared regression of the token-averaged log-ratio gap onto 1/(2β).

  L = (h_n − 1/(2β))².

  "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (arXiv 2310.12036), Eq. 17 with τ = β; log-probs are averaged
  per token (each of the four divided by its response length), as the IPO
  authors' reported results use.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: regularisation τ = β > 0.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("beta", beta, 0.0, float("inf"), closed_low=False)
  mean_c, mean_r = _mean_log_ratios(x)
  return jnp.square(mean_c - mean_r - 1.0 / (2.0 * beta))


@register_direct_loss("hinge")
def hinge(x: PairLogps, *, beta: ArrayLike) -> Array:
  """SLiC hinge loss on the reference-adjusted log-likelihood gap.

  L = relu(1 − β·h)   (margin δ = 1/β in SLiC's notation).

  "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
  (arXiv 2305.10425), rank-calibration hinge; with the reference log-ratio in
  h, as in RSO ("Statistical Rejection Sampling Improves Preference
  Optimization", arXiv 2309.06657), whose hinge this is.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: inverse margin β.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  rho_c, rho_r = _log_ratios(x)
  return jax.nn.relu(1.0 - beta * (rho_c - rho_r))


@register_direct_loss("exo_pair", soft_label=True)
def exo_pair(x: PairLogps, *, beta: ArrayLike, label_smoothing: ArrayLike = 1e-3) -> Array:
  """EXO (pairwise): reverse KL from the model's pair distribution to the labels.

  L = σ(βh)·(logσ(βh) − log(1−ε)) + σ(−βh)·(logσ(−βh) − log ε).

  "Towards Efficient Exact Optimization of Language Model Alignment"
  (arXiv 2402.00856), EXO-pref with K = 2: KL(p_θ ‖ p_label) where
  p_θ = softmax(β·(ρ_c, ρ_r)) and p_label = (1−ε, ε). The paper uses ε = 1e-3;
  ε must lie in (0, 1) since the label distribution needs full support.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.
    label_smoothing: ε in (0, 1).

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0,
                     closed_low=False, closed_high=False)
  eps = as_float(label_smoothing)
  rho_c, rho_r = _log_ratios(x)
  z = beta * (rho_c - rho_r)
  log_q_win, log_q_lose = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
  return (jnp.exp(log_q_win) * (log_q_win - jnp.log1p(-eps))
          + jnp.exp(log_q_lose) * (log_q_lose - jnp.log(eps)))


@register_direct_loss("nca_pair")
def nca_pair(x: PairLogps, *, beta: ArrayLike) -> Array:
  """NCA (pairwise): absolute-likelihood noise-contrastive alignment.

  L = −logσ(βρ_c) − ½·logσ(−βρ_c) − ½·logσ(−βρ_r).

  "Noise Contrastive Alignment of Language Models with Explicit Rewards"
  (arXiv 2402.05369), NCA loss for K = 2 responses with a hard preference
  label. Unlike DPO it constrains each log-ratio, not only their difference;
  in ρ_c it is minimised at βρ_c = log 2.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  rho_c, rho_r = _log_ratios(x)
  r_c, r_r = beta * rho_c, beta * rho_r
  return -jax.nn.log_sigmoid(r_c) - 0.5 * jax.nn.log_sigmoid(-r_c) - 0.5 * jax.nn.log_sigmoid(-r_r)


@register_direct_loss("bco_pair")
def bco_pair(x: PairLogps, *, beta: ArrayLike, delta: ArrayLike = 0.0) -> Array:
  """BCO (pairwise): binary classification of chosen vs rejected implicit rewards.

  L = −logσ(βρ_c − δ) − logσ(−(βρ_r − δ)).

  "Binary Classifier Optimization for Large Language Model Alignment"
  (arXiv 2404.04656), with the reward shift δ (no gradient flows through it). The
  paper and TRL set δ to a running mean of the implicit rewards; ``train_dpo`` keeps
  no such state and passes the configured constant (``loss.kwargs``, default 0), so
  it trains TRL's ``bco_pair`` with a fixed shift.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.
    delta: reward shift δ, scalar or ``[B]``.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  delta = jax.lax.stop_gradient(as_float(delta))
  rho_c, rho_r = _log_ratios(x)
  return -jax.nn.log_sigmoid(beta * rho_c - delta) - jax.nn.log_sigmoid(delta - beta * rho_r)


@register_direct_loss("sppo_hard")
def sppo_hard(x: PairLogps, *, beta: ArrayLike) -> Array:
  """SPPO with hard win probabilities (1 for chosen, 0 for rejected).

  L = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))².

  "Self-Play Preference Optimization for Language Model Alignment"
  (arXiv 2405.00675), Eq. 4.7 with η = 1/β, P(y_w ≻ π) = 1, P(y_l ≻ π) = 0,
  and the prompt's log-partition term approximated by η/2 (so the two
  targets are ±η/2).

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β > 0 (η = 1/β).

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("beta", beta, 0.0, float("inf"), closed_low=False)
  rho_c, rho_r = _log_ratios(x)
  target = 1.0 / (2.0 * beta)
  return jnp.square(rho_c - target) + jnp.square(rho_r + target)


@register_direct_loss("apo_zero")
def apo_zero(x: PairLogps, *, beta: ArrayLike) -> Array:
  """APO-zero: raise the chosen and lower the rejected likelihood (anchored at 0).

  L = (1 − σ(βρ_c)) + σ(βρ_r).

  "Anchored Preference Optimization and Contrastive Revisions: Addressing
  Underspecification in Alignment" (arXiv 2408.06266), Eq. 7. Use when the
  chosen outputs are better than the model's own.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  rho_c, rho_r = _log_ratios(x)
  return jax.nn.sigmoid(-beta * rho_c) + jax.nn.sigmoid(beta * rho_r)


@register_direct_loss("apo_down")
def apo_down(x: PairLogps, *, beta: ArrayLike) -> Array:
  """APO-down: lower the chosen likelihood, and the rejected one more.

  L = σ(βρ_c) + (1 − σ(β·h)).

  "Anchored Preference Optimization and Contrastive Revisions: Addressing
  Underspecification in Alignment" (arXiv 2408.06266), Eq. 8. Use when the
  chosen outputs are worse than the model's own. Not monotone in ρ_c by
  design: the first term pushes ρ_c down.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  rho_c, rho_r = _log_ratios(x)
  return jax.nn.sigmoid(beta * rho_c) + jax.nn.sigmoid(-beta * (rho_c - rho_r))


@register_direct_loss("sigmoid_norm", length_normalized=True, soft_label=True,
                      bradley_terry=True)
def sigmoid_norm(x: PairLogps, *, beta: ArrayLike, label_smoothing: ArrayLike = 0.0) -> Array:
  """Length-normalised DPO: DPO on token-averaged log-ratios.

  L = −(1−ε)·logσ(β·h_n) − ε·logσ(−β·h_n).

  "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model" (arXiv 2305.18290) with the per-token averaging studied in
  "SimPO: Simple Preference Optimization with a Reference-Free Reward"
  (arXiv 2405.14734), Appendix (length-normalised DPO baseline).

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β (on per-token log-ratios, so typically larger than DPO's).
    label_smoothing: ε in [0, 1], scalar or ``[B]``.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0)
  mean_c, mean_r = _mean_log_ratios(x)
  return smoothed_logistic(beta * (mean_c - mean_r), label_smoothing)


@register_direct_loss("discopop")
def discopop(x: PairLogps, *, beta: ArrayLike, tau: ArrayLike = 0.05) -> Array:
  """DiscoPOP (log-ratio modulated loss): logistic/exponential blend.

  L = (1 − σ(βh/τ))·(−logσ(βh)) + σ(βh/τ)·exp(−βh).

  "Discovering Preference Optimization Algorithms with and for Large Language
  Models" (arXiv 2406.08414), Eq. 5 (LRML), τ = 0.05 as in the paper. The
  exponential term is evaluated as exp(logσ(βh/τ) − βh) so that it stays
  finite for large negative βh. The loss is non-convex and not monotone in h:
  around βh = 0, where the blend switches from the logistic to the
  exponential branch, it rises with h (for τ = 0.05 on about
  −0.12 < βh < 0.07); it decreases in h away from that window.

  Args:
    x: ``PairLogps`` with ``[B]`` fields.
    beta: β.
    tau: modulation temperature τ > 0.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("tau", tau, 0.0, float("inf"), closed_low=False)
  rho_c, rho_r = _log_ratios(x)
  z = beta * (rho_c - rho_r)
  logistic = -jax.nn.log_sigmoid(z)
  exponential = jnp.exp(jax.nn.log_sigmoid(z / tau) - z)
  return jax.nn.sigmoid(-z / tau) * logistic + exponential


@register_direct_loss("simpo", reference_free=True, length_normalized=True,
                      soft_label=True)
def simpo(x: PairLogps, *, beta: ArrayLike, gamma: ArrayLike | None = None,
          gamma_beta_ratio: ArrayLike = 0.5, label_smoothing: ArrayLike = 0.0) -> Array:
  """SimPO: reference-free, length-normalised DPO with a target reward margin γ.

  L = −(1−ε)·logσ(βΔ − γ) − ε·logσ(−βΔ − γ),  Δ = π_c/n_c − π_r/n_r.

  "SimPO: Simple Preference Optimization with a Reference-Free Reward"
  (arXiv 2405.14734), its loss for ε = 0. The reference fields of
  ``x`` are ignored. The authors tune the ratio γ/β rather than γ (their
  released configs range from about 0.1 to 0.8, 0.5 being the most common);
  by default γ = 0.5·β, or pass ``gamma`` to set it directly.

  ε is the probability that the label is flipped, as in cDPO: a flipped pair wants
  the other side to win by γ, so a tie (ε = ½, a soft label of ½) is symmetric in
  the two sides, with its minimum at Δ = 0. The authors' code smooths −logσ(−(βΔ − γ))
  instead, which for a tie still pushes the side called chosen up by γ/β.

  Args:
    x: ``PairLogps`` with ``[B]`` fields (only policy fields and counts used).
    beta: reward scale β (the paper uses 2.0–10).
    gamma: target margin γ; None means ``gamma_beta_ratio * beta``.
    gamma_beta_ratio: γ/β when ``gamma`` is None.
    label_smoothing: ε in [0, 1].

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  check_static_range("label_smoothing", label_smoothing, 0.0, 1.0)
  if gamma is None:
    gamma = gamma_beta_ratio * beta
  z = beta * (_token_mean(x.policy_chosen, x.chosen_tokens)
              - _token_mean(x.policy_rejected, x.rejected_tokens))
  eps = as_float(label_smoothing)
  return -(1.0 - eps) * jax.nn.log_sigmoid(z - gamma) - eps * jax.nn.log_sigmoid(-z - gamma)


# Largest token-averaged log-prob fed to log(1 − p): p = 1 would make the odds infinite.
_MAX_MEAN_LOGP = -1e-6


def _log_odds(mean_logp: Array) -> Array:
  """log(p/(1−p)) from log p ≤ 0, with a stable log(1 − exp(a))."""
  a = jnp.minimum(mean_logp, _MAX_MEAN_LOGP)
  log1m_exp = jnp.where(a > -jnp.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))
  return a - log1m_exp


@register_direct_loss("orpo", reference_free=True, length_normalized=True,
                      nll_alpha=1.0)
def orpo(x: PairLogps, *, beta: ArrayLike) -> Array:
  """ORPO odds-ratio term (the trainer adds the chosen NLL term).

  L = −λ·logσ(log odds(p̄_c) − log odds(p̄_r)),  p̄ = exp(π/n),  λ = β.

  "ORPO: Monolithic Preference Optimization without Reference Model"
  (arXiv 2403.07691), the odds-ratio loss L_OR weighted by λ. The paper's λ
  is passed as ``beta`` (they use λ = 0.1), as in TRL's ORPOConfig, so that a
  β sweep is meaningful for every registry entry. The reference fields are
  ignored.
  Token-averaged log-probs are clamped to ≤ −1e-6 (p̄ = 1 has infinite odds).

  Args:
    x: ``PairLogps`` with ``[B]`` fields (policy log-probs ≤ 0, counts).
    beta: λ, the weight of the odds-ratio term.

  Returns:
    ``[B]`` loss.
  """
  x = checked(x)
  mean_c = _token_mean(x.policy_chosen, x.chosen_tokens)
  mean_r = _token_mean(x.policy_rejected, x.rejected_tokens)
  return -beta * jax.nn.log_sigmoid(_log_odds(mean_c) - _log_odds(mean_r))
