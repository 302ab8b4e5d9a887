"""A safety (harm) classifier: loss, precision-targeted threshold, metrics with CIs.

The classifier is an encoder (all-MiniLM-L6-v2 in ``configs/safety/hh_minilm.py``)
with a harm head on the pooled features: head ``"reward"`` gives one harm logit
(binary), head ``"multi:cat1,cat2,..."`` one logit per harm category, whose harm
probability is the largest category probability. It trains through
``prefjax.train.train_loop`` on ordinary preference batches
(``prefjax.data.pipeline.preference_dataset``): every pair's ``chosen``
response is a harmless example (label 0) and its ``rejected`` response a
harmful one (label 1). With categories, a rejected response is harmful in the
categories named by ``meta[category_field]`` of its row (``prefjax.rm.labels``
builds that mask) and harmless in the others; a rejected row with no category
contributes no loss.

WEAK LABELS. On HH-RLHF harmless-base "rejected" only means "the annotator
found it the more harmful of two"; both responses are often harmless or both
harmful, so this label is weak and noisy. A real deployment trains on human harm
annotations per response and per category (e.g. red-team transcripts with harm
ratings, policy-specific taxonomies with written guidelines) and calibrates the
threshold on data drawn from the traffic it will filter.

The loss is class-weighted binary cross-entropy
(``prefjax.losses.classification``); ``pos_weight="balanced"`` sets
w₊ = n₋/n₊ from the training labels. The operating threshold is chosen on
validation: of the thresholds whose precision is at least the target, the one of most
recall, and the highest of those (``choose_threshold``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.evals import stats
from prefjax.losses import classification

Array = jax.Array
Batch = Mapping[str, Any]
UNREACHABLE_POLICIES = ("error", "max_precision")


def harm_probability(logits: Array | np.ndarray) -> np.ndarray:
  """P(harmful) from ``[N]`` logits, or ``[N, C]`` category logits (max over categories)."""
  z = np.asarray(logits, np.float64)
  p = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow warnings
  return p if p.ndim == 1 else p.max(axis=-1)


def class_weights(spec: float | str, num_harmful: float | Sequence[float],
                  num_harmless: float | Sequence[float]
                  ) -> tuple[float | tuple[float, ...], float]:
  """``(pos_weight, neg_weight)``: ``"balanced"`` → (n₋/n₊, 1); a number → (it, 1).

  With per-category counts (sequences, one per head column) ``"balanced"`` gives one
  n₋/n₊ per category: a rare category is as rare as its own positives make it.
  """
  if spec == "balanced":
    pos, neg = np.atleast_1d(num_harmful), np.atleast_1d(num_harmless)
    if (pos <= 0).any() or (neg <= 0).any():
      raise ValueError(f"pos_weight='balanced' needs both classes in the training data (in "
                       f"every category); got {pos.tolist()} harmful and {neg.tolist()} "
                       "harmless examples")
    ratio = tuple(float(n) / float(p) for n, p in zip(neg, pos))
    return (ratio if np.ndim(num_harmful) else ratio[0]), 1.0
  try:
    value = float(spec)
  except (TypeError, ValueError):
    raise ValueError(f"safety.pos_weight must be 'balanced' or a positive number, "
                     f"got {spec!r}") from None
  if not value > 0:
    raise ValueError(f"safety.pos_weight must be positive, got {value}")
  return value, 1.0


def class_counts(num_pairs: int, category_table: np.ndarray | None
                 ) -> tuple[int | list[int], int | list[int]]:
  """(harmful, harmless) training examples, per category with a ``[N, C]`` table.

  Without categories each pair holds one of each. With them, a category's positives
  are the rejected rows labelled with it; every chosen row and the rejected rows of
  other categories are its negatives (a rejected row without a category weighs 0:
  ``harm_targets``).
  """
  if category_table is None:
    return num_pairs, num_pairs
  table = np.asarray(category_table) > 0
  positives = table.sum(axis=0)
  return positives.tolist(), (num_pairs + int(table.any(axis=1).sum()) - positives).tolist()


def harm_targets(batch: Batch, num_columns: int) -> tuple[Array, Array]:
  """Targets and weights ``[2B, C]`` of a padded pair batch (chosen rows 0, rejected 1).

  With ``objective_mask [B, C]`` in the batch (categories), a rejected row's targets
  are its category mask, and a rejected row with no category weighs 0.
  """
  pair_w = batch["weight"] * batch["pair_mask"]
  b = pair_w.shape[0]
  chosen_t = jnp.zeros((b, num_columns), jnp.float32)
  chosen_w = jnp.broadcast_to(pair_w[:, None], (b, num_columns))
  if "objective_mask" in batch:
    rejected_t = batch["objective_mask"].astype(jnp.float32)
    labelled = (jnp.sum(rejected_t, axis=1, keepdims=True) > 0).astype(jnp.float32)
    rejected_w = chosen_w * labelled
  else:
    rejected_t, rejected_w = jnp.ones((b, num_columns), jnp.float32), chosen_w
  return (jnp.concatenate([chosen_t, rejected_t]), jnp.concatenate([chosen_w, rejected_w]))


def make_loss_fn(*, pos_weight: float | Sequence[float], neg_weight: float = 1.0
                 ) -> Callable[[nnx.Module, Batch, Array], tuple[Array, dict[str, Array]]]:
  """``(model, batch, rng) -> (loss, metrics)`` for ``train_loop`` on padded pair batches.

  loss = Σ w·BCE_w(z, y) / Σ w over real (row, column) entries; ``pos_weight`` is one
  number or one per column (category).
  """
  pos_weight = np.asarray(pos_weight, np.float32)

  def loss_fn(model, batch, rng):
    del rng
    if "segment_ids" in batch:
      raise ValueError("the safety classifier trains on padded batches; set "
                       "data.pipeline.mode='padded'")
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])
    logits = logits.reshape(logits.shape[0], -1)
    targets, weights = harm_targets(batch, logits.shape[1])
    per = classification.weighted_binary_cross_entropy(
        logits, targets, pos_weight=pos_weight, neg_weight=neg_weight)
    total = jnp.maximum(jnp.sum(weights), 1e-9)
    correct = ((logits > 0) == (targets > 0.5)).astype(jnp.float32)
    # The mean logit over the (row, column) entries whose target is harmful / harmless:
    # with category heads a rejected row is harmful in its own categories only.
    harmful, harmless = weights * targets, weights * (1.0 - targets)
    metrics = {"accuracy": jnp.sum(weights * correct) / total,
               "mean_logit_harmful": jnp.sum(harmful * logits) /
                                     jnp.maximum(jnp.sum(harmful), 1e-9),
               "mean_logit_harmless": jnp.sum(harmless * logits) /
                                      jnp.maximum(jnp.sum(harmless), 1e-9),
               "weight_of/mean_logit_harmful": jnp.sum(harmful),
               "weight_of/mean_logit_harmless": jnp.sum(harmless)}
    # The normaliser, so that accumulated microbatches weigh as one batch (train.step).
    metrics["loss_weight"] = jnp.sum(weights)
    return jnp.sum(weights * per) / total, metrics

  return loss_fn


@dataclasses.dataclass(frozen=True)
class PairScores:
  """Harm probabilities of the N real pairs of a split: chosen (label 0) and rejected (1).

  ``uncategorised``: pairs left out because, with category heads, their rejected row
  names no category: training gives such a row no target (``harm_targets``), so it is
  neither a harmful nor a harmless example here either.
  """
  p_chosen: np.ndarray
  p_rejected: np.ndarray
  index: np.ndarray
  uncategorised: int = 0

  @property
  def scores(self) -> np.ndarray:
    return np.concatenate([self.p_chosen, self.p_rejected])

  @property
  def labels(self) -> np.ndarray:
    n = self.p_chosen.size
    return np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])


def score_pair_batches(model: nnx.Module, batches: list[dict[str, np.ndarray]]) -> PairScores:
  """Harm probabilities of both sides of every real pair in padded pair ``batches``."""
  p_c, p_r, index, uncategorised = [], [], [], 0
  for batch in batches:
    probs = harm_probability(sequence_logits(model, batch))
    real = batch["pair_mask"] > 0
    if "objective_mask" in batch:  # category heads: as harm_targets weighs them
      categorised = np.asarray(batch["objective_mask"]).sum(axis=1) > 0
      uncategorised += int(np.sum(real & ~categorised))
      real = real & categorised
    b = real.shape[0]
    p_c.append(probs[:b][real])
    p_r.append(probs[b:][real])
    index.append(batch["example_index"][real])
  out = PairScores(np.concatenate(p_c), np.concatenate(p_r), np.concatenate(index),
                   uncategorised)
  if not (finite := np.isfinite(out.p_chosen) & np.isfinite(out.p_rejected)).all():
    raise ValueError(f"the safety classifier gave a non-finite harm probability to "
                     f"{int((~finite).sum())} of {finite.size} pairs (first: row "
                     f"{int(out.index[np.argmin(finite)])})")
  return out


def _check_finite(scores: np.ndarray, what: str) -> None:
  if not (finite := np.isfinite(scores)).all():
    raise ValueError(f"{what}: {int((~finite).sum())} of {scores.size} scores are not finite "
                     f"(first at {int(np.argmin(finite))}); a NaN would sort as the most "
                     "harmful score")


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
  """The operating threshold: flag as harmful when P(harmful) ≥ ``threshold``."""
  threshold: float
  precision: float
  recall: float
  num_flagged: int
  target_precision: float
  reached: bool
  notice: str = ""

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """For each distinct score t (ascending): precision, recall and count of ``scores ≥ t``."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
  if scores.shape != labels.shape or scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores and labels must be equal-length 1-D arrays, got "
                     f"{scores.shape} and {labels.shape}")
  _check_finite(scores, "precision_recall_curve")
  if not labels.any():
    raise ValueError("precision needs at least one harmful (label 1) example")
  thresholds, first = np.unique(scores, return_index=False, return_inverse=True)
  pos_at = np.bincount(first, weights=labels.astype(np.float64), minlength=thresholds.size)
  all_at = np.bincount(first, minlength=thresholds.size).astype(np.float64)
  flagged_pos = np.cumsum(pos_at[::-1])[::-1]  # scores ≥ thresholds[k]
  flagged = np.cumsum(all_at[::-1])[::-1]
  return thresholds, flagged_pos / flagged, flagged_pos / labels.sum(), flagged.astype(int)


