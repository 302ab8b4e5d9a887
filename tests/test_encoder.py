"""BERT encoder: float64 NumPy reference forward, masks, packing, sharding, pooling helpers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.special import erf

from prefjax.models import encoder
from prefjax.models import segments
from tests.numerics import check_grad

CFG = encoder.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4,
                            intermediate_size=32, max_position_embeddings=24,
                            type_vocab_size=2, layer_norm_eps=1e-12)


@pytest.fixture(scope="module")
def model():
  m = nnx.jit(lambda: encoder.Encoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32))()
  # Non-trivial norms and biases, so that a swapped or skipped one is caught.
  rng = np.random.RandomState(1)
  for path, var in nnx.iter_graph(m):
    if isinstance(var, nnx.Param) and path[-1] in ("scale", "bias"):
      var[...] = jnp.asarray(var[...] + 0.1 * rng.randn(*var.shape), jnp.float32)
  return m


_hidden = nnx.jit(lambda m, t, mask, seg, pos, tt: m.hidden_states(
    t, attention_mask=mask, segment_ids=seg, positions=pos, token_type_ids=tt))


def _run(m, tokens, mask=None, seg=None, pos=None, tt=None):
  return np.asarray(_hidden(m, tokens, mask, seg, pos, tt))


def _params(m) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.iter_graph(m) if isinstance(v, nnx.Param)}


def _np_layer_norm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_reference(params, tokens, mask, type_ids):
  """BERT forward in float64 NumPy, written from the paper's equations."""
  p = params
  n, t = tokens.shape
  eps = CFG.layer_norm_eps
  x = (p["embed/embedding"][tokens] + p["pos_embed/embedding"][np.arange(t)][None]
       + p["type_embed/embedding"][type_ids])
  x = _np_layer_norm(x, p["embed_norm/scale"], p["embed_norm/bias"], eps)
  h, dh = CFG.num_heads, CFG.head_dim
  for i in range(CFG.num_layers):
    lin = lambda y, name: y @ p[f"layers/{i}/{name}/kernel"] + p[f"layers/{i}/{name}/bias"]
    split = lambda y: y.reshape(n, t, h, dh).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(x, f"attn/{c}_proj")) for c in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(n, t, h * dh)
    x = _np_layer_norm(x + lin(attn, "attn/o_proj"), p[f"layers/{i}/attn_norm/scale"],
                       p[f"layers/{i}/attn_norm/bias"], eps)
    up = lin(x, "mlp/up_proj")
    gelu = 0.5 * up * (1.0 + erf(up / np.sqrt(2.0)))
    x = _np_layer_norm(x + lin(gelu, "mlp/down_proj"), p[f"layers/{i}/mlp_norm/scale"],
                       p[f"layers/{i}/mlp_norm/bias"], eps)
  return x


def _batch():
  rng = np.random.RandomState(2)
  tokens = rng.randint(1, CFG.vocab_size, (3, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0
  mask[2, 2:] = 0
  type_ids = np.zeros_like(tokens)
  type_ids[0, 4:] = 1
  return tokens, mask, type_ids


def test_matches_float64_numpy_reference(model):
  tokens, mask, type_ids = _batch()
  ours = _run(model, tokens, mask, tt=type_ids)
  ref = _np_reference(_params(model), tokens, mask, type_ids)
  assert ours.shape == (3, 9, CFG.hidden_size) and ours.dtype == np.float32
  real = mask > 0
  np.testing.assert_allclose(ours[real], ref[real], atol=2e-5, rtol=0)


def test_padding_content_never_reaches_real_tokens(model):
  tokens, mask, _ = _batch()
  other = np.where(mask > 0, tokens, (tokens + 7) % CFG.vocab_size)
  real = mask > 0
  np.testing.assert_array_equal(_run(model, tokens, mask)[real], _run(model, other, mask)[real])


def test_packed_segments_equal_separate_sequences(model):
  rng = np.random.RandomState(3)
  a, b = rng.randint(1, CFG.vocab_size, 5), rng.randint(1, CFG.vocab_size, 3)
  tokens = np.zeros((1, 10), np.int32)
  tokens[0, :5], tokens[0, 5:8] = a, b
  seg = np.array([[1] * 5 + [2] * 3 + [0] * 2], np.int32)
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]], np.int32)
  packed = _run(model, tokens, seg=seg, pos=pos)
  separate = _run(model, np.stack([np.pad(a, (0, 5)), np.pad(b, (0, 7))]).astype(np.int32),
                  np.array([[1] * 5 + [0] * 5, [1] * 3 + [0] * 7], np.int32))
  np.testing.assert_allclose(packed[0, :5], separate[0, :5], atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:8], separate[1, :3], atol=1e-5)
  assert np.all(np.isfinite(packed))  # padding rows (segment 0) stay finite
  np.testing.assert_array_equal(np.asarray(segments.positions_in_segments(seg)), pos)


