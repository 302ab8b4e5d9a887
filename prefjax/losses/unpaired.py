"""Unpaired direct alignment: KTO on single responses labelled desirable or not.

Kept apart from ``direct`` because its signature differs (no pairs); it is
registered with ``unpaired=True`` (so it lands in ``UNPAIRED_LOSSES``) and
re-exported from ``prefjax.losses.direct``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.losses._common import Array, ArrayLike, as_float, broadcast_leading
from prefjax.losses._common import check_rank, check_same_shape
from prefjax.losses.registry import UNPAIRED_LOSSES  # noqa: F401
from prefjax.losses.registry import register_direct_loss


@register_direct_loss("kto", unpaired=True)
def kto(policy_logps: ArrayLike, ref_logps: ArrayLike, is_desirable: ArrayLike,
        kl_ref: ArrayLike, *, beta: ArrayLike, desirable_weight: ArrayLike = 1.0,
        undesirable_weight: ArrayLike = 1.0) -> Array:
  """KTO: prospect-theoretic loss on unpaired desirable/undesirable responses.

  L = λ_D·σ(−β(ρ − z₀)) if desirable, λ_U·σ(−β(z₀ − ρ)) if undesirable,
  ρ = policy_logps − ref_logps, z₀ = stop_gradient(max(kl_ref, 0)).

  "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv 2402.01306),
  the KTO loss written as λ_y − v(x, y). The reference point z₀ is the batch KL
  estimate (e.g. the mean log-ratio on mismatched prompt/response pairs),
  computed by the caller and passed in; it is clamped at 0 and no gradient
  flows through it.

  Args:
    policy_logps: ``[B]`` summed log-probs of each response under the policy.
    ref_logps: ``[B]`` the same under the reference model.
    is_desirable: ``[B]`` bool (or 0/1) label of each response.
    kl_ref: scalar or ``[B]`` reference point z₀.
    beta: β.
    desirable_weight: λ_D.
    undesirable_weight: λ_U.

  Returns:
    ``[B]`` loss.
  """
  policy_logps, ref_logps = as_float(policy_logps), as_float(ref_logps)
  check_rank("policy_logps", policy_logps, 1)
  is_desirable = jnp.asarray(is_desirable)
  check_same_shape("policy_logps, ref_logps, is_desirable",
                   policy_logps, ref_logps, is_desirable)
  log_ratio = policy_logps - ref_logps
  z0 = jax.lax.stop_gradient(
      jnp.maximum(broadcast_leading(kl_ref, log_ratio, "kl_ref"), 0.0))
  desirable_loss = as_float(desirable_weight) * jax.nn.sigmoid(-beta * (log_ratio - z0))
  undesirable_loss = as_float(undesirable_weight) * jax.nn.sigmoid(-beta * (z0 - log_ratio))
  return jnp.where(is_desirable.astype(bool), desirable_loss, undesirable_loss)

