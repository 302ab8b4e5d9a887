"""Shared-prompt packed pairs: one prompt copy, both responses attend to it, rewards unchanged.

The layout (``PipelineConfig(share_prompt=True)``) must give every reward model
exactly the rewards and gradients of the plain padded layout, which computes the
prompt twice; the attention rule behind it is checked against a float64 reference.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.data import pipeline
from prefjax.data import tokenize
from prefjax.direct import loss as direct_loss
from prefjax.models import attention, decoder, encoder, heads
from prefjax.rm import loss as rm_loss

TOK = tokenize.ByteTokenizer()


def _source(n=11, seed=0):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"q{i}:" + "p" * int(rng.integers(0, 30)),
           "chosen": f" c{i}" + "c" * int(rng.integers(0, 20)),
           "rejected": f" r{i}" + "r" * int(rng.integers(0, 9)),
           "outcome": 1.0} for i in range(n)]


def _config(**overrides):
  base = dict(seed=0, batch_size=4, max_length=48, max_prompt_length=32, num_epochs=1,
              shuffle=False, shard_index=0, shard_count=1)
  return pipeline.PipelineConfig(**{**base, **overrides})


SHARED = dict(mode="packed", share_prompt=True, pack_rows=2, pack_length=96,
              max_segments_per_row=9, pack_window=8)


def _batches(**overrides):
  return list(pipeline.preference_dataset(_source(), TOK, _config(**overrides)))


# ----------------------------------------------------------------------------- attention


def _reference(q, k, v, segments, prefixes):
  """float64 numpy softmax over keys that are causal and in the query's segment or prefix."""
  n, t, h, d = q.shape
  out = np.zeros_like(q)
  for b in range(n):
    seg, pre = segments[b], prefixes[b]
    visible = np.tril(np.ones((t, t), bool)) & (
        (seg[:, None] == seg[None, :]) | (pre[:, None] == seg[None, :]))
    for j in range(h):
      s = np.where(visible, q[b, :, j] @ k[b, :, j].T / np.sqrt(d), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, j] = (p / p.sum(-1, keepdims=True)) @ v[b, :, j]
  return out


def _shared_rows(t):
  """Row 0: two shared-prompt pairs + padding; row 1: plain segments (prefix = own id)."""
  segments = np.zeros((2, t), np.int32)
  prefixes = np.zeros((2, t), np.int32)
  at, seg = 0, 0
  for prompt, chosen, rejected in ((5, 3, 4), (3, 2, 2)):  # token counts of two pairs
    first = seg + 1
    for n in (prompt, chosen, rejected):
      seg += 1
      segments[0, at:at + n], prefixes[0, at:at + n] = seg, first
      at += n
  segments[1] = np.repeat([1, 2, 0], [t // 2, t // 4, t - t // 2 - t // 4])
  prefixes[1] = segments[1]
  return segments, prefixes


@pytest.mark.parametrize("tiled", [False, True])
def test_prefix_attention_matches_float64_reference_forward_and_backward(tiled):
  t, h, d = 24, 2, 4
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, t, h, d)) for _ in range(3))
  segments, prefixes = _shared_rows(t)
  cotangent = rng.normal(size=q.shape)
  mask = np.tril(np.ones((t, t), bool))[None] & (
      (segments[:, :, None] == segments[:, None]) | (prefixes[:, :, None] == segments[:, None]))

  def blocked(q, k, v):
    return attention.causal_attention(q, k, v, jnp.asarray(segments), jnp.asarray(prefixes),
                                      block_size=8, tiled=tiled)

  def masked(q, k, v):
    s = jnp.einsum("nthd,nshd->nhts", q, k) / np.sqrt(d)
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("nhts,nshd->nthd", p, v)

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (q, k, v))
    np.testing.assert_allclose(np.asarray(jax.jit(blocked)(*args)),
                               _reference(q, k, v, segments, prefixes), rtol=1e-10, atol=1e-12)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cotangent)  # noqa: E731
    got = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss(masked), argnums=(0, 1, 2)))(*args)
    for name, g, w in zip("qkv", got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-11,
                                 err_msg=f"d{name}")


