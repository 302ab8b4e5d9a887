"""Held-out evaluation of a policy: proxy, gold, KL (estimators and exact), entropy, length.

Every metric is computed on the SAME samples: one response per held-out
prompt drawn with a fixed key, so successive evals differ only through the
policy. KL(π‖π_ref) of a sequence is reported three ways:

* ``kl`` — the configured estimator (k1, k2 or k3; J. Schulman, "Approximating
  KL Divergence", 2020) summed over the response tokens, plus ``kl/k1``,
  ``kl/k2``, ``kl/k3`` (``prefjax.evals.kl``, the naming of every evaluator);
* ``kl/exact`` — Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) over the full vocabulary along
  the sampled sequence (only when the vocabulary is small). Its expectation is
  the sequence KL, as for k1 and k3, so the two agree within their standard
  errors; ``kl_diff_se`` (``kl/k*_diff_se``) is the standard error of the
  per-sample difference between the estimator and ``kl/exact``.

Standard errors (``*_se``) are over the held-out samples.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.evals import kl as kl_lib
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.train import state as state_lib


@functools.partial(jax.jit, static_argnames=("graphdef", "full_vocab"))
def _sequence_stats(graphdef, params, extra, tokens, attention_mask, loss_mask, *,
                    full_vocab: bool) -> dict[str, jax.Array]:
  bundle = state_lib.merge_model(graphdef, params, extra)
  stats = rollout_lib.token_stats(bundle, tokens, attention_mask, loss_mask,
                                  full_vocab=full_vocab)
  out = kl_lib.sequence_kl_estimates(stats.logp, stats.ref_logp, loss_mask,
                                     kinds=("k1", "k2", "k3"),
                                     exact_per_position=stats.exact_kl if full_vocab else None)
  out["logp"] = jnp.sum(stats.logp, axis=-1)
  if full_vocab:
    out["entropy"] = jnp.sum(stats.entropy, axis=-1)
  return out


def _mean_se(x: np.ndarray) -> tuple[float, float]:
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate(graphdef, params, extra, prompts: rollout_lib.Prompts, rng: jax.Array, *,
             tokenizer: Any, proxy: rl_rewards.PairReward, gold: rl_rewards.PairReward,
             sampling_cfg: dict[str, Any], kl_estimator: str, exact_kl_max_vocab: int,
             exploit_char: str | None = None) -> dict[str, float]:
  """Samples the held-out prompts once and returns every eval metric (floats)."""
  bundle = state_lib.merge_model(graphdef, params, extra)
  rollout = rollout_lib.sample(bundle.policy, prompts, rng, tokenizer=tokenizer, **sampling_cfg)
  full_vocab = tokenizer.vocab_size <= exact_kl_max_vocab
  seq = jax.device_get(_sequence_stats(graphdef, params, extra, rollout.tokens,
                                       rollout.attention_mask, rollout.loss_mask,
                                       full_vocab=full_vocab))
  score = lambda reward: rl_rewards.checked_scores(  # noqa: E731
      reward, rollout.prompts, rollout.responses, "the held-out eval")
  per_sample = {"proxy": score(proxy), "gold": score(gold),
                "kl": seq[f"kl/{kl_estimator}"],
                "response_length": rollout.lengths,
                "truncated_fraction": (~rollout.finished).astype(np.float64),
                **{k: v for k, v in seq.items() if k.startswith("kl/")}}
  lengths = np.maximum(rollout.lengths, 1)
  if full_vocab:
    per_sample["entropy"] = seq["entropy"] / lengths
    per_sample["sequence_entropy"] = seq["entropy"]
  else:  # Monte Carlo entropy of the sequence: −log π(y|x).
    per_sample["sequence_entropy"] = -seq["logp"]
  if exploit_char:
    per_sample["exploit_fraction"] = np.array(
        [r.count(exploit_char) / max(len(r), 1) for r in rollout.responses])
  metrics = {}
  for name, values in per_sample.items():
    metrics[name], metrics[f"{name}_se"] = _mean_se(values)
  if full_vocab:
    for name in ("kl", "kl/k1", "kl/k2", "kl/k3"):
      _, metrics[f"{name}_diff_se"] = _mean_se(per_sample[name] - per_sample["kl/exact"])
  return metrics


def check_untempered(sampling_cfg: dict[str, Any], where: str) -> None:
  """Refuses a sampler other than the policy itself (temperature 1, no top-k or top-p):
  the KL estimates score each sample with the policy's own log-probs."""
  temperature = float(sampling_cfg.get("temperature", 1.0))
  top_k, top_p = sampling_cfg.get("top_k"), sampling_cfg.get("top_p")
  if temperature != 1.0 or top_k is not None or top_p is not None:
    raise ValueError(
        f"{where}: temperature={temperature}, top_k={top_k}, top_p={top_p}: the KL is "
        "estimated with the policy's own log-probs, so its samples must come from the "
        "policy itself (temperature 1, no top_k/top_p)")


def make_evaluator(prompts: rollout_lib.Prompts, rng: jax.Array, **kwargs: Any):
  """``train_loop`` evaluator ``fn(step, bundle) -> metrics`` of :func:`evaluate`."""
  check_untempered(kwargs.get("sampling_cfg") or {}, "the RL eval's sampling")

  def evaluator(step: int, bundle: rollout_lib.PolicyBundle) -> dict[str, float]:
    del step
    graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
    return evaluate(graphdef, params, extra, prompts, rng, **kwargs)

  return evaluator