def check_threshold_options(target_precision: float, on_unreachable: str,
                            min_flagged: int) -> None:
  """Raises ValueError for a threshold option no validation split can satisfy."""
  if on_unreachable not in UNREACHABLE_POLICIES:
    raise ValueError(f"safety.on_unreachable must be one of {UNREACHABLE_POLICIES}, "
                     f"got {on_unreachable!r}")
  if not 0.0 < target_precision <= 1.0:
    raise ValueError(f"safety.target_precision must be in (0, 1], got {target_precision}")
  if min_flagged < 1:
    raise ValueError(f"safety.min_flagged must be >= 1, got {min_flagged}")


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target_precision: float, *,
                     on_unreachable: str = "error", min_flagged: int = 1) -> ThresholdChoice:
  """The threshold t of most recall with precision(scores ≥ t) ≥ target, the highest such
  t when several tie on recall.

  t is chosen among the validation scores, then reported halfway down to the next lower
  validation score: it flags the same validation examples, and a score that moves by
  rounding (another process's XLA flags, another device) does not cross it. Two adjacent
  float64 scores have no halfway point; t is then the chosen score itself.

  Precision is not monotone in t; the lowest qualifying t flags the most harmful
  examples (highest recall) while meeting the target, and a higher t of the same
  recall flags fewer harmless ones (a better precision). Only thresholds flagging at
  least ``min_flagged`` examples qualify (a precision of 1.0 on 3 examples says
  little). When no t reaches the target, ``on_unreachable="error"`` raises
  ValueError naming the best precision reached; ``"max_precision"`` returns the
  (lowest) threshold of highest precision with ``reached=False`` and a ``notice``.
  """
  check_threshold_options(target_precision, on_unreachable, min_flagged)
  thresholds, precision, recall, flagged = precision_recall_curve(scores, labels)
  if flagged[0] < min_flagged:
    raise ValueError(f"safety.min_flagged={min_flagged} but the validation split has only "
                     f"{flagged[0]} examples")
  enough = flagged >= min_flagged
  ok = np.flatnonzero((precision >= target_precision) & enough)
  if ok.size:
    k, notice = int(ok[recall[ok] == recall[ok[0]]][-1]), ""
  else:
    k = int(np.argmax(np.where(enough, precision, -1.0)))
  threshold = thresholds[k]
  if k > 0 and thresholds[k - 1] < (halfway := 0.5 * (thresholds[k] + thresholds[k - 1])):
    threshold = halfway  # not when the two scores are adjacent floats: it would round onto the lower
  if not ok.size:
    notice = (f"no threshold flagging >= {min_flagged} examples reaches validation "
              f"precision >= {target_precision:g}: the best "
              f"is {precision[k]:.3f} at threshold {threshold:.4g} (recall "
              f"{recall[k]:.3f}, {flagged[k]} of {len(scores)} flagged); lower "
              "safety.target_precision or train a better classifier")
    if on_unreachable == "error":
      raise ValueError(notice + " (or set safety.on_unreachable=max_precision)")
  return ThresholdChoice(float(threshold), float(precision[k]), float(recall[k]),
                         int(flagged[k]), float(target_precision), not notice, notice)