# ------------------------------------------------------------------------------ pipeline


def test_layout_holds_each_pair_once_with_restarting_positions():
  batches = _batches(**SHARED)
  padded = {int(b["example_index"][j]): b for b in _batches() for j in
            np.flatnonzero(b["pair_mask"])}
  seen = 0
  for batch in batches:
    assert batch["tokens"].shape == (2, 96)
    for j in np.flatnonzero(batch["pair_mask"]):
      (row, c_seg), (row_r, r_seg) = batch["chosen_index"][j], batch["rejected_index"][j]
      assert row == row_r and r_seg == c_seg + 1
      prompt_seg = c_seg - 1
      parts = [np.flatnonzero(batch["segment_ids"][row] == s)
               for s in (prompt_seg, c_seg, r_seg)]
      assert np.concatenate(parts).tolist() == list(range(parts[0][0], parts[2][-1] + 1))
      assert (batch["prefix_ids"][row, np.concatenate(parts)] == prompt_seg).all()
      n_prompt = len(parts[0])
      for part, first_position in zip(parts, (0, n_prompt, n_prompt)):
        assert batch["positions"][row, part].tolist() == list(
            range(first_position, first_position + len(part)))
      assert not batch["loss_mask"][row, parts[0]].any()
      assert batch["loss_mask"][row, parts[1]].all() and batch["loss_mask"][row, parts[2]].all()
      # Same tokens as the padded layout's two rows.
      index = int(batch["example_index"][j])
      ref = padded[index]
      k = list(ref["example_index"]).index(index)
      b = ref["pair_mask"].shape[0]
      chosen_row = ref["tokens"][k][ref["attention_mask"][k] > 0]
      rejected_row = ref["tokens"][b + k][ref["attention_mask"][b + k] > 0]
      tokens = batch["tokens"][row]
      np.testing.assert_array_equal(tokens[np.concatenate(parts[:2])], chosen_row)
      np.testing.assert_array_equal(tokens[np.concatenate([parts[0], parts[2]])], rejected_row)
      seen += 1
  assert seen == len(_source())
  assert all((b["prefix_ids"][b["segment_ids"] == 0] == 0).all() for b in batches)


@pytest.mark.parametrize("overrides,message", [
    (dict(share_prompt=True), "needs mode='packed'"),
    (dict(SHARED, pack_length=80), "must hold a whole prompt"),
    (dict(SHARED, max_segments_per_row=2), "must hold a whole prompt"),
])
def test_bad_config_is_an_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    _config(**overrides)


@pytest.mark.parametrize("variant", [None, "quick"])
def test_long_sequence_dpo_config_defaults_to_shared_prompt_packing(variant):
  from configs.dpo import smollm2_hh
  from prefjax import experiment
  config = smollm2_hh.get_config(variant)
  cfg = experiment.pipeline_config(config.data)  # validates the rows against max_length
  assert (cfg.mode, cfg.share_prompt) == ("packed", True)
  assert direct_loss.DirectLoss.from_config(config).layout == "packed"
  config.loss.name = "kto"
  with pytest.raises(ValueError, match="share_prompt=False"):
    direct_loss.DirectLoss.from_config(config)


def test_sequence_batches_cannot_share_a_prompt():
  rows = [{"prompt": "a", "response": "b"}]
  with pytest.raises(ValueError, match="share_prompt is for preference pairs"):
    pipeline.sft_dataset(rows, TOK, _config(**SHARED))


# ---------------------------------------------------------------------------- reward models


@nnx.jit
def _rewards_and_grads(model, batch):
  def total(model):
    r_c, r_r = rm_loss.pair_rewards(model, batch, 9 if "segment_ids" in batch else None)
    keep = batch["pair_mask"]
    return jnp.sum(keep * (r_c - 0.5 * r_r)), (r_c, r_r)
  (_, rewards), grads = nnx.value_and_grad(total, has_aux=True)(model)
  return rewards, grads


def _decoder_rm(pooling=None):
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=TOK.vocab_size, num_layers=1)
  return heads.RewardModel(decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32),
                           pooling=pooling, rngs=nnx.Rngs(1))


