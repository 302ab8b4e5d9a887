"""Policy-optimisation losses: PPO clip, value loss, GAE, REINFORCE/RLOO, KL estimators.

Pure JAX (no flax), in the style of rlax/optax. Token-level arrays are
``[B, T]`` with a ``mask [B, T]`` that is 1 on RESPONSE tokens (the tokens the
policy generated) and 0 on prompt and padding tokens; masked positions never
contribute to any loss, statistic or advantage. Every function computes and
returns at least float32 (bfloat16 inputs give float32; float64 stays float64
under x64).

Conventions:
  * ``logp`` is the log-probability of each sampled token under the policy
    being optimised, ``old_logp`` under the policy that sampled it (behaviour
    policy), ``ref_logp`` under the frozen reference policy.
  * Losses are returned per token (``[B, T]``, zero where ``mask`` is 0) together
    with per-sequence reductions (``[B]``); callers choose the batch reduction
    (``aggregate_loss`` implements the common ones).
  * Advantages, returns and baselines are treated as constants by the losses
    (``jax.lax.stop_gradient``), as in every policy-gradient estimator.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

from prefjax.losses._common import as_float

Array = jax.Array
KLKind = Literal["k1", "k2", "k3"]
AggregateMode = Literal["token_mean", "sequence_mean", "sequence_sum_norm"]


_MAX_LOG_RATIO = 80.0  # exp(80) ≈ 5.5e34, finite in float32.


def _f32(*xs: Array) -> tuple[Array, ...]:
  """Casts to at least float32 (bf16/f16/int -> f32; f64 stays f64 under x64)."""
  return tuple(as_float(x) for x in xs)


def _zero_masked(mask: Array, *xs: Array) -> tuple[Array, ...]:
  """Zeroes masked entries before any arithmetic on them.

  A ``where`` applied only at the end would still let NaN/inf padding poison
  the gradient (0 · inf = NaN in the backward pass); zeroing first does not.
  """
  return tuple(jnp.where(mask > 0, x, 0) for x in xs)


# ----------------------------------------------------------------------------
# Masked reductions.
# ----------------------------------------------------------------------------


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = -1) -> Array:
  """Σ mask·x along ``axis`` (at least float32); masked entries never leak NaN/inf."""
  x, mask = _f32(x, mask)
  chex.assert_equal_shape([x, mask])
  (x,) = _zero_masked(mask, x)
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = -1) -> Array:
  """Σ mask·x / Σ mask along ``axis``; ``[B, T] -> [B]`` by default. Empty rows give 0."""
  count = jnp.sum(as_float(mask), axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, *, unbiased: bool = False) -> Array:
  """Variance of the masked entries of ``x`` (all axes); Bessel-corrected if ``unbiased``."""
  x, mask = _f32(x, mask)
  chex.assert_equal_shape([x, mask])
  (x,) = _zero_masked(mask, x)
  mean = masked_mean(x, mask, axis=None)
  count = jnp.sum(mask)
  sq = masked_sum(jnp.square(x - mean), mask, axis=None)
  denom = jnp.maximum(count - 1.0, 1.0) if unbiased else jnp.maximum(count, 1.0)
  return sq / denom


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """Masked whitening: (x − μ) / √(σ² + eps) over the entries where ``mask`` is 1.

  μ and σ² are the (population) mean and variance over ALL masked entries of
  the batch, so the whitened entries have mean 0 and variance 1 (up to eps). (TRL's
  ``masked_whiten`` uses the sample variance: a factor √((n−1)/n), n masked entries.)
  With ``shift_mean=False`` the mean is added back (only the scale changes).
  Masked-out entries are returned as 0.

  Args:
    x: any shape, e.g. advantages ``[B, T]``.
    mask: same shape as ``x``.
    shift_mean: whether the output is centred.
    eps: variance floor.

  Returns:
    float32 array shaped like ``x``.
  """
  x, mask = _f32(x, mask)
  chex.assert_equal_shape([x, mask])
  (x,) = _zero_masked(mask, x)
  mean = masked_mean(x, mask, axis=None)
  var = masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask > 0, out, 0.0)


def aggregate_loss(per_token: Array, mask: Array, mode: AggregateMode = "token_mean",
                   *, max_tokens: int | None = None) -> Array:
  """Reduces a per-token loss ``[B, T]`` to a scalar.

  Modes:
    * ``token_mean``: Σ_bt m·ℓ / Σ_bt m — every response token weighs the same
      (DAPO, arXiv 2503.14476).
    * ``sequence_mean``: mean_b (Σ_t m·ℓ / Σ_t m) over rows with at least one
      response token — every sequence weighs the same (original PPO-for-LMs /
      GRPO, arXiv 2402.03300); all-padding rows (batch filler) are ignored.
    * ``sequence_sum_norm``: Σ_bt m·ℓ / (B · max_tokens) with a constant
      ``max_tokens`` (default T), free of length bias (Dr. GRPO, "Understanding
      R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783).
  """
  per_token, mask = _f32(per_token, mask)
  chex.assert_rank([per_token, mask], 2)
  chex.assert_equal_shape([per_token, mask])
  if mode == "token_mean":
    return masked_sum(per_token, mask, axis=None) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "sequence_mean":
    has_tokens = (jnp.sum(mask, axis=1) > 0).astype(per_token.dtype)
    return jnp.sum(masked_mean(per_token, mask) * has_tokens) / jnp.maximum(
        jnp.sum(has_tokens), 1.0)
  if mode == "sequence_sum_norm":
    norm = per_token.shape[1] if max_tokens is None else max_tokens
    return masked_sum(per_token, mask, axis=None) / (per_token.shape[0] * norm)
  raise ValueError(f"unknown aggregate mode {mode!r}; expected one of "
                   "'token_mean', 'sequence_mean', 'sequence_sum_norm'")


def _broadcast_to_tokens(x: Array, like: Array, name: str) -> Array:
  """Per-sequence ``[B]`` values broadcast to ``[B, T]``; ``[B, T]`` passes through."""
  x = as_float(x)
  if x.ndim == 1:
    if x.shape[0] != like.shape[0]:
      raise ValueError(f"{name} has shape {x.shape}; expected [{like.shape[0]}] or {like.shape}")
    return jnp.broadcast_to(x[:, None], like.shape)
  chex.assert_equal_shape([x, like])
  return x


# ----------------------------------------------------------------------------
# PPO.
# ----------------------------------------------------------------------------


class PPOLoss(NamedTuple):
  """Output of :func:`ppo_clip_loss`.

  Attributes:
    per_token: ``[B, T]`` clipped surrogate loss, 0 where ``mask`` is 0.
    per_sequence: ``[B]`` masked mean of ``per_token`` over each sequence.
    ratio: ``[B, T]`` importance ratio π/π_old (1 where masked).
    clip_fraction: ``[B]`` fraction of response tokens whose gradient the
      clip removed (ratio outside the trust region in the direction the
      advantage pushes it, or beyond the dual clip).
    approx_kl: ``[B]`` masked mean of the k3 estimate of KL(π_old ‖ π) (TRL logs k2,
      ½·(log r)², as approxkl).
  """
  per_token: Array
  per_sequence: Array
  ratio: Array
  clip_fraction: Array
  approx_kl: Array


def ppo_clip_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, *,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  dual_clip: float | None = None) -> PPOLoss:
  """PPO clipped surrogate per token.

  ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1−ε_low, 1+ε_high)·A_t), ρ_t = exp(logp_t − old_logp_t).

  "Proximal Policy Optimization Algorithms", Schulman et al. 2017, arXiv
  1707.06347. ``clip_eps_high`` gives the asymmetric "clip-higher" range of
  DAPO (arXiv 2503.14476); ``dual_clip`` = c > 1 additionally bounds the loss of
  negative advantages by −c·A ("Mastering Complex Control in MOBA Games with
  Deep Reinforcement Learning", Ye et al. 2020, arXiv 1912.09729).

  Args:
    logp: ``[B, T]`` token log-probs under the current policy (differentiated).
    old_logp: ``[B, T]`` token log-probs under the sampling policy (constant).
    advantages: ``[B, T]`` per-token or ``[B]`` per-sequence advantages (constant).
    mask: ``[B, T]`` 1 on response tokens.
    clip_eps: ε_low (and ε_high when ``clip_eps_high`` is None).
    clip_eps_high: optional ε_high.
    dual_clip: optional c > 1 for dual clipping.

  Returns:
    :class:`PPOLoss` (float32).
  """
  logp, old_logp, mask = _f32(logp, old_logp, mask)
  chex.assert_rank([logp, old_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, mask])
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  adv = jax.lax.stop_gradient(_broadcast_to_tokens(advantages, logp, "advantages"))
  logp, old_logp, adv = _zero_masked(mask, logp, jax.lax.stop_gradient(old_logp), adv)

  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  # exp overflows to inf above log ρ ≈ 88.7, and a zero gradient times inf is NaN. Where
  # A ≥ 0 (or A < 0 under the dual clip) the loss is then decided by a clip or by A = 0,
  # whose gradient is 0 whether ρ is inf or merely large, so the branches may see a
  # bounded ρ there. A < 0 without the dual clip keeps its honest +inf loss.
  bounded = (adv >= 0) if dual_clip is None else jnp.ones_like(adv, bool)
  safe_ratio = jnp.exp(jnp.where(bounded, jnp.minimum(log_ratio, _MAX_LOG_RATIO), log_ratio))
  unclipped = -safe_ratio * adv
  clipped = -jnp.clip(safe_ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  per_token = jnp.maximum(unclipped, clipped)
  if dual_clip is not None:
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, -dual_clip * adv), per_token)
  per_token = jnp.where(mask > 0, per_token, 0.0)

  cut = ((ratio > 1.0 + eps_high) & (adv > 0)) | ((ratio < 1.0 - eps_low) & (adv < 0))
  if dual_clip is not None:
    cut = cut | ((ratio > dual_clip) & (adv < 0))
  approx_kl = jnp.expm1(log_ratio) - log_ratio  # k3 of KL(π_old‖π), samples from π_old.
  return PPOLoss(
      per_token=per_token,
      per_sequence=masked_mean(per_token, mask),
      ratio=ratio,
      clip_fraction=masked_mean(cut.astype(jnp.float32), mask),
      approx_kl=masked_mean(jax.lax.stop_gradient(approx_kl), mask),
  )


class ValueLoss(NamedTuple):
  """Output of :func:`value_loss`.

  Attributes:
    per_token: ``[B, T]`` loss, 0 where masked.
    per_sequence: ``[B]`` masked mean over each sequence.
    clip_fraction: ``[B]`` fraction of tokens where the clipped branch was taken.
  """
  per_token: Array
  per_sequence: Array
  clip_fraction: Array


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *,
               clip_eps: float | None = 0.2) -> ValueLoss:
  """Clipped value-function loss per token.

  ℓ_t = ½·max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −ε, ε) − R_t)²);
  with ``clip_eps=None`` it is ½(V_t − R_t)². Value clipping as in the PPO
  reference implementation (Schulman et al. 2017, arXiv 1707.06347; analysed in
  "Implementation Matters in Deep Policy Gradients", Engstrom et al. 2020,
  arXiv 2005.12729).

  Args:
    values: ``[B, T]`` current value predictions (differentiated).
    old_values: ``[B, T]`` values at sampling time (constant).
    returns: ``[B, T]`` regression targets, e.g. from :func:`gae` (constant).
    mask: ``[B, T]``.
    clip_eps: clip range ε in value units, or None.

  Returns:
    :class:`ValueLoss` (float32).
  """
  values, old_values, returns, mask = _f32(values, old_values, returns, mask)
  chex.assert_rank([values, old_values, returns, mask], 2)
  chex.assert_equal_shape([values, old_values, returns, mask])
  values, old_values, returns = _zero_masked(
      mask, values, jax.lax.stop_gradient(old_values), jax.lax.stop_gradient(returns))
  unclipped = jnp.square(values - returns)
  if clip_eps is None:
    per_token, cut = 0.5 * unclipped, jnp.zeros_like(values)
  else:
    v_clip = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    clipped = jnp.square(v_clip - returns)
    per_token = 0.5 * jnp.maximum(unclipped, clipped)
    cut = (clipped > unclipped).astype(jnp.float32)
  per_token = jnp.where(mask > 0, per_token, 0.0)
  return ValueLoss(per_token, masked_mean(per_token, mask), masked_mean(cut, mask))


# ----------------------------------------------------------------------------
# Advantage estimation.
# ----------------------------------------------------------------------------


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float,
        last_value: Array | None = None) -> tuple[Array, Array]:
  """Generalised advantage estimation over the masked steps of each row.

  δ_t = r_t + γ·V_{t'} − V_t,  A_t = δ_t + γλ·A_{t'},  R_t = A_t + V_t,
  where t' is the NEXT step with ``mask`` 1 (masked positions are not steps:
  they are skipped, so right padding, left padding and masked-out tool/observation
  tokens inside a response all work). After the last step V = ``last_value``
  (bootstrap for truncated rows) or 0 (terminated rows).

  "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", Schulman et al. 2015, arXiv 1506.02438.

  Args:
    rewards: ``[B, T]`` per-step rewards (ignored where masked).
    values: ``[B, T]`` value estimates V_t.
    mask: ``[B, T]`` 1 on steps.
    gamma: discount γ.
    lam: GAE λ.
    last_value: optional ``[B]`` value after the last step.

  Returns:
    ``(advantages, returns)``, both ``[B, T]`` float32, 0 where masked; neither
    carries gradient.
  """
  rewards, values, mask = _f32(rewards, values, mask)
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  rewards, values = _zero_masked(mask, *jax.lax.stop_gradient((rewards, values)))
  batch = rewards.shape[0]
  if last_value is None:
    next_value = jnp.zeros((batch,), rewards.dtype)
  else:
    next_value = jax.lax.stop_gradient(as_float(last_value)).astype(rewards.dtype)
    chex.assert_shape(next_value, (batch,))

  def step(carry, xs):
    next_v, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_v - v
    adv = delta + gamma * lam * next_adv
    valid = m > 0
    carry = (jnp.where(valid, v, next_v), jnp.where(valid, adv, next_adv))
    return carry, jnp.where(valid, adv, 0.0)

  init = (next_value, jnp.zeros((batch,), rewards.dtype))
  _, adv_t = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv_t.T
  returns = jnp.where(mask > 0, advantages + values, 0.0)
  return advantages, returns


def rloo_advantages(rewards: Array, mask: Array | None = None) -> Array:
  """REINFORCE leave-one-out advantages within groups of samples of one prompt.

  A_i = r_i − (1/(k−1))·Σ_{j≠i} r_j  =  k/(k−1)·(r_i − mean_j r_j).

  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs", Ahmadian et al. 2024, arXiv 2402.14740; "Buy 4
  REINFORCE Samples, Get a Baseline for Free!", Kool et al. 2019.

  Args:
    rewards: ``[P, k]`` rewards of k samples for each of P prompts.
    mask: optional ``[P, k]`` (1 = sample present) for groups of unequal size;
      k is then the per-group count.

  Returns:
    ``[P, k]`` float32 advantages (constant); 0 for absent samples and for
    groups with fewer than two samples (which have no leave-one-out baseline).
  """
  rewards = jax.lax.stop_gradient(as_float(rewards))
  chex.assert_rank(rewards, 2)
  if mask is None:
    if rewards.shape[1] < 2:
      raise ValueError(f"RLOO needs at least 2 samples per prompt, got rewards {rewards.shape}")
    mask = jnp.ones_like(rewards)
  mask = as_float(mask)
  chex.assert_equal_shape([rewards, mask])
  count = jnp.sum(mask, axis=1, keepdims=True)
  total = masked_sum(rewards, mask, axis=1)[:, None]
  baseline = (total - rewards) / jnp.maximum(count - 1.0, 1.0)
  return jnp.where((mask > 0) & (count > 1), rewards - baseline, 0.0)


def group_normalized_advantages(rewards: Array, mask: Array | None = None, *,
                                scale_by_std: bool = True, eps: float = 1e-6) -> Array:
  """GRPO group-relative advantages: A_i = (r_i − mean_g r) / (std_g r + eps).

  "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", Shao et al. 2024, arXiv 2402.03300. ``scale_by_std=False`` drops the
  std division (Dr. GRPO, arXiv 2503.20783). std is the population std; TRL's
  GRPOTrainer divides by the sample std (ddof 1), √((k−1)/k) times ours, e.g. 0.87 at k = 4.

  Args:
    rewards: ``[P, k]``.
    mask: optional ``[P, k]`` presence mask.
    scale_by_std: divide by the group std.
    eps: added to the std.

  Returns:
    ``[P, k]`` float32 (constant), 0 for absent samples.
  """
  rewards = jax.lax.stop_gradient(as_float(rewards))
  chex.assert_rank(rewards, 2)
  mask = jnp.ones_like(rewards) if mask is None else as_float(mask)
  chex.assert_equal_shape([rewards, mask])
  mean = masked_mean(rewards, mask, axis=1)[:, None]
  adv = rewards - mean
  if scale_by_std:
    var = masked_mean(jnp.square(adv), mask, axis=1)[:, None]
    adv = adv / (jnp.sqrt(var) + eps)
  return jnp.where(mask > 0, adv, 0.0)


def reinforce_advantages(rewards: Array, baseline: Array | float = 0.0) -> Array:
  """REINFORCE with a baseline: A = r − b (b broadcast; both treated as constants).

  "Simple Statistical Gradient-Following Algorithms for Connectionist
  Reinforcement Learning", Williams 1992.
  """
  rewards, baseline = _f32(rewards, baseline)
  return jax.lax.stop_gradient(rewards - baseline)


def policy_gradient_loss(logp: Array, advantages: Array, mask: Array) -> Array:
  """Score-function (REINFORCE) loss per sequence: ℓ_b = −Σ_t m_bt·A_bt·logp_bt.

  With per-sequence advantages ``[B]`` this is −A_b·log π(y_b | x_b), whose
  gradient is the REINFORCE estimator (Williams 1992; RLOO when A comes from
  :func:`rloo_advantages`, arXiv 2402.14740). Advantages are constants.

  Args:
    logp: ``[B, T]`` token log-probs of the sampled tokens (differentiated).
    advantages: ``[B]`` or ``[B, T]``.
    mask: ``[B, T]``.

  Returns:
    ``[B]`` float32 loss.
  """
  logp, mask = _f32(logp, mask)
  chex.assert_rank([logp, mask], 2)
  chex.assert_equal_shape([logp, mask])
  adv = jax.lax.stop_gradient(_broadcast_to_tokens(advantages, logp, "advantages"))
  logp, adv = _zero_masked(mask, logp, adv)
  return -masked_sum(adv * logp, mask)


# ----------------------------------------------------------------------------
# KL divergence.
# ----------------------------------------------------------------------------


def kl_estimate(logp: Array, ref_logp: Array, mask: Array, kind: KLKind = "k3") -> Array:
  """Per-token sample estimate of KL(π ‖ π_ref) from tokens sampled from π.

  With log r = ref_logp − logp:
    k1 = −log r                 (unbiased, high variance, can be negative)
    k2 = ½(log r)²              (biased, low variance, ≥ 0)
    k3 = (r − 1) − log r        (unbiased, low variance, ≥ 0)
  J. Schulman, "Approximating KL Divergence" (blog post, 2020).

  The default, k3, is for measuring the KL. As a stop-gradient penalty in a reward only
  k1 gives the KL's gradient (Tang & Munos 2025), hence k1 in ``kl_penalized_rewards``.

  Args:
    logp: ``[B, T]`` log-probs of the sampled tokens under π.
    ref_logp: ``[B, T]`` under π_ref.
    mask: ``[B, T]``.
    kind: "k1", "k2" or "k3".

  Returns:
    ``[B, T]`` float32, 0 where masked. Gradients flow into both inputs.
  """
  logp, ref_logp, mask = _f32(logp, ref_logp, mask)
  chex.assert_equal_shape([logp, ref_logp, mask])
  logp, ref_logp = _zero_masked(mask, logp, ref_logp)
  log_r = ref_logp - logp
  if kind == "k1":
    est = -log_r
  elif kind == "k2":
    est = 0.5 * jnp.square(log_r)
  elif kind == "k3":
    est = jnp.expm1(log_r) - log_r
  else:
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'")
  return jnp.where(mask > 0, est, 0.0)


def sequence_kl(logp: Array, ref_logp: Array, mask: Array, kind: KLKind = "k3") -> Array:
  """Per-sequence KL estimate ``[B]``: Σ_t of :func:`kl_estimate` over response tokens."""
  return jnp.sum(kl_estimate(logp, ref_logp, mask, kind), axis=-1)


def exact_kl(logits_p: Array, logits_q: Array, mask: Array) -> Array:
  """Exact per-position KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) over the full vocabulary.

  Meant for small vocabularies (tests, synthetic worlds); memory is O(B·T·V).

  Args:
    logits_p: ``[..., V]`` unnormalised logits of p; −inf (a filtered token) adds 0.
    logits_q: ``[..., V]`` unnormalised logits of q (−inf where p > 0 gives +inf).
    mask: ``[...]``.

  Returns:
    ``[...]`` float32, 0 where masked.
  """
  logits_p, logits_q, mask = _f32(logits_p, logits_q, mask)
  chex.assert_equal_shape([logits_p, logits_q])
  chex.assert_shape(mask, logits_p.shape[:-1])
  logits_p, logits_q = _zero_masked(mask[..., None], logits_p, logits_q)
  logp = jax.nn.log_softmax(logits_p, axis=-1)
  logq = jax.nn.log_softmax(logits_q, axis=-1)
  support = logp > -jnp.inf  # tokens p never draws (top-k/top-p filtered) add 0, not 0·inf
  logp, logq = (jnp.where(support, x, 0.0) for x in (logp, logq))
  kl = jnp.sum(jnp.where(support, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)
  return jnp.where(mask > 0, kl, 0.0)


def entropy_from_logits(logits: Array, mask: Array) -> Array:
  """Per-position entropy H = −Σ_v p_v log p_v of softmax(logits) (PPO entropy bonus).

  Args:
    logits: ``[..., V]``; −inf (a filtered token) adds 0.
    mask: ``[...]``.

  Returns:
    ``[...]`` at least float32, 0 where masked.
  """
  (logits,) = _f32(logits)
  chex.assert_shape(mask, logits.shape[:-1])
  (logits,) = _zero_masked(jnp.asarray(mask)[..., None], logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  support = logp > -jnp.inf  # a filtered (−inf) logit adds 0, not 0·inf
  logp = jnp.where(support, logp, 0.0)
  plogp = jnp.where(support, jnp.exp(logp) * logp, 0.0)
  return jnp.where(jnp.asarray(mask) > 0, -jnp.sum(plogp, axis=-1), 0.0)


def kl_penalized_rewards(scores: Array, logp: Array, ref_logp: Array, mask: Array, *,
                         kl_coef: float, kind: KLKind = "k1") -> tuple[Array, Array]:
  """Per-token RLHF rewards: r_t = −β·kl_t, plus the sequence score on its last response token.

  The standard PPO-for-LMs reward shaping ("Fine-Tuning Language Models from
  Human Preferences", Ziegler et al. 2019, arXiv 1909.08593). The score goes on the last
  token the policy produced (its EOS); TRL's PPOTrainer puts it one position later, past
  the response, and keeps a value there.

  Args:
    scores: ``[B]`` reward-model scores of the full responses.
    logp: ``[B, T]`` policy token log-probs at sampling time.
    ref_logp: ``[B, T]`` reference token log-probs.
    mask: ``[B, T]`` response mask.
    kl_coef: β.
    kind: KL estimator (see :func:`kl_estimate`).

  Returns:
    ``(rewards [B, T], kl [B, T])`` float32 constants, 0 where masked.
  """
  scores, mask = _f32(scores, mask)
  chex.assert_rank([scores, mask], [1, 2])
  chex.assert_shape(scores, (mask.shape[0],))  # a [1] score would broadcast to every row
  kl = jax.lax.stop_gradient(kl_estimate(logp, ref_logp, mask, kind))
  positions = jnp.arange(mask.shape[1], dtype=jnp.int32)
  last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)
  is_last = positions[None, :] == last[:, None]
  rewards = -kl_coef * kl + jnp.where(is_last, scores[:, None], 0.0)
  return jax.lax.stop_gradient(jnp.where(mask > 0, rewards, 0.0)), kl
