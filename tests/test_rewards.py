"""Tests for prefjax.rewards: aggregations, normalisation, RewardFn implementations."""

import logging

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax import rewards
from prefjax.evals import scorers
from tests import numerics

# ----------------------------------------------------------------------------- aggregation

HAND = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])


@pytest.mark.parametrize("method, lam, expected", [
    ("mean", 0.0, [2.0, 2.0]),
    ("wco", 0.0, [1.0, 0.0]),
    ("uwo", 0.5, [2.0 - 0.5 * 2.0 / 3.0, 2.0 - 0.5 * 8.0]),   # population variances 2/3, 8
    ("uwo", 2.0, [2.0 - 4.0 / 3.0, 2.0 - 16.0]),
])
def test_aggregate_hand_values(method, lam, expected):
  np.testing.assert_allclose(rewards.aggregate(HAND, method, lam), expected, rtol=1e-6)


def test_aggregate_relations():
  r = np.random.default_rng(10).normal(size=(4, 5, 7)).astype(np.float32)
  mean = rewards.aggregate(r, "mean")
  with pytest.warns(UserWarning, match=r"'uwo', lam=0\) is the ensemble mean"):
    np.testing.assert_allclose(rewards.aggregate(r, "uwo"), mean, rtol=1e-6)
  assert bool(jnp.all(rewards.aggregate(r, "wco") <= mean))
  assert bool(jnp.all(rewards.aggregate(r, "uwo", 0.3) <= mean))
  np.testing.assert_allclose(rewards.aggregate(r, "uwo", 0.3),
                             np.mean(r, -1) - 0.3 * np.var(np.asarray(r, np.float64), -1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"lam=-1.0 must be >= 0"):
    rewards.aggregate(r, "uwo", -1.0)
  with pytest.raises(scorers.EvalInputError, match=r"config.uwo_lambda=-1 must be >= 0"):
    scorers.reward_columns("ens", (), -1)


@pytest.mark.parametrize("method", ["mean", "wco", "uwo"])
def test_aggregate_jit_and_vmap(method):
  r = np.random.default_rng(11).normal(size=(6, 4)).astype(np.float32)
  eager = rewards.aggregate(r, method, 0.7)
  jitted = jax.jit(rewards.aggregate, static_argnames="method")(r, method=method, lam=0.7)
  mapped = jax.vmap(lambda row: rewards.aggregate(row, method, 0.7))(r)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  np.testing.assert_allclose(mapped, eager, rtol=1e-6)
  assert eager.shape == (6,) and eager.dtype == jnp.float32


def test_aggregate_bfloat16_and_gradient():
  out = rewards.aggregate(jnp.asarray(HAND, jnp.bfloat16), "uwo", 0.5)
  assert out.dtype == jnp.float32  # HAND is exact in bfloat16: the hand values, in float32
  np.testing.assert_allclose(out, [2.0 - 0.5 * 2.0 / 3.0, 2.0 - 0.5 * 8.0], rtol=1e-6)
  r = np.random.default_rng(0).normal(size=(3, 4))
  numerics.check_grad(lambda x: rewards.aggregate(x, "uwo", 0.8), [r])


def test_aggregate_errors():
  with pytest.raises(ValueError, match="unknown ensemble aggregation 'median'"):
    rewards.aggregate(HAND, "median")
  with pytest.raises(ValueError, match="zero members"):
    rewards.aggregate(jnp.zeros((3, 0)), "mean")


# ----------------------------------------------------------------------------- normaliser


def test_normalizer_makes_reference_mean_zero_per_member():
  rng = np.random.default_rng(1)
  reference = rng.normal(loc=[3.0, -2.0, 10.0], scale=[1.0, 4.0, 0.5], size=(500, 3))
  centred = rewards.RewardNormalizer.fit(reference)
  np.testing.assert_allclose(np.mean(centred(reference), 0), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(centred(reference), 0), reference.std(0), rtol=1e-5)
  standard = rewards.RewardNormalizer.fit(reference, standardize=True)
  np.testing.assert_allclose(np.std(standard(reference), 0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(standard.inverse(standard(reference)), reference, rtol=1e-5)
  moved = jax.jit(lambda norm, r: norm(r))(standard, reference[:4])
  np.testing.assert_allclose(moved, standard(reference[:4]), rtol=1e-6)


def test_normalizer_weighted_fit():
  values = np.array([0.0, 1.0, 5.0])
  weights = np.array([0.5, 0.25, 0.25])    # e.g. π_ref over three candidates
  norm = rewards.RewardNormalizer.fit(values, weights=weights)
  np.testing.assert_allclose(float(norm.mean), 1.5, rtol=1e-6)
  np.testing.assert_allclose(np.dot(weights, norm(values)), 0.0, atol=1e-6)
  # Standardized, the spread is the weighted one (the unweighted std is 2.16, not 1.80).
  scaled = rewards.RewardNormalizer.fit(values, weights=weights, standardize=True)
  std = np.sqrt(0.5 * 1.5**2 + 0.25 * 0.5**2 + 0.25 * 3.5**2)
  np.testing.assert_allclose(float(scaled.scale), std, rtol=1e-6)
  z = np.asarray(scaled(values), np.float64)
  np.testing.assert_allclose(z, (values - 1.5) / std, rtol=1e-6)
  np.testing.assert_allclose([np.dot(weights, z), np.dot(weights, z**2)], [0.0, 1.0], atol=1e-6)


def test_normalizer_errors():
  with pytest.raises(ValueError, match="member 1 has zero spread"):
    rewards.RewardNormalizer.fit(np.array([[1.0, 2.0], [3.0, 2.0]]), standardize=True)
  with pytest.raises(ValueError, match="row 2 is not finite"):
    rewards.RewardNormalizer.fit(np.array([1.0, 2.0, np.nan]))
  with pytest.raises(ValueError, match="fitted on 2 members"):
    rewards.RewardNormalizer.fit(np.ones((3, 2)) * [[1], [2], [3]])(jnp.ones((4, 3)))


# ----------------------------------------------------------------------------- RewardFns


def _encode(texts):
  """Byte tokenizer, right-padded: a local stand-in for prefjax.data.tokenize."""
  ids = [list(t.encode()) for t in texts]
  width = max(len(x) for x in ids)
  tokens = np.array([x + [0] * (width - len(x)) for x in ids], np.int32)
  mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], np.int32)
  return tokens, mask


def _decode(tokens, mask):
  return [bytes(int(t) for t, m in zip(row, mrow) if m).decode() for row, mrow in
          zip(tokens, mask)]


TEXTS = ["hello", "a", "preference", "reward models"]


def test_programmatic_text_reward():
  gold = rewards.ProgrammaticReward(lambda texts: [t.count("e") - 0.1 * len(t) for t in texts],
                                    inputs="texts", name="gold_e", decode=_decode)
  assert isinstance(gold, rewards.RewardFn) and gold.num_members == 1
  expected = [1 - 0.5, -0.1, 4 - 1.0, 2 - 1.3]
  np.testing.assert_allclose(gold(texts=TEXTS), expected, rtol=1e-6)
  np.testing.assert_allclose(gold(*_encode(TEXTS)), expected, rtol=1e-6)
  np.testing.assert_allclose(gold.score(texts=TEXTS), expected, rtol=1e-6)


def test_programmatic_token_reward_is_jitted():
  traces = []

  def token_count(tokens, mask):
    traces.append(tokens.shape)
    return jnp.sum(mask, axis=-1).astype(jnp.float32)

  reward = rewards.ProgrammaticReward(token_count, inputs="tokens", encode=_encode)
  np.testing.assert_allclose(reward(texts=TEXTS), [5, 1, 10, 13])
  tokens, mask = _encode(TEXTS)
  reward(tokens, mask)
  assert reward(tokens).shape == (4,) and len(traces) == 1


def test_programmatic_reward_errors():
  short = rewards.ProgrammaticReward(lambda texts: [1.0], inputs="texts", name="short")
  with pytest.raises(ValueError, match=r"'short' returned shape \(1,\), expected \(4,\)"):
    short(texts=TEXTS)
  nan = rewards.ProgrammaticReward(lambda t: [0.0, float("nan"), 1.0, 2.0], inputs="texts",
                                   name="nan_gold")
  with pytest.raises(ValueError, match="'nan_gold' is not finite for row 1"):
    nan(texts=TEXTS)
  with pytest.raises(ValueError, match="no `decode` function"):
    short(*_encode(TEXTS))
  count = rewards.ProgrammaticReward(lambda texts: [float(len(t)) for t in texts],
                                     inputs="texts")
  assert count(texts=[]).shape == (0,)  # an empty batch is not an error
  assert rewards.check_rewards(np.zeros((0, 3)), num_rows=0, num_members=3,
                               name="ens").shape == (0, 3)


class _TinyEnsembleRM(nnx.Module):
  """Embedding + masked mean pool + K linear heads: a stand-in for prefjax.models.heads."""

  def __init__(self, num_members: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, 8, rngs=rngs)
    self.head = nnx.Linear(8, num_members, rngs=rngs)
    self.num_members = num_members

  def __call__(self, tokens, *, attention_mask):
    mask = attention_mask[..., None].astype(jnp.float32)
    pooled = jnp.sum(self.embed(tokens) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
    out = self.head(pooled)
    return out[:, 0] if self.num_members == 1 else out


def test_model_reward_callable_compiles_once_per_shape_and_chunks():
  traces = []

  def model(tokens, attention_mask):
    traces.append(tokens.shape)
    return jnp.sum(tokens * attention_mask, axis=-1).astype(jnp.float32) / 100.0

  tokens, mask = _encode(TEXTS + ["x", "yz", "abc"])
  plain = rewards.ModelReward(model, name="sum")
  expected = np.sum(tokens * mask, -1) / 100.0
  np.testing.assert_allclose(plain(tokens, mask), expected, rtol=1e-6)
  plain(tokens, mask)
  assert len(traces) == 1
  chunked = rewards.ModelReward(model, batch_size=3)
  np.testing.assert_allclose(chunked(tokens, mask), expected, rtol=1e-6)      # N = 7
  np.testing.assert_allclose(chunked(tokens[:5], mask[:5]), expected[:5], rtol=1e-6)
  assert traces[1:] == [(3, tokens.shape[1])]


def test_model_reward_nnx_ensemble_sees_parameter_updates():
  model = _TinyEnsembleRM(3, nnx.Rngs(0))
  reward = rewards.ModelReward(model, name="rm", num_members=3, encode=_encode)
  before = reward(texts=TEXTS)
  assert before.shape == (4, 3)
  np.testing.assert_allclose(reward.score(texts=TEXTS), np.mean(before, -1), rtol=1e-6)
  model.head.bias[...] = model.head.bias[...] + jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(reward(texts=TEXTS), before + np.array([1.0, 2.0, 3.0]),
                             rtol=1e-5, atol=1e-6)


def test_model_reward_rejects_wrong_shape_and_nan():
  two = rewards.ModelReward(lambda t, attention_mask: jnp.zeros((t.shape[0], 2)), name="two")
  with pytest.raises(ValueError, match=r"'two' returned shape \(4, 2\), expected \(4,\)"):
    two(*_encode(TEXTS))
  bad = rewards.ModelReward(lambda t, attention_mask: jnp.log(t[:, 0] - 100.0), name="bad")
  with pytest.raises(ValueError, match="'bad' is not finite for row 1"):
    bad(*_encode(TEXTS))      # "a" = 97 < 100 -> log of a negative number


def _members():
  fns = [lambda ts: [len(t) for t in ts], lambda ts: [t.count("e") for t in ts],
         lambda ts: [10.0 - len(set(t)) for t in ts]]
  return [rewards.ProgrammaticReward(f, inputs="texts", name=f"m{i}") for i, f in enumerate(fns)]


def test_ensemble_from_members_normalised_then_aggregated():
  ensemble = rewards.EnsembleReward(_members(), aggregation="uwo", lam=0.5)
  raw = np.array([[len(t), t.count("e"), 10.0 - len(set(t))] for t in TEXTS])
  np.testing.assert_allclose(ensemble(texts=TEXTS), raw, rtol=1e-6)
  assert ensemble.num_members == 3 and ensemble.name == "uwo(m0,m1,m2)"
  normalised = ensemble.fit_normalizer(texts=TEXTS, standardize=True)
  z = (raw - raw.mean(0)) / raw.std(0)
  np.testing.assert_allclose(normalised(texts=TEXTS), z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.mean(normalised(texts=TEXTS), 0), 0.0, atol=1e-6)
  np.testing.assert_allclose(normalised.score(texts=TEXTS),
                             z.mean(1) - 0.5 * z.var(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(normalised.with_aggregation("wco").score(texts=TEXTS),
                             z.min(1), rtol=1e-5, atol=1e-6)
  # Normalising from outside keeps the ensemble's aggregation (it used to score the mean).
  wrapped = rewards.NormalizedReward.fit(ensemble, texts=TEXTS, standardize=True)
  np.testing.assert_allclose(wrapped.score(texts=TEXTS), z.mean(1) - 0.5 * z.var(1),
                             rtol=1e-5, atol=1e-6)
  # Centred members put the mean at 0 under π_ref; WCO and UWO score below it.
  assert float(np.mean(normalised.with_aggregation("wco").score(texts=TEXTS))) < -0.1


def test_ensemble_from_one_ensemble_model():
  model = _TinyEnsembleRM(4, nnx.Rngs(1))
  member_model = rewards.ModelReward(model, num_members=4, encode=_encode)
  ensemble = rewards.EnsembleReward(member_model, aggregation="wco")
  members = member_model(texts=TEXTS)
  np.testing.assert_allclose(ensemble(texts=TEXTS), members, rtol=1e-6)
  np.testing.assert_allclose(ensemble.score(texts=TEXTS), np.min(members, -1), rtol=1e-6)
  from_model = rewards.EnsembleReward.from_model(model, aggregation="uwo", lam=1.0,
                                                 encode=_encode)     # K read from the model
  assert from_model.num_members == 4
  np.testing.assert_allclose(from_model.score(texts=TEXTS),
                             np.mean(members, -1) - np.var(members, -1), rtol=1e-5, atol=1e-6)
  # Standardized per member on reference samples (it raised: its one [N, K] member was
  # passed on as a list of scalar members).
  z = (members - members.mean(0)) / members.std(0)
  standardized = from_model.fit_normalizer(texts=TEXTS, standardize=True)
  np.testing.assert_allclose(standardized(texts=TEXTS), z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(standardized.score(texts=TEXTS), z.mean(-1) - z.var(-1),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="must hold scalar rewards"):
    rewards.EnsembleReward([member_model, member_model])
  with pytest.raises(ValueError, match="expected \\(4,\\)"):
    rewards.EnsembleReward(member_model, normalizer=rewards.RewardNormalizer.identity(3))


def test_normalized_reward_reference_scores_zero():
  reference, other = TEXTS, ["eee", "zzzz zzzz"]
  base = _members()[0]
  normalised = rewards.NormalizedReward.fit(base, texts=reference)
  assert float(jnp.mean(normalised(texts=reference))) == pytest.approx(0.0, abs=1e-6)
  mean_len = np.mean([len(t) for t in reference])
  np.testing.assert_allclose(normalised(texts=other), [3 - mean_len, 9 - mean_len], rtol=1e-6)


def test_a_model_reward_loads_the_checkpoint_its_ref_names(tmp_path):
  """``proxy.checkpoint`` = ``WORKDIR@best`` / ``@STEP`` (it took only the latest step)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from prefjax import experiment, train  # pylint: disable=import-outside-toplevel
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  model_cfg = {"arch": "decoder", "preset": "tiny_llama", "head": "reward", "dtype": "float32",
               "overrides": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                             "num_kv_heads": 1, "intermediate_size": 32,
                             "max_position_embeddings": 32}}
  tokens = np.tile(np.arange(1, 9, dtype=np.int32), (4, 1))

  def loss_fn(model, batch, rng):  # pull every reward towards 3
    del rng
    return jnp.mean((model(batch["tokens"]) - 3.0) ** 2), {}

  scores = iter([0.5, 0.9, 0.7])  # step 2 is the best "accuracy"
  train.train_loop(
      workdir=str(tmp_path), config={"loop": {"best_metric": "accuracy"}},
      model=experiment.make_model(model_cfg, vocab_size=259, seed=0), loss_fn=loss_fn,
      optimizer={"name": "sgd", "learning_rate": 0.05},
      loop=train.LoopConfig(num_steps=3, eval_every=1, checkpoint_every=1, keep_checkpoints=3,
                            best_metric="accuracy", tensorboard=False),
      train_iter=iter([{"tokens": tokens}] * 3),
      evaluators=[lambda step, model: {"accuracy": next(scores)}])
  spec = {"kind": "model", "name": "proxy", "tokenizer": {"path": "byte"},
          "model": model_cfg, "max_length": 16}
  texts = (["ab", "abc"], ["cd", "d"])
  by_step = {}
  for ref in ("@1", "@2", "@3", "", "@best", "@latest"):
    reward = rl_rewards.make_reward(ml_collections.ConfigDict(
        {**spec, "checkpoint": f"{tmp_path}{ref}"}))
    by_step[ref] = reward(*texts)
  assert not np.allclose(by_step["@1"], by_step["@3"])
  np.testing.assert_array_equal(by_step["@best"], by_step["@2"])
  np.testing.assert_array_equal(by_step[""], by_step["@3"])
  np.testing.assert_array_equal(by_step["@latest"], by_step["@3"])


def test_a_model_reward_cuts_texts_as_the_checkpoint_it_loads_was_trained(tmp_path, caplog):
  """Steps 1–2 trained on 12-token pairs, a rerun went on to step 4 on 32-token ones:
  ``WORKDIR@2`` was cut as step 4 was trained (the latest checkpoint's pipeline)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from prefjax import experiment, train  # pylint: disable=import-outside-toplevel
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  model_cfg = {"arch": "decoder", "preset": "tiny_llama", "head": "reward", "dtype": "float32",
               "overrides": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                             "num_kv_heads": 1, "intermediate_size": 32,
                             "max_position_embeddings": 64}}
  tokens = np.tile(np.arange(1, 9, dtype=np.int32), (4, 1))
  loss_fn = lambda model, batch, rng: (jnp.mean((model(batch["tokens"]) - 3.0) ** 2), {})
  for steps, max_length in ((2, 12), (4, 32)):
    train.train_loop(
        workdir=str(tmp_path), config={"data": {"pipeline": {"max_length": max_length,
                                                             "max_prompt_length": 4}}},
        model=experiment.make_model(model_cfg, vocab_size=259, seed=0), loss_fn=loss_fn,
        optimizer={"name": "sgd", "learning_rate": 0.05},
        loop=train.LoopConfig(num_steps=steps, checkpoint_every=1, keep_checkpoints=4,
                              tensorboard=False),
        train_iter=iter([{"tokens": tokens}] * steps))
  spec = {"kind": "model", "name": "proxy", "tokenizer": {"path": "byte"}, "model": model_cfg}
  with caplog.at_level(logging.WARNING, logger="absl"):
    at_2 = rl_rewards.make_reward(ml_collections.ConfigDict({**spec,
                                                             "checkpoint": f"{tmp_path}@2"}))
  # orbax warned ("Given directory is read only", ...) at every read-only open.
  assert not [r for r in caplog.records if "read only" in r.getMessage()]
  # At 12 both are BOS + "fgh" + "01234567"; at 32 they differ after that.
  texts = [(["abcdefgh"], ["0123456789" * 3]), (["xyzefgh"], ["01234567zzzz"])]
  np.testing.assert_allclose(at_2(*texts[0]), at_2(*texts[1]), rtol=1e-6)
  at_4 = rl_rewards.make_reward(ml_collections.ConfigDict({**spec, "checkpoint": str(tmp_path)}))
  assert abs(at_4(*texts[0])[0] - at_4(*texts[1])[0]) > 1e-4