def test_rewards_and_gradients_equal_the_padded_layout():
  model = _decoder_rm()
  rewards, grads = {}, {}
  for name, batches in (("padded", _batches(pad_to_multiple=None)), ("shared", _batches(**SHARED))):
    total = None
    for batch in batches:
      (r_c, r_r), g = _rewards_and_grads(model, {k: jnp.asarray(v) for k, v in batch.items()})
      for j in np.flatnonzero(batch["pair_mask"]):
        rewards.setdefault(name, {})[int(batch["example_index"][j])] = (float(r_c[j]),
                                                                       float(r_r[j]))
      g = jax.tree.map(np.asarray, nnx.state(g, nnx.Param))
      total = g if total is None else jax.tree.map(np.add, total, g)
    grads[name] = total
  assert rewards["padded"].keys() == rewards["shared"].keys()
  for index, want in rewards["padded"].items():
    np.testing.assert_allclose(rewards["shared"][index], want, rtol=1e-4, atol=1e-5,
                               err_msg=f"pair {index}")
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
  got, want = flat(grads["shared"]), flat(grads["padded"])
  assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


@nnx.jit
def _logps_and_grads(policy, batch):
  def total(policy):
    scores = direct_loss.score_pairs(policy, batch,
                                     num_segments=9 if "segment_ids" in batch else None)
    keep = batch["pair_mask"]
    return jnp.sum(keep * (scores.chosen - 0.5 * scores.rejected)), scores
  (_, scores), grads = nnx.value_and_grad(total, has_aux=True)(policy)
  return scores, grads


def test_policy_logps_and_gradients_equal_the_padded_layout():
  """DPO's summed response log-probs: a response's first token is scored from its
  prompt's last slot even when the other response sits between them."""
  policy = decoder.Decoder(decoder.DecoderConfig.tiny_llama(vocab_size=TOK.vocab_size,
                                                            num_layers=1),
                           rngs=nnx.Rngs(0), dtype=jnp.float32)
  scores, grads = {}, {}
  for name, batches in (("padded", _batches(pad_to_multiple=None)), ("shared", _batches(**SHARED))):
    total = None
    for batch in batches:
      got, g = _logps_and_grads(policy, {k: jnp.asarray(v) for k, v in batch.items()})
      for j in np.flatnonzero(batch["pair_mask"]):
        scores.setdefault(name, {})[int(batch["example_index"][j])] = [
            float(x[j]) for x in got]
      g = jax.tree.map(np.asarray, nnx.state(g, nnx.Param))
      total = g if total is None else jax.tree.map(np.add, total, g)
    grads[name] = total
  assert scores["padded"].keys() == scores["shared"].keys()
  for index, want in scores["padded"].items():
    assert want[2] >= 2 and want[3] >= 2  # token counts: every response scored whole
    np.testing.assert_allclose(scores["shared"][index], want, rtol=1e-5, atol=1e-4,
                               err_msg=f"pair {index}")
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
  got, want = flat(grads["shared"]), flat(grads["padded"])
  assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)


def test_encoder_reward_models_refuse_shared_batches():
  batch = {k: jnp.asarray(v) for k, v in _batches(**SHARED)[0].items()}
  cfg = encoder.EncoderConfig(vocab_size=TOK.vocab_size, hidden_size=16, num_layers=1,
                              num_heads=2, intermediate_size=32, max_position_embeddings=128)
  rm = heads.RewardModel(encoder.Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32),
                         rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="need a causal decoder trunk"):
    rm_loss.pair_rewards(rm, batch, 9)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_decoder_reward_models_pool_shared_batches_only_at_the_last_token(pooling):
  """A response's segment holds no prompt: mean and cls pooling would read other
  features than the padded rows evaluation scores (a helper measured 0.59 and 0.99)."""
  batch = {k: jnp.asarray(v) for k, v in _batches(**SHARED)[0].items()}
  rm = _decoder_rm(pooling)
  with pytest.raises(ValueError, match=f"pooling='{pooling}': a response's segment"):
    rm_loss.pair_rewards(rm, batch, 9)