def test_token_types_change_the_output(model):
  tokens, mask, type_ids = _batch()
  with_types = _run(model, tokens, mask, tt=type_ids)
  without = _run(model, tokens, mask)
  assert np.abs(with_types[0] - without[0]).max() > 1e-3
  np.testing.assert_array_equal(with_types[1], without[1])  # row 1 has no type-1 tokens


def _spec_for(path: str) -> P:
  for pattern, spec in encoder.PARTITION_RULES:
    if re.search(pattern, path):
      return spec
  return P()


def test_sharded_forward_equals_unsharded(model):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  placed = []
  sharded_paths = []
  for path, var in flat:
    name = "/".join(map(str, path))
    spec = _spec_for(name)
    if spec != P():
      sharded_paths.append(name)
    placed.append((path, var.replace(jax.device_put(var.get_value(),
                                                    NamedSharding(mesh, spec)))))
  # Every matrix of every layer is split; only norms/biases of o/down stay whole.
  assert sum("layers/1/" in n and n.endswith("kernel") for n in sharded_paths) == 6
  assert "embed/embedding" in sharded_paths
  tokens, mask, type_ids = _batch()
  data = NamedSharding(mesh, P(("data", "fsdp")))
  tokens4 = np.concatenate([tokens, tokens[:1]])
  mask4 = np.concatenate([mask, mask[:1]])
  fwd = jax.jit(lambda s, t, m: nnx.merge(graphdef, s).hidden_states(t, attention_mask=m))
  sharded = fwd(nnx.from_flat_state(placed), jax.device_put(tokens4, data),
                jax.device_put(mask4, data))
  np.testing.assert_allclose(np.asarray(sharded), _run(model, tokens4, mask4), atol=1e-5)


def test_sentence_embedding_is_normalised_mean(model):
  tokens, mask, _ = _batch()
  emb = np.asarray(encoder.sentence_embedding(model, tokens, mask))
  hidden = _run(model, tokens, mask).astype(np.float64)
  mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(emb, mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                             atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_pooling_helper_gradients():
  rng = np.random.RandomState(4)
  hidden = rng.randn(2, 3, 4)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float64)
  check_grad(lambda h: encoder.l2_normalize(encoder.mean_pool(h, mask)) * jnp.arange(4.0),
             [hidden], argnum=0)