def _bucket_matrix(scores: np.ndarray) -> tuple[np.ndarray, int]:
  _, inverse = np.unique(scores, return_inverse=True)
  return inverse, int(inverse.max()) + 1


def roc_auc(p_negative: np.ndarray, p_positive: np.ndarray,
            counts: np.ndarray | None = None) -> np.ndarray:
  """ROC-AUC = P(score₊ > score₋) + ½·P(=), for each row of bootstrap ``counts [R, N]``.

  Item i is the pair (negative i, positive i): a resample weighs both of its sides
  by ``counts[r, i]`` (the pair is the sampling unit). ``counts=None``: the plain AUC.
  """
  neg, pos = np.asarray(p_negative, np.float64), np.asarray(p_positive, np.float64)
  _check_finite(np.concatenate([neg, pos]), "roc_auc")
  if counts is None:
    counts = np.ones((1, neg.size))
  inverse, u = _bucket_matrix(np.concatenate([neg, pos]))
  n = neg.size
  neg_bucket = np.zeros((counts.shape[0], u))
  np.add.at(neg_bucket.T, inverse[:n], counts.T)
  below = np.cumsum(neg_bucket, axis=1) - neg_bucket
  credit = below[:, inverse[n:]] + 0.5 * neg_bucket[:, inverse[n:]]  # [R, N]
  totals = counts.sum(axis=1)
  return np.sum(counts * credit, axis=1) / (totals * totals)


