"""Held-out evaluation of a direct-alignment policy: reward accuracy and KL to the reference.

``make_evaluator`` returns an evaluator ``fn(step, model) -> metrics`` for
``train_loop(..., evaluators=[...])``: a ``prefjax.train.BatchEvaluator`` running
``make_eval_fn``'s per-batch ``eval_fn(model, batch)`` jitted over the held-out
pair batches, averaged weighted by ``num_examples``: the pairs the loss counts, by
their weights (a tie's outcome drops a pair for losses without soft labels; so a
batch's metrics, which are means over those pairs, pool into the split's means):

* the training loss and TRL-named metrics (``rewards/accuracies`` is the
  implicit-reward accuracy on held-out pairs);
* with a reference model, the KL of the policy to it on the held-out prompts:
  responses are SAMPLED from the policy (``prefjax.models.sampling.generate``),
  both models score them, and the per-sequence estimators
  k1 = Σ_t log π/π_ref and k3 = Σ_t (r − 1 − log r), r = π_ref/π
  (J. Schulman, "Approximating KL Divergence", 2020) are averaged; for tiny
  vocabularies ``exact`` adds Σ_t KL(π(·|prefix_t) ‖ π_ref(·|prefix_t)) along
  the sampled prefixes (the full-vocabulary, lower-variance estimate).

Sampling uses a fixed key folded with the batch's first ``example_index``, so
every eval of a run samples with the same random numbers (common random numbers
make KL curves across checkpoints comparable).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax.direct import loss as loss_lib
from prefjax.evals import kl as kl_lib
from prefjax.losses import policy as policy_losses
from prefjax.models import sampling
from prefjax.train import evaluators as evaluators_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KLEvalConfig:
  """Sampling settings of the KL-to-reference estimate.

  Attributes:
    max_new_tokens: length of the sampled responses.
    temperature: sampling temperature (1 = the policy itself, as the KL needs).
    exact: also the full-vocabulary per-position KL (memory O(B·T·V)).
    eos_id: generation of a row stops at this token, or any of these
      (``tokenize.stop_ids``).
    pad_id: token written after EOS.
    seed: base sampling seed.
  """
  max_new_tokens: int = 16
  temperature: float = 1.0
  exact: bool = False
  eos_id: int | tuple[int, ...] | None = None
  pad_id: int = 0
  seed: int = 0


def left_padded_prompts(batch: Mapping[str, Array]) -> tuple[Array, Array]:
  """Left-padded prompts ``[B, T]`` (tokens, mask) of the B pairs of a right-padded pair batch."""
  b = batch["pair_mask"].shape[0]
  tokens, attn, loss = batch["tokens"][:b], batch["attention_mask"][:b], batch["loss_mask"][:b]
  length = tokens.shape[1]
  prompt_len = jnp.sum(attn, axis=-1) - jnp.sum(loss, axis=-1)
  shift = (length - prompt_len)[:, None]
  t = jnp.arange(length)[None, :]
  src = jnp.clip(t - shift, 0, length - 1)
  real = t >= shift
  prompt = jnp.where(real, jnp.take_along_axis(tokens, src, axis=1), tokens[:, :1])
  return prompt.astype(jnp.int32), real.astype(jnp.int32)


def kl_to_reference(policy: nnx.Module, reference: nnx.Module, prompt_tokens: Array,
                    prompt_mask: Array, rng: Array, cfg: KLEvalConfig) -> dict[str, Array]:
  """Per-prompt KL estimates ``[B]`` of the policy to the reference on its own samples."""
  gen = sampling.generate(policy, prompt_tokens, prompt_mask, rng=rng,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          eos_id=cfg.eos_id, pad_id=cfg.pad_id)
  tokens = jnp.concatenate([prompt_tokens, gen.tokens], axis=1)
  attention = jnp.concatenate([prompt_mask, gen.mask], axis=1)
  response = jnp.concatenate([jnp.zeros_like(prompt_mask), gen.mask], axis=1)
  logits_p = policy(tokens, attention_mask=attention)
  logits_q = reference(tokens, attention_mask=attention)
  logp = sampling.token_logps(logits_p, tokens)
  ref_logp = sampling.token_logps(logits_q, tokens)
  exact = None
  if cfg.exact:
    # The distribution of token t comes from the logits at t - 1.
    exact = policy_losses.exact_kl(logits_p[:, :-1], logits_q[:, :-1], response[:, 1:])
  out = kl_lib.sequence_kl_estimates(logp, ref_logp, response, kinds=("k1", "k3"),
                                     exact_per_position=exact)
  out["kl/response_tokens"] = jnp.sum(gen.mask, axis=-1).astype(jnp.float32)
  return out


def make_eval_fn(loss: loss_lib.DirectLoss, *, reference: nnx.Module | None = None,
                 kl: KLEvalConfig | None = None) -> Callable[[nnx.Module, Any], dict[str, Array]]:
  """The per-batch ``eval_fn(model, batch)`` of :func:`make_evaluator` (see the module doc).

  The reference model (needed only for the KL) is closed over: its arrays are
  constants of the jitted eval step.
  """
  loss_fn = loss_lib.make_loss_fn(loss)

  def eval_fn(model: nnx.Module, batch: Mapping[str, Array]) -> dict[str, Array]:
    value, metrics = loss_fn(model, batch, jax.random.key(0))
    weights = loss_lib.counted_pair_weights(loss, batch)
    # A per-batch count (the training logs' pairs/num_dropped_ties) has no meaning as a
    # weighted mean over batches.
    out = {k: v for k, v in metrics.items()
           if k not in ("loss_weight", "pairs/num_dropped_ties")}
    out["loss"] = value
    if reference is not None and kl is not None:
      prompt, mask = left_padded_prompts(batch)
      rng = jax.random.fold_in(jax.random.key(kl.seed), batch["example_index"][0])
      for name, estimate in kl_to_reference(model, reference, prompt, mask, rng, kl).items():
        out[name] = loss_lib.weighted_mean(estimate, weights)
    out["num_examples"] = jnp.sum(weights)
    return out

  return eval_fn


def make_evaluator(loss: loss_lib.DirectLoss, data: Callable[[], Iterable[Any]], *,
                   reference: nnx.Module | None = None, kl: KLEvalConfig | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> evaluators_lib.BatchEvaluator:
  """Evaluator ``fn(step, model)`` over a fresh pass of ``data()`` (held-out pair batches
  with their reference fields); ``mesh`` shards them as the training batches."""
  return evaluators_lib.BatchEvaluator(make_eval_fn(loss, reference=reference, kl=kl), data,
                                       mesh=mesh)
