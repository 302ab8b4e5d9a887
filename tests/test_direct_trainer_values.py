"""The DPO trainer's loss on a real decoder against float64 references built by hand.

``test_losses_direct*`` pin each loss's formula on given log-probs. This file pins what
the trainer feeds it: sequence log-probs from a padded batch, pairs turned around when the
rejected side won, and for KTO the reference point z₀ = max(0, mean KL estimate) over the
mismatched rows (prompt k with response k+1 of the 2B rows; Ethayarajh et al. 2024,
arXiv:2402.01306), with the policy away from the reference so that z₀ is not 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.direct import loss as loss_lib
from prefjax.models import decoder

VOCAB, LENGTH, PAIRS = 13, 12, 3
OUTCOME = np.array([1.0, 0.0, 1.0])  # pair 1: the rejected response won
WEIGHT = np.array([1.0, 2.0, 0.5])


def _rows(seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda low, high: rng.integers(1, VOCAB, rng.integers(low, high))  # noqa: E731
  prompts = [draw(2, 5) for _ in range(PAIRS)]
  chosen = [draw(2, 6) for _ in range(PAIRS)]
  rejected = [draw(2, 6) for _ in range(PAIRS)]
  return list(zip(prompts, chosen)) + list(zip(prompts, rejected))  # 2B rows: chosen first


def _padded(rows):
  tokens, attention, scored = (np.zeros((len(rows), LENGTH), np.int32) for _ in range(3))
  for i, (prompt, response) in enumerate(rows):
    row = np.concatenate([prompt, response])
    tokens[i, :len(row)], attention[i, :len(row)] = row, 1
    scored[i, len(prompt):len(row)] = 1
  return tokens, attention, scored


def _sequence_logps(model, rows):
  """Σ over response tokens of log p(token | everything before it), in float64."""
  tokens, attention, scored = _padded(rows)
  logits = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(attention)),
                      np.float64)
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  picked = np.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  return (picked * scored[:, 1:]).sum(axis=1)


@pytest.fixture(scope="module")
def setup():
  config = decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB, num_layers=1)
  policy = decoder.Decoder(config, rngs=nnx.Rngs(0))
  reference = decoder.Decoder(config, rngs=nnx.Rngs(1))
  rows = _rows()
  tokens, attention, scored = _padded(rows)
  batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": scored,
           "pair_mask": np.ones(PAIRS, np.float32), "weight": WEIGHT.astype(np.float32),
           "outcome": OUTCOME.astype(np.float32)}
  batch.update({k: np.asarray(v) for k, v in loss_lib.reference_fields(
      reference, batch, num_segments=None, with_kl=True).items()})
  return policy, reference, rows, batch


def _oriented(values):
  """(chosen, rejected) per pair after turning around the pairs the rejected side won."""
  first, second = values[:PAIRS], values[PAIRS:]
  flip = OUTCOME < 0.5
  return np.where(flip, second, first), np.where(flip, first, second)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_kto_uses_the_mismatched_rows_kl_as_its_reference_point(setup, beta):
  policy, reference, rows, batch = setup
  log_ratio = _sequence_logps(policy, rows) - _sequence_logps(reference, rows)
  mismatched = [(rows[k][0], rows[(k + 1) % len(rows)][1]) for k in range(len(rows))]
  kl = np.mean(_sequence_logps(policy, mismatched) - _sequence_logps(reference, mismatched))
  assert kl > 0.1  # the clamp max(0, ·) is inactive: z₀ itself is what is checked
  desirable, undesirable = _oriented(log_ratio)
  losses = np.concatenate([1.3 * _sigmoid(-beta * (desirable - kl)),
                           0.7 * _sigmoid(-beta * (kl - undesirable))])
  weights = np.concatenate([WEIGHT, WEIGHT])
  expected = np.sum(weights * losses) / weights.sum()
  loss = loss_lib.DirectLoss(name="kto", beta=beta, ref_mode="online", loss_kwargs=(
      ("desirable_weight", 1.3), ("undesirable_weight", 0.7)))
  total, metrics = loss_lib.make_loss_fn(loss)(policy, batch, jax.random.key(0))
  assert float(metrics["kto/kl_ref"]) == pytest.approx(kl, rel=2e-5)
  assert float(total) == pytest.approx(expected, rel=2e-5)
  # Matched rows instead of mismatched ones would give the mean log-ratio instead.
  assert abs(np.mean(log_ratio) - kl) > 0.05


def test_dpo_orients_pairs_by_outcome_and_its_accuracy_is_strict(setup):
  policy, reference, rows, batch = setup
  beta = 0.5
  chosen, rejected = _oriented(_sequence_logps(policy, rows) - _sequence_logps(reference, rows))
  margin = beta * (chosen - rejected)
  expected = np.sum(WEIGHT * np.logaddexp(0.0, -margin)) / WEIGHT.sum()
  loss = loss_lib.DirectLoss(name="dpo", beta=beta, ref_mode="online")
  total, metrics = loss_lib.make_loss_fn(loss)(policy, batch, jax.random.key(0))
  assert float(total) == pytest.approx(expected, rel=2e-5)
  assert float(metrics["rewards/margins"]) == pytest.approx(
      np.sum(WEIGHT * margin) / WEIGHT.sum(), rel=2e-5, abs=1e-6)
  assert float(metrics["rewards/accuracies"]) == pytest.approx(
      np.sum(WEIGHT * (margin > 0)) / WEIGHT.sum())
  # At the start of training (policy = reference) every implicit reward is 0: no pair is
  # ranked right, so the accuracy is 0, not 1 (TRL's "chosen > rejected").
  _, at_start = loss_lib.make_loss_fn(loss)(reference, batch, jax.random.key(0))
  assert float(at_start["rewards/accuracies"]) == 0.0
  assert float(at_start["rewards/margins"]) == 0.0
