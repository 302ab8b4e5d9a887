"""The direct-alignment training loss: a ``loss_fn`` for ``prefjax.train`` built from a config.

One forward of the policy scores the chosen and the rejected responses of a
pair batch together (padded ``[2B, T]`` rows, or packed rows with per-segment
sums gathered by ``chosen_index`` / ``rejected_index``). The reference
log-probabilities are NOT computed here: they arrive in the batch as
``ref_chosen`` / ``ref_rejected`` ``[B]`` (and ``ref_kl`` ``[2B]`` for KTO),
filled either by the frozen reference model on the fly or from the on-disk
cache (``prefjax.direct.ref_cache``), so the loss is the same jitted program in
both modes (the values themselves agree as ``ref_cache`` says).

Reduction: per pair ``w_i = weight_i · pair_mask_i`` and
``L = Σ_i w_i ℓ_i / Σ_i w_i``; ``loss_weight = Σ_i w_i`` tells the train core
how to combine microbatches exactly.

What the trainer must know about a loss comes from its registry spec
(``prefjax.losses.registry.DirectLossSpec``), never from its name:

Outcomes: a pair whose ``outcome`` is below ½ (its rejected side is the preferred one,
as PandaLM stores response 2's wins with 0) is turned around before the loss and its
metrics (``oriented``, outcome o → 1 − o), so every loss, ``rewards/accuracies`` and the
NLL term see the preferred response as chosen. Soft preferences and ties
(½ ≤ o < 1 after that): ``soft_label`` losses get a per-pair
ε_i = 1 − [(1−ε)·o_i + ε·(1−o_i)]; for the other losses, which have no notion
of a soft preference, such pairs are dropped (weight 0, counted in
``pairs/num_dropped_ties``). A tie (o = ½) has no preferred side: it counts ½ in
``rewards/accuracies`` (a coin flip's expected accuracy) and adds nothing to the NLL term
(the means stay over all counted pairs, so batches still pool by their weights).

Optional NLL term (RPO, "Iterative Reasoning Preference Optimization",
arXiv 2404.19733): ``+ α · NLL(chosen)`` with NLL the token-averaged negative
log-likelihood of each chosen response (pair-weighted mean); α defaults to the
spec's ``nll_alpha`` (ORPO, arXiv 2403.07691, registers 1). TRL and ORPO's own code
average over all chosen tokens of the batch instead, which weighs a pair by its length;
the two agree when the chosen responses are equally long.

``unpaired`` losses (KTO, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv 2402.01306) run on pairs split into unpaired examples:
chosen = desirable, rejected = undesirable. Their reference point z₀ is the
batch mean of policy-minus-reference log-ratios on MISMATCHED prompt/response
pairs (row k's prompt with row k+1's response over the 2B rows, as TRL builds
its KL dataset), with no gradient. Under gradient accumulation each microbatch
builds its own mismatched rows and z₀ (as TRL's micro-batches do), so KTO,
alone among the direct losses, is not exactly the whole batch's loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax import configlib
from prefjax.losses import direct as direct_losses
from prefjax.losses import registry
from prefjax.losses import unpaired as unpaired_losses
from prefjax.losses._common import check_config_label_smoothing
from prefjax.losses._common import soft_label_smoothing
from prefjax.models import sampling
from prefjax.models import segments as seg

Array = jax.Array
Batch = Mapping[str, Any]

LAYOUTS = ("padded", "packed")
REF_MODES = ("online", "cached", "none")

KL_FIELD = "ref_kl"
# ``config.loss``: a registered loss name, β, its extra hyperparameters (a mapping or a
# "name=value,..." string) and the chosen-NLL weight (None: the registered default).
LOSS_FIELDS = ("name", "beta", "kwargs", "nll_alpha")
parse_kwargs = configlib.parse_kwargs  # ``config.loss.kwargs``: a mapping or "a=1,b=2"


@dataclasses.dataclass(frozen=True)
class DirectLoss:
  """What the trainer optimises: a registered loss, its settings and the reference mode.

  Attributes:
    name: a registered direct or unpaired loss (``DIRECT_LOSS_SPECS``).
    beta: β of the loss (λ for ORPO).
    loss_kwargs: extra hyperparameters of the loss (e.g. ``label_smoothing``,
      ``gamma``; for KTO ``desirable_weight`` / ``undesirable_weight``).
    nll_alpha: weight of the chosen-NLL term; None = the spec's ``nll_alpha``.
    ref_mode: ``online`` (frozen model), ``cached`` (precomputed on disk) or
      ``none`` (reference log-probs are zero); ``auto`` resolves to ``none``
      for ``reference_free`` losses and ``online`` otherwise.
    layout: ``padded`` or ``packed`` batches.
    num_segments: static segment count per packed row (``max_segments_per_row``).
  """
  name: str = "dpo"
  beta: float = 0.1
  loss_kwargs: tuple[tuple[str, Any], ...] = ()
  nll_alpha: float | None = None
  ref_mode: str = "auto"
  layout: str = "padded"
  num_segments: int | None = None

  def __post_init__(self):
    spec = self.spec  # Clear error listing the registry.
    kwargs = dict(self.loss_kwargs.items() if isinstance(self.loss_kwargs, Mapping)
                  else self.loss_kwargs)
    object.__setattr__(self, "loss_kwargs", tuple(sorted(kwargs.items())))
    _check_kwargs(spec, kwargs)
    if not float(self.beta) >= 0.0:
      raise ValueError(f"beta={self.beta} for {spec.name!r}: must be a number >= 0")
    if not float(self.alpha) >= 0.0:
      raise ValueError(f"nll_alpha={self.alpha} for {spec.name!r}: must be a number >= 0 "
                       "(a negative weight trains the chosen responses' likelihood down)")
    _check_values(spec, float(self.beta), kwargs)
    check_config_label_smoothing("config.loss.kwargs label_smoothing",
                                 kwargs.get("label_smoothing"))
    if float(self.beta) == 0.0 and float(self.alpha) == 0.0 and _scales_by_beta(spec):
      raise ValueError(f"beta=0 for {spec.name!r}: its loss is then constant and nothing "
                       "trains (it scales the log-ratios by beta); give beta > 0, or "
                       "nll_alpha > 0 to train on the chosen NLL alone")
    mode = self.ref_mode
    if mode == "auto":
      mode = "none" if spec.reference_free else "online"
      object.__setattr__(self, "ref_mode", mode)
    if mode not in REF_MODES:
      raise ValueError(f"ref_mode must be 'auto' or one of {REF_MODES}, got {mode!r}")
    if spec.reference_free and mode == "cached":
      raise ValueError(f"{spec.name!r} is reference-free: ref.mode='cached' would score every "
                       "example with a reference its loss never reads; use 'none' (or "
                       "'auto'), or 'online' to measure the eval KL to the reference")
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.layout == "packed" and not self.num_segments:
      raise ValueError("packed layout needs num_segments (pipeline max_segments_per_row)")
    if spec.unpaired:
      if self.layout != "padded":
        raise ValueError(f"{self.name} builds mismatched prompt/response rows: use the "
                         "padded layout (--config.data.pipeline.mode=padded "
                         "--config.data.pipeline.share_prompt=False)")
      if mode != "online":
        raise ValueError(f"{self.name} needs ref_mode='online' (got {mode!r}): its reference "
                         "point scores mismatched pairs that depend on the batch, so they "
                         "cannot be cached per example")

  @classmethod
  def from_config(cls, config: Any) -> DirectLoss:
    """From a binary's config: ``loss.{name, beta, kwargs, nll_alpha}``, ``ref.mode`` and
    ``data.pipeline``; other ``config.loss`` keys are errors."""
    loss, pipeline = config.loss, config.data.pipeline
    configlib.check_fields("config.loss", loss, LOSS_FIELDS)
    ref = config.get("ref") or {}
    kwargs = configlib.parse_kwargs(loss.get("kwargs"))
    return cls(name=loss.name, beta=float(loss.beta), loss_kwargs=tuple(kwargs.items()),
               nll_alpha=loss.get("nll_alpha"), ref_mode=ref.get("mode", "auto"),
               layout=pipeline.get("mode", "padded"),
               num_segments=pipeline.get("max_segments_per_row", 16))

  @property
  def spec(self) -> registry.DirectLossSpec:
    """The registered facts of ``name``."""
    return registry.direct_loss_spec(self.name)

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.loss_kwargs)

  @property
  def alpha(self) -> float:
    return self.spec.nll_alpha if self.nll_alpha is None else self.nll_alpha

  @property
  def needs_reference(self) -> bool:
    return self.ref_mode != "none"


def _scales_by_beta(spec: registry.DirectLossSpec) -> bool:
  """Whether ``spec`` is one of prefjax's own losses, each constant in the log-probs at
  β = 0 (a loss a user registers may use β otherwise; the registry holds both)."""
  return getattr(spec.fn, "__module__", None) in (direct_losses.__name__,
                                                 unpaired_losses.__name__)


def _check_kwargs(spec: registry.DirectLossSpec, kwargs: Mapping[str, Any]) -> None:
  configlib.check_kwargs("config.loss.kwargs", spec.name, kwargs, spec.hyperparameters)


def _check_values(spec: registry.DirectLossSpec, beta: float, kwargs: Mapping[str, Any]
                  ) -> None:
  """Runs the loss once on one made-up pair, so that its own range checks (β, ε, τ…)
  see the configured numbers: in training a soft-label ε becomes a per-pair array,
  which they cannot check (``exo_pair`` with ε = 0 gave a NaN loss at every step)."""
  one = jnp.ones((1,), jnp.float32)
  try:
    if spec.unpaired:
      spec.fn(-one, -one, one > 0, 0.0 * one[0], beta=beta, **kwargs)
    else:
      spec.fn(direct_losses.PairLogps(-one, -2 * one, -one, -one, one, one), beta=beta,
              **kwargs)
  except ValueError as e:
    raise ValueError(f"loss {spec.name!r} with beta={beta:g}, config.loss.kwargs {dict(kwargs)}: "
                     f"{e}") from e
  except TypeError as e:  # a hyperparameter without a default, not given
    raise ValueError(f"loss {spec.name!r}: {e}; give it with --config.loss.kwargs=NAME=VALUE"
                     ) from e


# --------------------------------------------------------------------------- log-probs


class SequenceScores(NamedTuple):
  """Summed response log-probs and response token counts of B pairs, each ``[B]``."""
  chosen: Array
  rejected: Array
  chosen_tokens: Array
  rejected_tokens: Array


def score_pairs(model: nnx.Module, batch: Batch, *, num_segments: int | None = None
                ) -> SequenceScores:
  """One forward over chosen and rejected sequences of a pair batch (padded or packed)."""
  loss_mask = batch["loss_mask"]
  if "segment_ids" in batch:
    summed, _ = sampling.sequence_logps(
        model, batch["tokens"], loss_mask, segment_ids=batch["segment_ids"],
        positions=batch.get("positions"), num_segments=num_segments,
        prefix_ids=batch.get("prefix_ids"))
    counts = seg.segment_sums(loss_mask.astype(jnp.float32), batch["segment_ids"], num_segments)
    pick = lambda v, key: seg.gather_pairs(v, batch[key])  # noqa: E731
    return SequenceScores(pick(summed, "chosen_index"), pick(summed, "rejected_index"),
                          pick(counts, "chosen_index"), pick(counts, "rejected_index"))
  summed, _ = sampling.sequence_logps(model, batch["tokens"], loss_mask,
                                      attention_mask=batch["attention_mask"])
  counts = jnp.sum(loss_mask.astype(jnp.float32), axis=-1)
  b = summed.shape[0] // 2
  return SequenceScores(summed[:b], summed[b:], counts[:b], counts[b:])


def mismatched_rows(batch: Batch) -> dict[str, Array]:
  """Padded rows pairing row k's prompt with row (k+1) mod 2B's response (KTO's KL set).

  Rows are right-padded ``prompt + response``; the response is cut to the row
  length when the new combination is longer. Returns ``tokens``,
  ``attention_mask``, ``loss_mask`` ``[2B, T]`` and ``valid [2B]`` (both source
  pairs real).
  """
  tokens, attn, loss = batch["tokens"], batch["attention_mask"], batch["loss_mask"]
  n, length = tokens.shape
  if n < 4:
    raise ValueError("kto's mismatched KL rows need at least 2 pairs per batch")
  resp_len = jnp.sum(loss, axis=-1).astype(jnp.int32)
  prompt_len = jnp.sum(attn, axis=-1).astype(jnp.int32) - resp_len
  nxt = (jnp.arange(n) + 1) % n
  t = jnp.arange(length)[None, :]
  p_k = prompt_len[:, None]
  src = jnp.clip(t - p_k + prompt_len[nxt][:, None], 0, length - 1)
  in_response = (t >= p_k) & (t < p_k + resp_len[nxt][:, None])
  # Outside prompt and response the row keeps its old (unattended) tokens.
  new_tokens = jnp.where(in_response, jnp.take_along_axis(tokens[nxt], src, axis=1), tokens)
  pair_mask = batch["pair_mask"]
  real = jnp.concatenate([pair_mask, pair_mask]) > 0
  return {"tokens": new_tokens.astype(jnp.int32),
          "attention_mask": ((t < p_k) | in_response).astype(jnp.int32),
          "loss_mask": in_response.astype(jnp.int32),
          "valid": (real & real[nxt]).astype(jnp.float32)}


def reference_fields(model: nnx.Module, batch: Batch, *, num_segments: int | None,
                     with_kl: bool) -> dict[str, Array]:
  """Reference log-probs of a batch: ``ref_chosen``/``ref_rejected`` [B] (+ ``ref_kl`` [2B])."""
  scores = score_pairs(model, batch, num_segments=num_segments)
  out = {"ref_chosen": scores.chosen, "ref_rejected": scores.rejected}
  if with_kl:
    rows = mismatched_rows(batch)
    out[KL_FIELD] = sampling.sequence_logps(model, rows["tokens"], rows["loss_mask"],
                                            attention_mask=rows["attention_mask"])[0]
  return out


# --------------------------------------------------------------------------- the loss


def weighted_mean(values: Array, weights: Array) -> Array:
  """Σ w·v / Σ w over the entries of weight > 0 (a NaN at a padding pair stays out)."""
  total = jnp.sum(weights)
  kept = jnp.where(weights > 0, values, 0.0)
  return jnp.sum(kept * weights) / jnp.where(total > 0, total, 1.0)


def _finite_where_unweighted(x: direct_losses.PairLogps, weights: Array
                             ) -> direct_losses.PairLogps:
  """``x`` with ordinary values (log-probs −1, one token) at the pairs of weight 0: a
  padding pair's 0/0 stays out of the loss, and out of its gradient, which a mask on
  the loss alone does not keep out (0 · NaN)."""
  safe = direct_losses.PairLogps(*([-1.0] * 4 + [1.0] * 2))
  return direct_losses.PairLogps(*(jnp.where(weights > 0, v, jnp.asarray(d, v.dtype))
                                   for v, d in zip(x, safe)))


def _per_example(loss: DirectLoss, losses: Array, weights: Array) -> Array:
  """A loss must return one value per example: ``[B, 1]`` against ``[B]`` weights would
  broadcast to ``[B, B]`` and average the wrong thing without a word."""
  if jnp.shape(losses) != jnp.shape(weights):
    raise ValueError(f"direct loss {loss.name!r} returned shape {jnp.shape(losses)}; "
                     f"expected one value per example, {jnp.shape(weights)}")
  return losses


def oriented(x: direct_losses.PairLogps, outcome: Array) -> direct_losses.PairLogps:
  """``x`` with the sides of every pair of ``outcome`` < ½ swapped: chosen is the preferred
  response (its outcome is then 1 − o, ``decisive_outcome``)."""
  flip = jnp.asarray(outcome) < 0.5
  pick = lambda a, b: jnp.where(flip, b, a)  # noqa: E731
  return direct_losses.PairLogps(
      pick(x.policy_chosen, x.policy_rejected), pick(x.policy_rejected, x.policy_chosen),
      pick(x.ref_chosen, x.ref_rejected), pick(x.ref_rejected, x.ref_chosen),
      pick(x.chosen_tokens, x.rejected_tokens), pick(x.rejected_tokens, x.chosen_tokens))


def decisive_outcome(batch: Batch) -> Array:
  """The batch's outcomes after ``oriented``: o < ½ becomes 1 − o (0 becomes 1), so every
  outcome is ≥ ½; ties stay ½."""
  outcome = jnp.asarray(batch["outcome"], jnp.float32)
  return jnp.where(outcome < 0.5, 1.0 - outcome, outcome)


def _tie_handling(loss: DirectLoss, batch: Batch) -> tuple[dict[str, Any], Array, Array]:
  """(per-pair hyperparameters, pair weights, dropped-tie count) for the batch's outcomes
  (oriented: a pair the rejected side won counts as won by the chosen side)."""
  outcome = decisive_outcome(batch)
  weights = jnp.asarray(batch["weight"], jnp.float32) * batch["pair_mask"].astype(jnp.float32)
  kwargs, spec = loss.kwargs, loss.spec
  if spec.soft_label:
    eps = kwargs.get("label_smoothing", spec.hyperparameters["label_smoothing"])
    kwargs["label_smoothing"] = soft_label_smoothing(eps, outcome)
    return kwargs, weights, jnp.zeros((), jnp.float32)
  tie = (outcome != 1.0) & (weights > 0)
  return kwargs, jnp.where(tie, 0.0, weights), jnp.sum(tie.astype(jnp.float32))


def counted_pair_weights(loss: DirectLoss, batch: Batch) -> Array:
  """``[B]`` weights of the pairs the loss and its metrics average over (0: padding, or
  a tie the loss drops)."""
  return _tie_handling(loss, batch)[1]


def pair_logps(loss: DirectLoss, scores: SequenceScores,
               batch: Batch) -> direct_losses.PairLogps:
  """Policy scores + the batch's reference fields (zeros when reference-free; no gradient)."""
  if loss.needs_reference:
    ref_c = jax.lax.stop_gradient(jnp.asarray(batch["ref_chosen"], jnp.float32))
    ref_r = jax.lax.stop_gradient(jnp.asarray(batch["ref_rejected"], jnp.float32))
  else:
    ref_c = ref_r = jnp.zeros_like(scores.chosen)
  return direct_losses.PairLogps(scores.chosen, scores.rejected, ref_c, ref_r,
                                 scores.chosen_tokens, scores.rejected_tokens)


def implicit_rewards(loss: DirectLoss, x: direct_losses.PairLogps) -> tuple[Array, Array]:
  """β·log-ratio of chosen and rejected; token-averaged for length-normalised losses."""
  rc, rr = direct_losses.implicit_rewards(x, loss.beta)
  if loss.spec.length_normalized:
    rc = rc / jnp.maximum(x.chosen_tokens, 1.0)
    rr = rr / jnp.maximum(x.rejected_tokens, 1.0)
  return rc, rr


def pair_metrics(loss: DirectLoss, x: direct_losses.PairLogps, weights: Array,
                 tie: Array) -> dict[str, Array]:
  """TRL-named metrics (pair-weighted means); a ``tie`` counts ½ in the accuracy."""
  rc, rr = implicit_rewards(loss, x)
  mean = lambda v: weighted_mean(v, weights)  # noqa: E731
  return {
      "rewards/chosen": mean(rc), "rewards/rejected": mean(rr),
      "rewards/margins": mean(rc - rr),
      "rewards/accuracies": mean(jnp.where(tie, 0.5, (rc > rr).astype(jnp.float32))),
      "logps/chosen": mean(x.policy_chosen), "logps/rejected": mean(x.policy_rejected),
  }


def _unpaired_losses(loss: DirectLoss, model: nnx.Module, x: direct_losses.PairLogps,
                     batch: Batch, weights: Array) -> tuple[Array, Array, dict[str, Array]]:
  """Per-example losses over the 2B unpaired examples (KTO), their weights, metrics."""
  rows = mismatched_rows(batch)
  policy_kl = sampling.sequence_logps(model, rows["tokens"], rows["loss_mask"],
                                      attention_mask=rows["attention_mask"])[0]
  kl_ratio = jax.lax.stop_gradient(policy_kl - jnp.asarray(batch[KL_FIELD], jnp.float32))
  kl_ref = weighted_mean(kl_ratio, rows["valid"])
  b = x.policy_chosen.shape[0]
  example_weights = jnp.concatenate([weights, weights])
  losses, metrics = _losses_and_metrics(loss, loss.spec.fn(
      jnp.concatenate([x.policy_chosen, x.policy_rejected]),
      jnp.concatenate([x.ref_chosen, x.ref_rejected]),
      jnp.arange(2 * b) < b, kl_ref, beta=loss.beta, **loss.kwargs), example_weights)
  return losses, example_weights, {f"{loss.name}/kl_ref": kl_ref, **metrics}


def _losses_and_metrics(loss: DirectLoss, out: Any, weights: Array
                        ) -> tuple[Array, dict[str, Array]]:
  """The loss's per-example values, and its own metrics (``registry.split_loss_output``):
  per-example ones as their weighted mean over the examples the loss counts."""
  losses, metrics = registry.split_loss_output(out, "direct", loss.name)
  losses = _per_example(loss, losses, weights)
  return losses, {k: v if jnp.ndim(v) == 0 else weighted_mean(v, weights)
                  for k, v in metrics.items()}


def make_loss_fn(loss: DirectLoss) -> Callable[[nnx.Module, Batch, Array],
                                                   tuple[Array, dict[str, Array]]]:
  """``loss_fn(model, batch, rng) -> (loss, metrics)`` for ``prefjax.train.train_loop``."""

  def loss_fn(model: nnx.Module, batch: Batch, rng: Array):
    del rng
    scores = score_pairs(model, batch, num_segments=loss.num_segments)
    kwargs, weights, dropped = _tie_handling(loss, batch)
    x = _finite_where_unweighted(oriented(pair_logps(loss, scores, batch), batch["outcome"]),
                                 weights)
    metrics: dict[str, Array] = {}
    if loss.spec.unpaired:
      losses, example_weights, metrics = _unpaired_losses(loss, model, x, batch, weights)
      main = weighted_mean(losses, example_weights)
    else:
      losses, metrics = _losses_and_metrics(loss, loss.spec.fn(x, beta=loss.beta, **kwargs),
                                            weights)
      main = weighted_mean(losses, weights)
    total = main
    tie = decisive_outcome(batch) == 0.5
    if loss.alpha:
      per_token = -x.policy_chosen / jnp.maximum(x.chosen_tokens, 1.0)
      nll = weighted_mean(jnp.where(tie, 0.0, per_token), weights)
      total = total + loss.alpha * nll
      metrics.update({"nll": nll, "preference_loss": main})
    metrics.update(pair_metrics(loss, x, weights, tie))
    metrics["pairs/num_dropped_ties"] = dropped
    metrics["loss_weight"] = jnp.sum(weights)
    return total, metrics

  return loss_fn
