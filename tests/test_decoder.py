"""Decoder vs a float64 NumPy reference; padded, packed and cached paths; sharding rules."""

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prefjax.models import decoder as dec
from prefjax.models import segments
from prefjax.models import stack

CONFIGS = {
    "llama": dec.DecoderConfig.tiny_llama(),
    "gpt2": dec.DecoderConfig.tiny_gpt2(),
    "llama_tied_bias": dec.DecoderConfig.tiny_llama(tie_embeddings=True, attention_bias=True,
                                                    num_kv_heads=1, rope_theta=500.0),
}


def random_decoder(config: dec.DecoderConfig, seed: int = 0,
                   dtype=jnp.float32) -> dec.Decoder:
  """A decoder whose every parameter (norm scales and biases too) is random.

  Filled from NumPy on top of ``nnx.eval_shape``: no JAX init program to compile.
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: dec.Decoder(config, rngs=nnx.Rngs(0), dtype=dtype)))
  flat = nnx.to_flat_state(state)
  for key, var in flat:
    shape, name = var.shape, str(key[-1])
    if name == "scale":
      value = 1.0 + 0.3 * rng.standard_normal(shape)
    elif name == "bias":
      value = 0.3 * rng.standard_normal(shape)
    elif name == "embedding":
      value = rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    var.set_value(jnp.asarray(value, jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.cache
def make_model(name: str) -> dec.Decoder:
  """Cached tiny random model: tests must not modify it."""
  return random_decoder(CONFIGS[name])


@jax.jit
def forward(model, tokens, attention_mask=None, segment_ids=None, positions=None):
  return model(tokens, attention_mask=attention_mask, segment_ids=segment_ids,
               positions=positions)


@jax.jit
def extend(model, tokens, cache, attention_mask, output_kernel=None):
  return model.extend(tokens, cache, attention_mask=attention_mask,
                      output_kernel=output_kernel)


def reference(name, tokens):
  model = make_model(name)
  return np_forward(flat_params(model), model.config, np.asarray(tokens))


def flat_params(model: dec.Decoder) -> dict[str, np.ndarray]:
  return {"/".join(map(str, k)): np.asarray(v[...], np.float64)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --- float64 NumPy reference ------------------------------------------------

def np_norm(x, p, prefix, cfg):
  if cfg.norm == "rms":
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p[f"{prefix}/scale"]
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + cfg.norm_eps) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]


def np_linear(x, p, prefix):
  y = x @ p[f"{prefix}/kernel"]
  return y + p[f"{prefix}/bias"] if f"{prefix}/bias" in p else y


def np_rope(x, theta):
  """x [T, H, D]; HF rotate-half RoPE at positions 0..T-1."""
  t, _, d = x.shape
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv[None]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * cos + rot * sin


def np_forward(p, cfg, tokens):
  """Logits of ONE unpadded sequence ``tokens [T]`` in float64."""
  t = len(tokens)
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = p["embed/embedding"][tokens]
  if cfg.position == "learned":
    x = x + p["pos_embed/embedding"][:t]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    pre = f"layers/{i}"
    y = np_norm(x, p, f"{pre}/input_norm", cfg)
    q = np_linear(y, p, f"{pre}/attn/q_proj").reshape(t, h, hd)
    k = np_linear(y, p, f"{pre}/attn/k_proj").reshape(t, kv, hd)
    v = np_linear(y, p, f"{pre}/attn/v_proj").reshape(t, kv, hd)
    if cfg.position == "rope":
      q, k = np_rope(q, cfg.rope_theta), np_rope(k, cfg.rope_theta)
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(causal[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", a, v).reshape(t, h * hd)
    x = x + np_linear(o, p, f"{pre}/attn/o_proj")
    y = np_norm(x, p, f"{pre}/post_attn_norm", cfg)
    if cfg.mlp == "swiglu":
      g = np_linear(y, p, f"{pre}/mlp/gate_proj")
      m = g / (1 + np.exp(-g)) * np_linear(y, p, f"{pre}/mlp/up_proj")
    else:
      u = np_linear(y, p, f"{pre}/mlp/up_proj")
      m = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
    x = x + np_linear(m, p, f"{pre}/mlp/down_proj")
  x = np_norm(x, p, "final_norm", cfg)
  if cfg.tie_embeddings:
    return x @ p["embed/embedding"].T
  return x @ p["lm_head/kernel"]


# --- tests ------------------------------------------------------------------

SEQS = [[5, 9, 1, 33, 2], [7, 7, 40, 12, 3, 60, 11], [21, 4, 8]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_float64_numpy_reference(name):
  model = make_model(name)
  params = flat_params(model)
  tokens = np.array(SEQS[1], np.int32)
  got = np.asarray(forward(model, jnp.asarray(tokens)[None]))[0]
  want = np_forward(params, model.config, tokens)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_parameter_paths_and_shapes():
  params = flat_params(make_model("llama"))
  cfg = CONFIGS["llama"]
  assert params["layers/1/attn/k_proj/kernel"].shape == (cfg.hidden_size,
                                                         cfg.num_kv_heads * cfg.head_dim)
  assert params["layers/0/mlp/gate_proj/kernel"].shape == (cfg.hidden_size,
                                                           cfg.intermediate_size)
  assert params["lm_head/kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
  assert "pos_embed/embedding" not in params
  gpt2 = flat_params(make_model("gpt2"))
  assert "lm_head/kernel" not in gpt2 and "layers/0/mlp/gate_proj/kernel" not in gpt2
  assert gpt2["layers/0/input_norm/bias"].shape == (32,)


def pad(seqs, side, length=9, pad_id=0):
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
    tokens[i, sl], mask[i, sl] = s, 1
  return tokens, mask


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_unpadded_sequences(name, side):
  model = make_model(name)
  tokens, mask = pad(SEQS, side, pad_id=63)
  logits = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  assert np.isfinite(logits).all()
  for i, s in enumerate(SEQS):
    np.testing.assert_allclose(logits[i][mask[i] == 1], reference(name, s),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("explicit_positions", [True, False])
def test_packed_rows_equal_unpadded_sequences(name, explicit_positions):
  model = make_model(name)
  length = 12
  rows = [[SEQS[0], SEQS[2]], [SEQS[1], [9, 9]]]
  tokens = np.zeros((2, length), np.int32)
  segment_ids = np.zeros((2, length), np.int32)
  positions = np.zeros((2, length), np.int32)
  for r, row in enumerate(rows):
    start = 0
    for sid, s in enumerate(row, 1):
      tokens[r, start:start + len(s)] = s
      segment_ids[r, start:start + len(s)] = sid
      positions[r, start:start + len(s)] = np.arange(len(s))
      start += len(s)
  logits = np.asarray(forward(
      model, jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids),
      positions=jnp.asarray(positions) if explicit_positions else None))
  assert np.isfinite(logits).all()
  for r, row in enumerate(rows):
    for sid, s in enumerate(row, 1):
      np.testing.assert_allclose(logits[r][segment_ids[r] == sid], reference(name, s),
                                 atol=1e-4, rtol=1e-4)


def test_positions_in_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0]])
  want = [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 1, 2, 3, 4, 5, 0]]  # padding at 0, as packed
  np.testing.assert_array_equal(segments.positions_in_segments(seg), want)


def test_a_packed_row_s_long_padding_tail_stays_within_learned_positions():
  """Default positions counted on through a padding tail: past a 16-slot table they read
  NaN embeddings, which attention's zero weights spread to the real tokens (a review)."""
  cfg = dec.DecoderConfig.tiny_gpt2(vocab_size=61, max_position_embeddings=16)
  model = dec.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  tokens = np.random.RandomState(0).randint(3, 61, (1, 40)).astype(np.int32)
  seg = np.array([[1] * 6 + [2] * 5 + [0] * 29], np.int32)
  packed = np.asarray(model(jnp.asarray(tokens), segment_ids=jnp.asarray(seg)))
  assert np.all(np.isfinite(packed))
  alone = np.asarray(model(jnp.asarray(tokens[:, 6:11])))
  np.testing.assert_allclose(packed[0, 6:11], alone[0], atol=1e-5)


