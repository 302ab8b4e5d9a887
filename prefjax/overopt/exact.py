"""Exact best-of-n and the closed-form KL-regularised (RL) path on finite candidate sets.

When a prompt has M candidate responses with known reference probabilities
π_ref (a "bandit world", or a pool of sampled responses treated as the support),
best-of-n has a closed form. Sort candidates by proxy reward and let
F_i = Σ_{j ≤ i} π_ref(j); the best of n i.i.d. draws is candidate i with
probability P_n(i) = F_i^n − F_{i−1}^n. For n ≥ 2 its exact KL from π_ref is
strictly below the analytic ``log n − (n − 1)/n``; both are 0 at n = 1 (Beirami et
al., "Theoretical guarantees on the best-of-n alignment policy", arXiv:2401.01879).

Ties in the proxy: a group G of candidates with equal proxy acts as one atom of
mass q_G, so P_n(G) = F_G^n − F_{G−1}^n; the tie among the drawn samples that
hit G is broken uniformly at random over those DRAWS, which makes the kept
candidate distributed ∝ π_ref within G: P_n(i) = P_n(G)·π_ref(i)/q_G.

Numerics (float64, log space, as the overoptimization study needs n up to
2·10⁴ with float32 logits): π_ref is normalised in float64; the cumulative
mass is taken from head sums where F < 1/2 and as log F = log1p(−tail) from
tail sums where F ≥ 1/2, so both ends keep full relative precision; then
log P_n(G) = n·log F_G + log1mexp(n·log(F_{G−1}/F_G)) with
log(F_{G−1}/F_G) = log1p(−q_G/F_G). This is the recipe of the study's notes,
with the log-ratio taken directly instead of as a difference of two logs.
The naive F^n − F_prev^n loses a large part of the mass at n = 2·10⁴.

The RL reference is the KL-regularised optimum π_β ∝ π_ref·exp(β·r_proxy),
which is also the natural-policy-gradient path of a tabular softmax policy;
KL(π_β‖π_ref) = β·E_β[r] − log Z(β).

These are host-side float64 NumPy tools (accelerators such as TPUs have no
native float64); one curve for 64 prompts × 8,192 candidates × 41 values of n
takes on the order of a second on two CPU cores.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from prefjax.overopt import bon


class ExactScores(NamedTuple):
  """Per-prompt results, ``[P, S]`` float64 each (``[S]`` for 1-D input)."""
  proxy: np.ndarray
  gold: np.ndarray
  kl: np.ndarray      # KL(policy ‖ π_ref) in nats, tiny negatives clipped to 0
  mass: np.ndarray    # total probability of the computed distribution (≈ 1; a check)


def log1mexp(x: ArrayLike) -> np.ndarray:
  """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012); −inf at x = 0."""
  x = np.asarray(x, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


class _Groups(NamedTuple):
  """Proxy tie groups of each prompt, in ascending proxy order, padded to M."""
  log_q: np.ndarray        # [P, M] log group mass (−inf for empty/padding groups)
  log_f: np.ndarray        # [P, M] log cumulative mass through the group
  log_ratio: np.ndarray    # [P, M] log(F_{G−1}/F_G) ≤ 0
  proxy: np.ndarray        # [P, M] group proxy value
  gold: np.ndarray         # [P, M] π_ref-weighted mean gold within the group
  sorted_index: np.ndarray  # [P, M] candidate order (ascending proxy)
  group_of: np.ndarray     # [P, M] group id of each sorted candidate


def _normalized_log_ref(ref_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 log π_ref and π_ref (rows renormalised to sum to one in float64)."""
  log_p = ref_logits - special.logsumexp(ref_logits, axis=1, keepdims=True)
  q = np.exp(log_p)
  total = q.sum(axis=1, keepdims=True)
  return log_p - np.log(total), q / total


def _tie_groups(ref_logits: np.ndarray, proxy: np.ndarray, gold: np.ndarray) -> _Groups:
  num_prompts, m = proxy.shape
  _, q = _normalized_log_ref(ref_logits)
  order = np.argsort(proxy, axis=1, kind="stable")
  q_sorted = np.take_along_axis(q, order, axis=1)
  proxy_sorted = np.take_along_axis(proxy, order, axis=1)
  gold_sorted = np.take_along_axis(gold, order, axis=1)
  starts = np.ones((num_prompts, m), bool)
  starts[:, 1:] = proxy_sorted[:, 1:] != proxy_sorted[:, :-1]
  group_of = np.cumsum(starts, axis=1) - 1
  flat = (group_of + m * np.arange(num_prompts)[:, None]).ravel()

  def group_sum(values: np.ndarray) -> np.ndarray:
    return np.bincount(flat, weights=values.ravel(), minlength=num_prompts * m).reshape(
        num_prompts, m)

  q_group = group_sum(q_sorted)
  members = group_sum(np.ones_like(q_sorted))
  proxy_group = group_sum(np.where(starts, proxy_sorted, 0.0))    # exact tied value
  gold_mass = group_sum(q_sorted * gold_sorted)
  with np.errstate(divide="ignore", invalid="ignore"):
    gold_group = np.where(q_group > 0, gold_mass / q_group,
                          group_sum(gold_sorted) / np.maximum(members, 1))
    head = np.cumsum(q_group, axis=1)
    # Mass strictly above each group, summed from the top (no cancellation).
    tail = np.cumsum(q_group[:, ::-1], axis=1)[:, ::-1]
    tail_after = np.concatenate([tail[:, 1:], np.zeros((num_prompts, 1))], axis=1)
    use_head = head < 0.5
    log_f = np.where(use_head, np.log(head), np.log1p(-tail_after))
    f = np.where(use_head, head, 1.0 - tail_after)
    ratio = np.where(f > 0, np.minimum(q_group / np.where(f > 0, f, 1.0), 1.0), 1.0)
    log_ratio = np.log1p(-ratio)
    log_q = np.log(q_group)
  return _Groups(log_q, log_f, log_ratio, proxy_group, gold_group, order, group_of)


