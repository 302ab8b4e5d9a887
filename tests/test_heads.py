"""Reward / ensemble / multi-objective / value heads: read at the right tokens, packed == padded."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prefjax.models import decoder, encoder, heads

VOCAB = 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def dec():
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB, num_layers=1)
  return nnx.jit(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))()


@pytest.fixture(scope="module")
def enc():
  cfg = encoder.EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                              intermediate_size=64, max_position_embeddings=32)
  return nnx.jit(lambda: encoder.Encoder(cfg, rngs=nnx.Rngs(1), dtype=jnp.float32))()


@functools.partial(nnx.jit, static_argnames=("num_segments",))
def _run(model, tokens, attention_mask=None, segment_ids=None, positions=None,
         num_segments=None):
  """Jitted forward of any head model (one compile per model structure and shape)."""
  kwargs = dict(attention_mask=attention_mask, segment_ids=segment_ids, positions=positions)
  if num_segments is not None:
    kwargs["num_segments"] = num_segments
  return model(tokens, **kwargs)


@nnx.jit
def _hidden(trunk, tokens, attention_mask):
  return trunk.hidden_states(tokens, attention_mask=attention_mask)


def _padded_batch():
  tokens = np.random.RandomState(0).randint(1, VOCAB, (3, 8)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 5:] = 0    # right padded, 5 real tokens
  mask[2, :3] = 0    # left padded, 5 real tokens
  return tokens, mask


def _head_np(model_head: nnx.Linear):
  return np.asarray(model_head.kernel[...]), np.asarray(model_head.bias[...])


def _pack(seqs_per_row, width):
  """Packs lists of token lists into ``tokens, segment_ids, positions`` of shape [R, width]."""
  rows = len(seqs_per_row)
  tokens = np.zeros((rows, width), np.int32)
  seg_ids = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for r, seqs in enumerate(seqs_per_row):
    start = 0
    for s, seq in enumerate(seqs):
      tokens[r, start:start + len(seq)] = seq
      seg_ids[r, start:start + len(seq)] = s + 1
      positions[r, start:start + len(seq)] = np.arange(len(seq))
      start += len(seq)
  return tokens, seg_ids, positions


def test_decoder_reward_reads_last_real_token(dec):
  rm = heads.RewardModel(dec, rngs=nnx.Rngs(2))
  assert rm.pooling == "last"
  tokens, mask = _padded_batch()
  hidden = np.asarray(_hidden(dec, tokens, mask))
  w, b = _head_np(rm.head)
  last = np.array([7, 4, 7])  # full row, right padded after 5, left padded
  expected = hidden[np.arange(3), last] @ w[:, 0] + b[0]
  got = np.asarray(_run(rm, tokens, attention_mask=mask))
  assert got.shape == (3,) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=ATOL)
  # The reward changes with the last real token and ignores what follows it.
  edited = tokens.copy()
  edited[1, 6] = (edited[1, 6] + 1) % VOCAB
  np.testing.assert_allclose(np.asarray(_run(rm, edited, attention_mask=mask)), got, atol=ATOL)
  edited[1, 4] = (edited[1, 4] + 1) % VOCAB
  assert abs(float(_run(rm, edited, attention_mask=mask)[1]) - got[1]) > 1e-6


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_pooling_by_hand(enc, pooling):
  rm = heads.RewardModel(enc, pooling=pooling, rngs=nnx.Rngs(3))
  tokens, mask = _padded_batch()
  mask[2] = 1
  mask[2, 6:] = 0
  hidden = np.asarray(_hidden(enc, tokens, mask), np.float64)
  if pooling == "mean":
    feats = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:
    feats = hidden[:, 0]
  w, b = _head_np(rm.head)
  np.testing.assert_allclose(np.asarray(_run(rm, tokens, attention_mask=mask)),
                             feats @ w[:, 0] + b[0], atol=ATOL)


def test_encoder_defaults_to_mean_and_rejects_last(enc):
  assert heads.RewardModel(enc, rngs=nnx.Rngs(0)).pooling == "mean"
  with pytest.raises(ValueError, match="pooling='last' is for causal decoders"):
    heads.RewardModel(enc, pooling="last", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling must be one of"):
    heads.RewardModel(enc, pooling="max", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("trunk_name,pooling", [("dec", "last"), ("enc", "mean"),
                                                ("enc", "cls")])
def test_packed_rewards_equal_padded(request, trunk_name, pooling):
  trunk = request.getfixturevalue(trunk_name)
  rm = heads.RewardModel(trunk, pooling=pooling, rngs=nnx.Rngs(4))
  rng = np.random.RandomState(5)
  lengths = [[3, 4, 2], [6]]
  seqs = [[rng.randint(1, VOCAB, n) for n in row] for row in lengths]
  tokens, seg_ids, positions = _pack(seqs, width=10)
  packed = np.asarray(_run(rm, tokens, segment_ids=seg_ids, positions=positions, num_segments=3))
  assert packed.shape == (2, 4)
  flat = [(r, s, seq) for r, row in enumerate(seqs) for s, seq in enumerate(row)]
  padded = np.zeros((len(flat), 10), np.int32)
  for i, (_, _, seq) in enumerate(flat):
    padded[i, :len(seq)] = seq
  expected = np.asarray(_run(rm, padded, attention_mask=(padded > 0).astype(np.int32)))
  for i, (r, s, _) in enumerate(flat):
    np.testing.assert_allclose(packed[r, s + 1], expected[i], atol=ATOL)
  np.testing.assert_array_equal(packed[:, 0], 0.0)     # padding column
  np.testing.assert_array_equal(packed[1, 2:], 0.0)    # absent segments


def test_packed_call_requires_num_segments(dec):
  rm = heads.RewardModel(dec, rngs=nnx.Rngs(0))
  tokens, seg_ids, positions = _pack([[np.arange(1, 4)]], width=4)
  with pytest.raises(ValueError, match="num_segments"):
    _run(rm, tokens, segment_ids=seg_ids, positions=positions)


def test_shared_trunk_ensemble_member_equals_single_head(dec):
  ens = heads.MultiHeadEnsemble(dec, 3, rngs=nnx.Rngs(6))
  tokens, mask = _padded_batch()
  out = np.asarray(_run(ens, tokens, attention_mask=mask))
  assert out.shape == (3, 3)
  kernel, bias = _head_np(ens.head)
  for k in range(3):
    single = heads.RewardModel(dec, rngs=nnx.Rngs(0))
    single.head.kernel[...] = jnp.asarray(kernel[:, k:k + 1])
    single.head.bias[...] = jnp.asarray(bias[k:k + 1])
    np.testing.assert_allclose(out[:, k], np.asarray(_run(single, tokens, attention_mask=mask)),
                               atol=ATOL)
  # Members are independently initialised, so they disagree.
  assert np.min(np.abs(out[:, 0] - out[:, 1])) > 1e-4


def _build_reward_model(rngs: nnx.Rngs) -> heads.RewardModel:
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB, num_layers=1)
  return heads.RewardModel(decoder.Decoder(cfg, rngs=rngs, dtype=jnp.float32), rngs=rngs)


@pytest.fixture(scope="module")
def deep_ensemble():
  return nnx.jit(lambda: heads.DeepEnsemble(_build_reward_model, seeds=[11, 12]))()


def test_deep_ensemble_member_equals_individually_built_model(deep_ensemble):
  tokens, mask = _padded_batch()
  out = np.asarray(_run(deep_ensemble, tokens, attention_mask=mask))
  assert out.shape == (3, 2)
  embed = deep_ensemble.members.trunk.embed.embedding
  assert embed.shape == (2, VOCAB, 32)  # parameters stacked on a leading member axis
  for k, seed in enumerate([11, 12]):
    alone = _build_reward_model(nnx.Rngs(seed))
    # Same random draws; the jitted build may round the init scaling 1 ulp differently.
    np.testing.assert_allclose(np.asarray(embed[k]), np.asarray(alone.trunk.embed.embedding[...]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[:, k], np.asarray(_run(alone, tokens, attention_mask=mask)),
                               atol=ATOL)
    np.testing.assert_allclose(
        out[:, k], np.asarray(_run(deep_ensemble.member(k), tokens, attention_mask=mask)), atol=ATOL)
  assert np.min(np.abs(out[:, 0] - out[:, 1])) > 1e-4


def test_deep_ensemble_packed_call(deep_ensemble):
  tokens, seg_ids, positions = _pack([[np.arange(1, 4), np.arange(5, 9)]], width=8)
  out = _run(deep_ensemble, tokens, segment_ids=seg_ids, positions=positions, num_segments=2)
  assert out.shape == (1, 3, 2)
  member = deep_ensemble.member(1)
  np.testing.assert_allclose(
      np.asarray(out[..., 1]),
      np.asarray(_run(member, tokens, segment_ids=seg_ids, positions=positions, num_segments=2)),
      atol=ATOL)


def _spec_for(path: str, rules) -> P:
  for pattern, spec in rules:
    if re.search(pattern, path):
      return spec
  return P()


@pytest.mark.parametrize("forward", ["vmap", "unrolled"])
def test_deep_ensemble_sharded_over_ensemble_axis_equals_unsharded(deep_ensemble, forward):
  mesh = jax.make_mesh((2, 2, 2), ("ensemble", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = heads.ensemble_partition_rules(decoder.PARTITION_RULES + heads.PARTITION_RULES)
  graphdef, state = nnx.split(deep_ensemble)
  flat = nnx.to_flat_state(state)
  sharded_leaves = []
  for path, var in flat:
    spec = _spec_for("/".join(map(str, path)), rules)
    if path[0] == "members":
      assert spec[0] == "ensemble", path
    sharded_leaves.append((path, var.replace(
        jax.device_put(var.get_value(), NamedSharding(mesh, spec)))))
  sharded = nnx.from_flat_state(sharded_leaves)
  emb = sharded["members"]["trunk"]["embed"]["embedding"].get_value()
  assert emb.sharding.spec == P("ensemble", "tensor", "fsdp")
  assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (1, 32, 16)
  tokens, mask = _padded_batch()
  def call(state, tokens, mask):
    model = nnx.merge(graphdef, state)
    model.forward = forward
    return model(tokens, attention_mask=mask)

  np.testing.assert_allclose(np.asarray(jax.jit(call)(sharded, tokens, mask)),
                             np.asarray(_run(deep_ensemble, tokens, attention_mask=mask)), atol=ATOL)


def test_multi_objective_names_and_columns(dec):
  names = ("helpful", "harmless", "honest")
  model = heads.MultiObjectiveRewardModel(dec, names, rngs=nnx.Rngs(7))
  tokens, mask = _padded_batch()
  out = _run(model, tokens, attention_mask=mask)
  assert out.shape == (3, 3) and model.names == names
  hidden = np.asarray(_hidden(dec, tokens, mask))
  w, b = _head_np(model.head)
  expected = hidden[np.arange(3), [7, 4, 7]] @ w + b
  by_name = model.as_dict(out)
  assert list(by_name) == list(names)
  for i, name in enumerate(names):
    np.testing.assert_allclose(np.asarray(by_name[name]), expected[:, i], atol=ATOL)
  with pytest.raises(ValueError, match="unique"):
    heads.MultiObjectiveRewardModel(dec, ("a", "a"), rngs=nnx.Rngs(0))


def test_value_head_per_token_and_masked(dec):
  vm = heads.ValueModel(dec, rngs=nnx.Rngs(8))
  tokens, mask = _padded_batch()
  values = np.asarray(_run(vm, tokens, attention_mask=mask))
  assert values.shape == tokens.shape and values.dtype == np.float32
  hidden = np.asarray(_hidden(dec, tokens, mask))
  w, b = _head_np(vm.value_head)
  expected = np.where(mask > 0, hidden @ w[:, 0] + b[0], 0.0)
  np.testing.assert_allclose(values, expected, atol=ATOL)
  assert np.all(values[mask == 0] == 0.0) and np.all(values[mask > 0] != 0.0)
  packed_tokens, seg_ids, positions = _pack([[np.arange(1, 4)]], width=5)
  packed = np.asarray(_run(vm, packed_tokens, segment_ids=seg_ids, positions=positions))
  np.testing.assert_array_equal(packed[0, 3:], 0.0)
  np.testing.assert_allclose(
      packed[0, :3], np.asarray(_run(vm, packed_tokens[:, :3]))[0], atol=ATOL)


@pytest.mark.parametrize("spec,cls,extra", [
    ("reward", heads.RewardModel, None),
    ("reward_ensemble:4", heads.MultiHeadEnsemble, 4),
    ("value", heads.ValueModel, None),
    ("multi:helpful, harmless", heads.MultiObjectiveRewardModel, ("helpful", "harmless")),
])
def test_attach_head_parses_specs(dec, spec, cls, extra):
  model = heads.attach_head(dec, spec, rngs=nnx.Rngs(0))
  assert type(model) is cls and model.trunk is dec
  if cls is heads.MultiHeadEnsemble:
    assert model.num_members == extra and model.head.kernel.shape == (32, extra)
  if cls is heads.MultiObjectiveRewardModel:
    assert model.names == extra
  assert heads.attach_head(dec, None, rngs=nnx.Rngs(0)) is dec


@pytest.mark.parametrize("spec,message", [
    ("reward_ensemble:0", "K must be a positive integer"),
    ("reward_ensemble:two", "K must be a positive integer"),
    ("reward_ensemble", "K must be a positive integer"),
    ("multi:", "non-empty and unique"),
    ("multi:a,,b", "non-empty and unique"),
    ("multi:a,a", "non-empty and unique"),
    ("reward:3", "unknown head spec 'reward:3'"),
    ("critic", "unknown head spec 'critic'"),
    (3, "must be a string or None"),
])
def test_attach_head_errors_are_clear(dec, spec, message):
  with pytest.raises(ValueError, match=re.escape(message)) as info:
    heads.attach_head(dec, spec, rngs=nnx.Rngs(0))
  assert "reward_ensemble:K" in str(info.value)  # the grammar is spelled out


def test_reward_head_gradient_reaches_trunk(dec):
  rm = heads.RewardModel(dec, rngs=nnx.Rngs(9))
  tokens, mask = _padded_batch()
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(tokens, attention_mask=mask))))(rm)
  assert np.all(np.isfinite(np.asarray(grads.trunk.layers[0].attn.q_proj.kernel[...])))
  assert np.abs(np.asarray(grads.trunk.layers[0].attn.q_proj.kernel[...])).max() > 0
  np.testing.assert_allclose(  # d r / d bias = 1 per example
      float(grads.head.bias[...][0]), 3.0, atol=1e-6)


def _ensemble_value_and_grad(ensemble, forward, tokens, kwargs, weights):
  graphdef, state = nnx.split(ensemble)

  def weighted_sum(state):
    model = nnx.merge(graphdef, state)
    model.forward = forward
    return jnp.sum(model(tokens, **kwargs) * weights)

  return jax.jit(jax.value_and_grad(weighted_sum))(state)


@pytest.mark.parametrize("packed", [False, True])
def test_deep_ensemble_unrolled_forward_equals_vmapped_in_outputs_and_gradients(
    deep_ensemble, packed):
  if packed:
    tokens, seg_ids, positions = _pack([[np.arange(1, 4), np.arange(5, 9)],
                                        [np.arange(9, 16)]], width=8)
    kwargs = dict(segment_ids=seg_ids, positions=positions, num_segments=2)
    shape = (2, 3, 2)
  else:
    tokens, mask = _padded_batch()
    kwargs, shape = dict(attention_mask=mask), (3, 2)
  weights = np.random.RandomState(3).normal(size=shape).astype(np.float32)
  value, grads = _ensemble_value_and_grad(deep_ensemble, "vmap", tokens, kwargs, weights)
  value_unrolled, grads_unrolled = _ensemble_value_and_grad(
      deep_ensemble, "unrolled", tokens, kwargs, weights)
  np.testing.assert_allclose(float(value_unrolled), float(value), rtol=1e-5)
  flat, flat_unrolled = nnx.to_flat_state(grads), dict(nnx.to_flat_state(grads_unrolled))
  assert len(flat) == len(flat_unrolled)
  for path, grad in flat:
    expected = np.asarray(grad.get_value())
    if "lm_head" in path:  # kept by this test's trunk, unused by the reward head
      assert not np.any(np.asarray(flat_unrolled[path].get_value())), path
      continue
    scale = np.max(np.abs(expected))
    assert scale > 0, path
    np.testing.assert_allclose(np.asarray(flat_unrolled[path].get_value()), expected,
                               atol=1e-5 * scale, err_msg=str(path))


def test_deep_ensemble_forward_choice(deep_ensemble):
  cpu = jax.default_backend() == "cpu"
  assert deep_ensemble.forward == "auto" and deep_ensemble.unrolled() == cpu
  auto = (jax.sharding.AxisType.Auto,) * 2
  with jax.set_mesh(jax.make_mesh((2, 4), ("ensemble", "data"), axis_types=auto)):
    assert not deep_ensemble.unrolled()  # members sharded: one vmapped program
  with jax.set_mesh(jax.make_mesh((1, 8), ("ensemble", "data"), axis_types=auto)):
    assert deep_ensemble.unrolled() == cpu
  for forward in ("vmap", "unrolled"):
    model = heads.DeepEnsemble(_build_reward_model, seeds=[1], forward=forward)
    assert model.unrolled() == (forward == "unrolled")
  with pytest.raises(ValueError, match="forward must be one of"):
    heads.DeepEnsemble(_build_reward_model, seeds=[1], forward="scan")