@pytest.mark.parametrize("name, grow", [("llama", False), ("gpt2", False), ("gpt2", True)])
def test_cache_extend_matches_full_forward(name, grow):
  """Left-padded prefill, then single tokens (one row masked), equals a full forward;
  also when the cache grows between steps and the output kernel is passed in
  (``sampling.generate``'s decoding loop)."""
  model = make_model(name)
  tokens, mask = pad(SEQS, "left", length=7, pad_id=63)
  cont = np.array([[3, 4, 5], [6, 7, 8], [9, 10, 11]], np.int32)
  cont_mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 0]], np.int32)  # row 2 "finished"
  cache = model.init_cache(3, 8 if grow else 10)
  logits, cache = extend(model, jnp.asarray(tokens), cache, jnp.asarray(mask))
  kernel = jnp.asarray(np.asarray(model.output_kernel())) if grow else None
  step_logits = []
  for j in range(3):
    if grow and j == 1:
      cache = cache.grown(10)
    lg, cache = extend(model, jnp.asarray(cont[:, j:j + 1]), cache,
                       jnp.asarray(cont_mask[:, j:j + 1]), kernel)
    step_logits.append(np.asarray(lg[:, 0]))
  assert int(cache.index) == 10
  full_tokens = np.concatenate([tokens, cont], 1)
  full_mask = np.concatenate([mask, cont_mask], 1)
  full = np.asarray(forward(model, jnp.asarray(full_tokens), jnp.asarray(full_mask)))
  np.testing.assert_allclose(np.asarray(logits)[mask == 1], full[:, :7][mask == 1],
                             atol=2e-5, rtol=1e-5)
  for j in range(3):
    live = cont_mask[:, j] == 1
    np.testing.assert_allclose(step_logits[j][live], full[live, 7 + j], atol=2e-5, rtol=1e-5)