def _group_log_probs(groups: _Groups, n: float) -> np.ndarray:
  """log P_n(G) = n·log F_G + log1mexp(n·log(F_{G−1}/F_G)), ``[P, M]``."""
  with np.errstate(invalid="ignore"):
    log_p = n * groups.log_f + log1mexp(n * groups.log_ratio)
  return np.where(np.isfinite(groups.log_q), log_p, -np.inf)


def _expectations(log_p: np.ndarray, log_q: np.ndarray, proxy: np.ndarray,
                  gold: np.ndarray) -> tuple[np.ndarray, ...]:
  """Expected proxy/gold, KL and mass of a distribution given in log space over atoms."""
  p = np.exp(log_p)
  positive = p > 0
  log_ratio = np.where(positive, log_p - np.where(positive, log_q, 0.0), 0.0)
  kl = np.maximum(np.sum(p * log_ratio, axis=-1), 0.0)
  return (np.sum(p * proxy, axis=-1), np.sum(p * gold, axis=-1), kl, np.sum(p, axis=-1))


def exact_bon_scores(ref_logits: ArrayLike, proxy: ArrayLike, gold: ArrayLike,
                     ns: ArrayLike) -> ExactScores:
  """Exact best-of-n expected proxy and gold scores, KL and mass, for every n in ``ns``.

  Args:
    ref_logits: ``[P, M]`` (or ``[M]``) log-probabilities or unnormalised logits of
      π_ref over M candidates per prompt (any float dtype; normalised in float64;
      −inf marks a zero-probability candidate).
    proxy: same shape, proxy rewards (the best-of-n selection key).
    gold: same shape, gold rewards (evaluated, not optimised).
    ns: ``[S]`` values of n ≥ 1 (integers; real values interpolate).

  Returns:
    ``ExactScores`` with ``[P, S]`` arrays (``[S]`` for 1-D input).
  """
  ref_logits, proxy, gold, squeeze = _check_world(ref_logits, proxy, gold)
  ns = _check_knob(ns, "ns", minimum=1.0)
  groups = _tie_groups(ref_logits, proxy, gold)
  columns = [_expectations(_group_log_probs(groups, n), groups.log_q, groups.proxy,
                           groups.gold) for n in ns]
  result = ExactScores(*(np.stack(c, axis=-1) for c in zip(*columns)))
  return ExactScores(*(x[0] for x in result)) if squeeze else result


def exact_bon_log_probs(ref_logits: ArrayLike, proxy: ArrayLike, ns: ArrayLike) -> np.ndarray:
  """The exact best-of-n distribution over candidates, ``[P, S, M]`` float64 log-probs.

  Candidates keep their input order; see the module docstring for ties.
  """
  ref_logits, proxy, _, squeeze = _check_world(ref_logits, proxy, proxy)
  ns = _check_knob(ns, "ns", minimum=1.0)
  groups = _tie_groups(ref_logits, proxy, proxy)
  log_ref, _ = _normalized_log_ref(ref_logits)
  log_ref_sorted = np.take_along_axis(log_ref, groups.sorted_index, axis=1)
  inverse = np.argsort(groups.sorted_index, axis=1)
  out = []
  for n in ns:
    log_pg = _group_log_probs(groups, n)
    gathered = np.take_along_axis(log_pg - np.where(np.isfinite(groups.log_q), groups.log_q, 0.0),
                                  groups.group_of, axis=1)
    out.append(np.take_along_axis(gathered + log_ref_sorted, inverse, axis=1))
  result = np.stack(out, axis=1)
  return result[0] if squeeze else result


def rl_path_log_probs(ref_logits: ArrayLike, proxy: ArrayLike, betas: ArrayLike) -> np.ndarray:
  """log π_β = log π_ref + β·r − log Z(β) over candidates, ``[P, S, M]`` float64."""
  ref_logits, proxy, _, squeeze = _check_world(ref_logits, proxy, proxy)
  betas = _check_knob(betas, "betas")
  log_ref, _ = _normalized_log_ref(ref_logits)
  logits = log_ref[:, None, :] + betas[None, :, None] * proxy[:, None, :]
  result = logits - special.logsumexp(logits, axis=-1, keepdims=True)
  return result[0] if squeeze else result