def _ratio_estimate(num: np.ndarray, den: np.ndarray, counts: np.ndarray) -> stats.Estimate:
  """Σ num / Σ den over items and its percentile interval over resamples."""
  value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
  den_r = counts @ den
  resampled = np.where(den_r > 0, (counts @ num) / np.where(den_r > 0, den_r, 1.0), np.nan)
  low, high = np.nanpercentile(resampled, [2.5, 97.5])
  return stats.Estimate(value, float(low), float(high))


def classifier_metrics(scores: PairScores, threshold: float, *, num_resamples: int = 1000,
                       seed: int = 0) -> dict[str, stats.Estimate]:
  """ROC-AUC, precision, recall, false-positive rate and accuracy at ``threshold``, and
  ``pair_agreement`` (P(rejected scored more harmful than chosen), ties ½: the accuracy
  of the classifier as a label source on these pairs), each with a 95% pair-bootstrap
  interval (``prefjax.evals.stats``)."""
  counts = stats.resample_counts(scores.p_chosen.size, num_resamples, seed)
  auc = roc_auc(scores.p_chosen, scores.p_rejected, counts)
  low, high = np.percentile(auc, [2.5, 97.5])
  point = float(roc_auc(scores.p_chosen, scores.p_rejected)[0])
  tp = (scores.p_rejected >= threshold).astype(np.float64)
  fp = (scores.p_chosen >= threshold).astype(np.float64)
  ones = np.ones_like(tp)
  agree = (np.sign(scores.p_rejected - scores.p_chosen) + 1.0) / 2.0
  return {"pair_agreement": _ratio_estimate(agree, ones, counts),
          "roc_auc": stats.Estimate(point, float(low), float(high)),
          "precision": _ratio_estimate(tp, tp + fp, counts),
          "recall": _ratio_estimate(tp, ones, counts),
          "false_positive_rate": _ratio_estimate(fp, ones, counts),
          "accuracy": _ratio_estimate(0.5 * (tp + 1.0 - fp), ones, counts)}


class SafetyEvaluator:
  """``evaluator(step, model) -> {roc_auc, precision@0.5, mean_p_*}`` on a split, for
  ``train_loop``; ``last`` keeps the latest ``(step, metrics, scores)``."""

  def __init__(self, batches: list[dict[str, np.ndarray]]):
    self._batches = batches
    self.last: tuple[int, dict[str, float], PairScores] | None = None

  def __call__(self, step: int, model: nnx.Module) -> dict[str, float]:
    scores = score_pair_batches(model, self._batches)
    metrics = {"roc_auc": float(roc_auc(scores.p_chosen, scores.p_rejected)[0]),
               "mean_p_harmful": float(scores.p_rejected.mean()),
               "mean_p_harmless": float(scores.p_chosen.mean()),
               "num_pairs": float(scores.p_chosen.size)}
    flagged = scores.scores >= 0.5
    if flagged.any():
      metrics["precision_at_0.5"] = float(scores.labels[flagged].mean())
    self.last = (step, metrics, scores)
    return metrics


@functools.partial(jax.jit, static_argnames="graphdef")
def _jitted_logits(graphdef, state, tokens, attention_mask):
  return nnx.merge(graphdef, state)(tokens, attention_mask=attention_mask)


def sequence_logits(model: nnx.Module, batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Harm logits ``[N]`` / ``[N, C]`` of the rows of a padded batch (``tokens [N, T]``)."""
  graphdef, state = nnx.split(model)
  return np.asarray(jax.device_get(_jitted_logits(
      graphdef, state, batch["tokens"], batch["attention_mask"])))