def test_extending_past_the_last_cache_slot_gives_nan_logits():
  """The write was clamped onto the last slot and the logits silently wrong (0.288 off in a
  helper's check); the slot index is traced, so the step now returns NaN logits."""
  model = make_model("llama")
  tokens, mask = pad(SEQS, "left", length=7, pad_id=63)
  logits, cache = extend(model, jnp.asarray(tokens), model.init_cache(3, 8), jnp.asarray(mask))
  assert np.isfinite(np.asarray(logits)).all()
  one = jnp.ones((3, 1), jnp.int32)
  last, cache = extend(model, 5 * one, cache, one)  # slot 7, the last: fine
  assert np.isfinite(np.asarray(last)).all()
  past, cache = extend(model, 5 * one, cache, one)
  assert np.isnan(np.asarray(past)).all() and int(cache.index) == 9


def test_extend_runs_under_x64():
  """Its slot indices were a Python 0 beside an int32 index, which x64 refuses."""
  tokens, mask = pad(SEQS, "left", length=7, pad_id=63)
  def logits_of_extend():
    model = make_model("llama")
    return np.asarray(extend(model, jnp.asarray(tokens), model.init_cache(3, 8),
                             jnp.asarray(mask))[0])
  want = logits_of_extend()
  with jax.enable_x64(True):
    got = logits_of_extend()
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prefill_equals_extend_on_an_empty_cache(name):
  """``prefill`` (the training kernel over the prompts) gives ``extend``'s logits and
  cache, and decoding on from it equals a full forward."""
  model = make_model(name)
  tokens, mask = (jnp.asarray(x) for x in pad(SEQS, "left", length=7, pad_id=63))
  prefill = jax.jit(lambda m, t, a: m.prefill(t, 9, attention_mask=a))
  logits, cache = prefill(model, tokens, mask)
  want_logits, want = extend(model, tokens, model.init_cache(3, 9), mask)
  assert logits.shape == (3, 1, model.config.vocab_size) and int(cache.index) == 7
  np.testing.assert_allclose(logits[:, 0], want_logits[:, -1], atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.segments, want.segments)
  real = np.asarray(want.segments, bool)[:, None, :, None]
  for got, expected in zip(cache.keys + cache.values, want.keys + want.values):
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, expected, 0), atol=2e-5)
  step, _ = extend(model, jnp.full((3, 1), 5, jnp.int32), cache, jnp.ones((3, 1), jnp.int32))
  full = forward(model, jnp.concatenate([tokens, jnp.full((3, 1), 5, jnp.int32)], 1),
                 jnp.concatenate([mask, jnp.ones((3, 1), jnp.int32)], 1))
  np.testing.assert_allclose(step[:, 0], full[:, -1], atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="a cache of 6 slots cannot hold 7 prompt tokens"):
    model.prefill(tokens, 6, attention_mask=mask)