def rl_path_scores(ref_logits: ArrayLike, proxy: ArrayLike, gold: ArrayLike,
                   betas: ArrayLike) -> ExactScores:
  """Expected proxy/gold and exact KL of π_β ∝ π_ref·exp(β·r_proxy) for every β.

  Args:
    ref_logits: ``[P, M]`` (or ``[M]``) π_ref logits or log-probs.
    proxy: same shape, the reward the policy is optimised for.
    gold: same shape, the reward it is evaluated with.
    betas: ``[S]`` finite inverse temperatures (β = 1/λ for a KL penalty λ;
      β = 0 is π_ref itself).

  Returns:
    ``ExactScores`` with ``[P, S]`` arrays (``[S]`` for 1-D input). E_β[proxy]
    and the KL are non-decreasing in β ≥ 0 (their β-derivatives are Var_β(r)
    and β·Var_β(r)).
  """
  ref_logits, proxy, gold, squeeze = _check_world(ref_logits, proxy, gold)
  betas = _check_knob(betas, "betas")
  log_ref, _ = _normalized_log_ref(ref_logits)
  columns = []
  for beta in betas:
    logits = log_ref + beta * proxy
    log_pi = logits - special.logsumexp(logits, axis=-1, keepdims=True)
    columns.append(_expectations(log_pi, log_ref, proxy, gold))
  result = ExactScores(*(np.stack(c, axis=-1) for c in zip(*columns)))
  return ExactScores(*(x[0] for x in result)) if squeeze else result


def exact_best_of_n(ref_logits: ArrayLike, proxy: ArrayLike, gold: ArrayLike, ns: ArrayLike, *,
                    num_bootstrap: int = 1000,
                    seed: int = 0) -> bon.Curve:
  """Exact best-of-n curve over prompts with exact KL and bootstrap SEs over prompts."""
  scores = exact_bon_scores(np.atleast_2d(ref_logits), np.atleast_2d(proxy),
                            np.atleast_2d(gold), ns)
  return bon.summarize(np.asarray(ns), scores.kl, scores.proxy, scores.gold,
                       num_bootstrap=num_bootstrap, seed=seed)


def rl_path(ref_logits: ArrayLike, proxy: ArrayLike, gold: ArrayLike, betas: ArrayLike, *,
            num_bootstrap: int = 1000,
            seed: int = 0) -> bon.Curve:
  """Closed-form RL-path curve (knob β) over prompts with bootstrap SEs over prompts."""
  scores = rl_path_scores(np.atleast_2d(ref_logits), np.atleast_2d(proxy),
                          np.atleast_2d(gold), betas)
  return bon.summarize(np.asarray(betas, np.float64), scores.kl, scores.proxy, scores.gold,
                       num_bootstrap=num_bootstrap, seed=seed)


def _check_knob(values: ArrayLike, name: str, minimum: float | None = None) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape {values.shape}")
  if not np.isfinite(values).all() or (minimum is not None and values.min() < minimum):
    bound = "" if minimum is None else f" and >= {minimum:g}"
    raise ValueError(f"{name} must be finite{bound}, got {values}")
  return values


def _check_world(ref_logits: ArrayLike, proxy: ArrayLike,
                 gold: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  ref_logits = np.asarray(ref_logits, np.float64)
  proxy = np.asarray(proxy, np.float64)
  gold = np.asarray(gold, np.float64)
  if not ref_logits.shape == proxy.shape == gold.shape:
    raise ValueError(f"ref_logits {ref_logits.shape}, proxy {proxy.shape} and gold "
                     f"{gold.shape} must have the same shape [P, M] (or [M])")
  squeeze = ref_logits.ndim == 1
  if squeeze:
    ref_logits, proxy, gold = ref_logits[None], proxy[None], gold[None]
  if ref_logits.ndim != 2 or ref_logits.shape[1] == 0:
    raise ValueError(f"expected [P, M] candidates with M >= 1, got {ref_logits.shape}")
  bad = np.isnan(ref_logits) | (ref_logits == np.inf)
  if bad.any():
    prompt, cand = np.argwhere(bad)[0]
    raise ValueError(f"ref_logits is NaN or +inf at prompt {prompt}, candidate {cand}")
  empty = ~np.isfinite(ref_logits).any(axis=1)
  if empty.any():
    raise ValueError(f"ref_logits of prompt {int(np.argmax(empty))} gives every candidate "
                     "zero probability")
  for name, x in (("proxy", proxy), ("gold", gold)):
    bad = ~np.isfinite(x)
    if bad.any():
      prompt, cand = np.argwhere(bad)[0]
      raise ValueError(f"{name} is not finite at prompt {prompt}, candidate {cand}")
  return ref_logits, proxy, gold, squeeze