def test_bfloat16_compute_stays_close(model):
  graphdef, state = nnx.split(model)
  bf16 = nnx.eval_shape(lambda: encoder.Encoder(CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  nnx.update(bf16, state)  # float32 parameters, bfloat16 compute
  tokens, mask, _ = _batch()
  out = _hidden(bf16, tokens, mask, None, None, None)
  assert out.dtype == jnp.bfloat16
  ref = _run(model, tokens, mask)
  real = mask > 0
  np.testing.assert_allclose(np.asarray(out, np.float32)[real], ref[real], atol=0.1)


def test_config_presets():
  assert encoder.EncoderConfig.tiny(num_layers=1).num_layers == 1
  minilm = encoder.EncoderConfig.minilm_l6()
  assert (minilm.hidden_size, minilm.num_layers, minilm.num_heads, minilm.vocab_size) == (
      384, 6, 12, 30522)
  assert CFG.replace(num_layers=3).num_layers == 3


def test_config_from_and_to_hf_dict():
  hf = CFG.to_hf_dict()
  assert encoder.EncoderConfig.from_hf_dict(hf) == CFG
  with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
    encoder.EncoderConfig.from_hf_dict({**hf, "position_embedding_type": "relative_key"})
  for flag in ("is_decoder", "add_cross_attention"):  # a causal mask HF would apply
    with pytest.raises(ValueError, match=f"unsupported BERT config {flag}=true"):
      encoder.EncoderConfig.from_hf_dict({**hf, flag: True})
  assert encoder.EncoderConfig.from_hf_dict({**hf, "is_decoder": False}) == CFG
  with pytest.raises(ValueError, match="supports model_type bert, roberta, xlm-roberta, "
                                       "distilbert; got 'deberta-v2'"):
    encoder.EncoderConfig.from_hf_dict({**hf, "model_type": "deberta-v2"})
  for model_type in encoder.MODEL_TYPES:  # each family's config.json round-trips
    config = CFG.replace(model_type=model_type, pooler="relu",
                         type_vocab_size=0 if model_type == "distilbert" else 2)
    assert encoder.EncoderConfig.from_hf_dict(config.to_hf_dict()) == config
  with pytest.raises(ValueError, match="sinusoidal_pos_embds=true"):
    encoder.EncoderConfig.from_hf_dict({**CFG.replace(model_type="distilbert", type_vocab_size=0)
                                        .to_hf_dict(), "sinusoidal_pos_embds": True})
  with pytest.raises(ValueError, match="a DistilBERT encoder has no token types"):
    encoder.EncoderConfig(model_type="distilbert")
  with pytest.raises(ValueError, match="pooler 'gelu' is not one of"):
    encoder.EncoderConfig(pooler="gelu")
  with pytest.raises(ValueError, match="hidden_size=10 is not divisible by num_heads=4"):
    encoder.EncoderConfig(hidden_size=10, num_heads=4)
  with pytest.raises(ValueError, match="unsupported hidden_act 'mish'"):
    encoder.EncoderConfig(hidden_act="mish")


def test_too_long_input_is_rejected_and_a_longer_packed_row_is_not(model):
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=24"):
    model.hidden_states(np.ones((1, 25), np.int32))
  # 30 slots, two 15-token segments: positions restart, and each equals its own sequence.
  rng = np.random.RandomState(4)
  a, b = rng.randint(1, CFG.vocab_size, 15), rng.randint(1, CFG.vocab_size, 15)
  seg = np.array([[1] * 15 + [2] * 15], np.int32)
  packed = np.asarray(model.hidden_states(np.concatenate([a, b])[None].astype(np.int32),
                                          segment_ids=seg))
  alone = np.asarray(model.hidden_states(b[None].astype(np.int32)))
  np.testing.assert_allclose(packed[0, 15:], alone[0], atol=1e-5)


def test_a_batch_padded_past_the_position_table_equals_its_rows_unpadded(model):
  """A pipeline's pad_to_multiple may pad rows past the table: padding reads position 0
  (a padded row read past it gave NaN, which attention spread to the real tokens)."""
  rng = np.random.RandomState(5)
  tokens = rng.randint(1, CFG.vocab_size, (2, 30)).astype(np.int32)
  mask = np.zeros_like(tokens)
  mask[0, :20], mask[1, :7] = 1, 1
  padded = np.asarray(model.hidden_states(tokens, attention_mask=mask))
  for row, length in enumerate((20, 7)):
    alone = np.asarray(model.hidden_states(tokens[row:row + 1, :length]))
    np.testing.assert_allclose(padded[row, :length], alone[0], atol=1e-5)
  assert np.isfinite(padded).all()


@pytest.mark.parametrize("settings, packed", [
    (dict(remat=True), False), (dict(scan_layers=True), True),
    (dict(remat="attention", scan_layers=True), False), (dict(remat="dots"), True)])
def test_remat_and_scanned_layers_give_the_same_gradients(model, settings, packed):
  tokens, mask, type_ids = _batch()
  kwargs = dict(attention_mask=mask, token_type_ids=type_ids)
  if packed:
    kwargs = dict(segment_ids=np.array([[1] * 4 + [2] * 5, [1] * 6 + [0] * 3, [1, 1] + [0] * 7]))
  weights = jax.random.normal(jax.random.key(0), tokens.shape + (CFG.hidden_size,))

  @jax.jit
  def grads(m):
    graphdef, state = nnx.split(m)
    return jax.grad(lambda s: jnp.sum(
        weights * nnx.merge(graphdef, s).hidden_states(tokens, **kwargs)))(state)

  changed = nnx.clone(model)
  for flag, value in settings.items():
    setattr(changed, flag, value)
  jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(changed), s).hidden_states(
      tokens, **kwargs))(nnx.state(changed)))
  for flag, mark in {"remat": "remat", "scan_layers": "scan["}.items():
    assert (mark in jaxpr) == (flag in settings)
  plain, other = grads(model), grads(changed)
  # Recomputation reorders float32 sums; the key bias's gradient is zero up to rounding
  # (softmax ignores a shift shared by all keys), hence a tolerance from the largest leaf.
  scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(plain))
  assert scale > 0.1
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(other)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale)


def test_scanned_remat_policies_need_less_memory_in_the_order_of_what_they_keep():
  config = encoder.EncoderConfig.tiny(num_layers=4, hidden_size=64, intermediate_size=128,
                                      max_position_embeddings=128)
  tokens = jnp.ones((4, 128), jnp.int32)
  temp = {}
  for remat in ("none", "full", "attention", "dots"):
    m = encoder.Encoder(config, rngs=nnx.Rngs(0), remat=remat, scan_layers=True)
    graphdef, state = nnx.split(m)
    grad = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens) ** 2))
    temp[remat] = jax.jit(grad).lower(state).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] <= temp["attention"] < temp["dots"] < temp["none"], temp
  assert temp["full"] < 0.5 * temp["none"], temp
  with pytest.raises(ValueError, match=r"one of \['attention', 'dots', 'full'\]; got 'half'"):
    encoder.Encoder(config, rngs=nnx.Rngs(0), remat="half")