def test_partition_rules_shard_and_match_unsharded():
  model = make_model("llama")
  params = flat_params(model)
  specs = {}
  for path in params:
    specs[path] = next((spec for rx, spec in dec.PARTITION_RULES if re.search(rx, path)), P())
  assert specs["embed/embedding"] == P("tensor", "fsdp")
  assert specs["layers/0/attn/q_proj/kernel"] == P("fsdp", "tensor")
  assert specs["layers/1/attn/o_proj/kernel"] == P("tensor", "fsdp")
  assert specs["layers/1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
  assert specs["layers/0/input_norm/scale"] == P()

  tokens, mask = pad(SEQS, "right")
  want = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  graphdef, state = nnx.split(nnx.clone(model))
  flat = nnx.to_flat_state(state)
  for key, var in flat:
    spec = specs["/".join(map(str, key))]
    var.set_value(jax.device_put(var[...], NamedSharding(mesh, spec)))
  sharded = nnx.merge(graphdef, nnx.from_flat_state(flat))
  q = sharded.layers[0].attn.q_proj.kernel[...]
  assert len(q.sharding.device_set) == 8 and q.sharding.spec == P("fsdp", "tensor")
  got = forward(sharded, jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
  sharded.scan_layers = True  # the blocks' parameters stacked inside the program
  got = forward(sharded, jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_bfloat16_compute_returns_float32_logits_close_to_float32():
  model = make_model("llama")
  bf16 = random_decoder(CONFIGS["llama"], dtype=jnp.bfloat16)
  tokens = jnp.asarray([SEQS[1]], jnp.int32)
  got = forward(bf16, tokens)
  assert got.dtype == jnp.float32
  want = np.asarray(forward(model, tokens))
  err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  assert 0 < err < 0.05


def test_default_dtype_is_float32_on_cpu():
  abstract = nnx.eval_shape(lambda: dec.Decoder(CONFIGS["gpt2"], rngs=nnx.Rngs(0)))
  assert abstract.dtype == jnp.float32


@pytest.mark.parametrize("overrides, message", [
    (dict(norm="batch"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(position="alibi"), "position"),
])
def test_bad_config_raises(overrides, message):
  with pytest.raises(ValueError, match=message):
    nnx.eval_shape(lambda: dec.Decoder(dec.DecoderConfig.tiny_llama(**overrides),
                                       rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name, settings, packed", [
    ("gpt2", dict(remat=True), False), ("gpt2", dict(scan_layers=True), False),
    ("llama", dict(scan_layers=True), True), ("llama", dict(remat=True, scan_layers=True), True),
    ("llama", dict(remat="dots"), False), ("llama", dict(remat="attention"), True),
    ("llama", dict(remat="attention", scan_layers=True), False)])
def test_remat_and_scanned_layers_give_the_same_gradients(name, settings, packed):
  model = make_model(name)
  tokens = jnp.asarray([SEQS[1]], jnp.int32)
  kwargs = dict(segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2, 0]])) if packed else {}
  weights = jax.random.normal(jax.random.key(0), (1, 7, CONFIGS[name].vocab_size))

  @jax.jit
  def grads(m):
    graphdef, state = nnx.split(m)
    return jax.grad(lambda s: jnp.sum(weights * nnx.merge(graphdef, s)(tokens, **kwargs)))(
        state)

  changed = nnx.clone(model)
  for flag, value in settings.items():
    setattr(changed, flag, value)
  jaxpr = lambda m: str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(m), s)(
      tokens, **kwargs))(nnx.state(m)))
  marks = {"remat": "remat", "scan_layers": "scan["}
  for flag in settings:
    assert marks[flag] in jaxpr(changed) and marks[flag] not in jaxpr(model)
  plain, other = grads(model), grads(changed)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(other)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(plain)) > 0


def _grad_of_sum(model, tokens):
  graphdef, state = nnx.split(model)
  return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens) ** 2))


def test_remat_policies_keep_what_they_name():
  """Scanned blocks (where XLA CPU recomputes one block at a time): each policy's step
  needs less memory than keeping everything, in the order of what it keeps, and the
  "attention" policy's backward does not rerun the attention kernel's forward."""
  config = dec.DecoderConfig.tiny_llama(num_layers=4, vocab_size=64)
  tokens = jnp.zeros((4, 256), jnp.int32)
  temp, exps = {}, {}
  for remat in ("none", "full", "attention", "dots"):
    model = dec.Decoder(config, rngs=nnx.Rngs(0), remat=remat, scan_layers=True)
    grad = _grad_of_sum(model, tokens)
    state = nnx.state(model)
    temp[remat] = jax.jit(grad).lower(state).compile().memory_analysis().temp_size_in_bytes
    exps[remat] = str(jax.make_jaxpr(grad)(state)).count(" exp ")
  assert temp["full"] <= temp["attention"] < temp["dots"] < temp["none"], temp
  assert temp["full"] < 0.5 * temp["none"], temp
  # The kernel's exps (one per query block in the scanned block's forward, one per block
  # in its backward) and, when the forward is recomputed, the forward's again.
  assert exps["none"] == exps["attention"] < exps["full"] == exps["dots"], exps


