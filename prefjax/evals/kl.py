"""KL(π‖π_ref) of responses sampled from the policy: one function, one metric naming.

Both the direct-alignment eval (``prefjax.direct.evaluation``) and the RL eval
(``prefjax.rl.evaluation``) report, per sampled sequence,

* ``kl/k1``, ``kl/k2``, ``kl/k3``: the estimators of J. Schulman,
  "Approximating KL Divergence" (2020), summed over the response tokens
  (k1 and k3 are unbiased for the sequence KL, k3 ≥ 0 per token);
* ``kl/exact``: Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) over the full vocabulary along
  the sample (its expectation is the sequence KL too, with lower variance),
  when the caller computed it (small vocabularies).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from prefjax.losses import policy as policy_losses


def sequence_kl_estimates(logp: jax.Array, ref_logp: jax.Array, response_mask: jax.Array, *,
                          kinds: Sequence[str] = ("k1", "k3"),
                          exact_per_position: jax.Array | None = None
                          ) -> dict[str, jax.Array]:
  """Per-sequence KL estimates ``[B]`` named ``kl/<kind>`` (and ``kl/exact``).

  Args:
    logp: ``[B, T]`` log-probs of the sampled tokens under the policy.
    ref_logp: ``[B, T]`` the same under the reference.
    response_mask: ``[B, T]`` 1 on response tokens.
    kinds: estimators among ``k1``, ``k2``, ``k3``.
    exact_per_position: optional ``[B, T]`` full-vocabulary KL per position
      (0 off the response), summed into ``kl/exact``.
  """
  out = {f"kl/{kind}": policy_losses.sequence_kl(logp, ref_logp, response_mask, kind)
         for kind in kinds}
  if exact_per_position is not None:
    out["kl/exact"] = jnp.sum(exact_per_position, axis=-1)
  return out