def test_remat_names_a_policy():
  with pytest.raises(ValueError, match=r"one of \['attention', 'dots', 'full'\]; got 'some'"):
    dec.Decoder(dec.DecoderConfig.tiny_llama(), rngs=nnx.Rngs(0), remat="some")
  assert [stack.remat_policy(r) for r in (False, "none", "False", True, "True", "full", "dots")
          ] == [None, None, None, "full", "full", "full", "dots"]


@pytest.mark.parametrize("offset", [0, 5])  # the CPU conditional's predicate false, true
def test_rope_from_materialized_tables_matches_float64_reference(offset):
  from prefjax.models import layers
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
  positions = np.tile(np.arange(16, dtype=np.int32) + offset, (2, 1))
  got = jax.jit(lambda x, p: layers.rope(x, layers.materialized_rope_tables(p, 8, 100.0)))(
      x, positions)
  want = np.stack([np_rope(np.pad(row.astype(np.float64), ((offset, 0), (0, 0), (0, 0))),
                           100.0)[offset:] for row in x])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_output_kernel_is_the_tied_embedding_or_the_head():
  tied = make_model("gpt2")
  np.testing.assert_array_equal(tied.output_kernel(), np.asarray(tied.embed.embedding[...]).T)
  untied = random_decoder(CONFIGS["llama"])
  np.testing.assert_array_equal(untied.output_kernel(), untied.lm_head.kernel[...])
  untied.drop_output_head()
  with pytest.raises(ValueError, match="no output head"):
    untied.output_kernel()


def test_model_config_flags_reach_the_trunk():
  from prefjax import experiment
  cfg = dict(arch="decoder", preset="tiny_llama", overrides=dict(num_layers=2),
             remat=True, scan_layers=True)
  model = nnx.eval_shape(lambda: experiment.make_model(cfg, vocab_size=64, seed=0))
  assert model.remat and model.scan_layers
  model = nnx.eval_shape(lambda: experiment.make_model(
      {**cfg, "remat": "attention"}, vocab_size=64, seed=0))
  assert model.remat == "attention"
  with pytest.raises(ValueError, match="remat must be True, False, 'none' or one of"):
    experiment.make_model({**cfg, "remat": "dot"}, vocab_size=64, seed=0)
  encoder = nnx.eval_shape(lambda: experiment.make_model(
      dict(arch="encoder", preset="tiny", remat="dots", scan_layers=True), vocab_size=64,
      seed=0))
  assert (encoder.remat, encoder.scan_layers) == ("dots", True)


def test_a_trunk_without_a_switch_fails_clearly(monkeypatch):
  from prefjax import experiment
  monkeypatch.setattr(experiment, "_random_trunk", lambda *args: nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="model.scan_layers=True: Linear has no scan_layers option"):
    experiment.make_model(dict(arch="decoder", scan_layers=True), vocab_size=64, seed=0)


def test_remat_of_unrolled_blocks_warns_on_cpu(caplog):
  from prefjax import experiment
  cfg = dict(arch="decoder", preset="tiny_llama", overrides=dict(num_layers=2), remat="full")
  for scan_layers in (False, True):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      nnx.eval_shape(lambda: experiment.make_model({**cfg, "scan_layers": scan_layers},
                                                   vocab_size=64, seed=0))
    warned = [r.getMessage() for r in caplog.records if "without model.scan_layers" in
              r.getMessage()]
    assert len(warned) == (0 if scan_layers else 1), warned


def test_config_sets_how_a_deep_ensemble_runs_its_members():
  from prefjax import experiment
  cfg = dict(arch="decoder", preset="tiny_llama", overrides=dict(num_layers=1),
             head="reward_ensemble:2", ensemble="deep")
  build = lambda **extra: nnx.eval_shape(
      lambda: experiment.make_model({**cfg, **extra}, vocab_size=64, seed=0))
  assert build().forward == "auto"
  assert build(ensemble_forward="vmap").forward == "vmap"
  with pytest.raises(ValueError, match="model.ensemble_forward must be one of"):
    build(ensemble_forward="scan")
