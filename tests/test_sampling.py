"""KV-cache generation vs no-cache decoding, filters, log-probs, sharding, compile count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from prefjax import parallel
from prefjax.models import decoder as dec
from prefjax.models import sampling

CONFIG = dec.DecoderConfig.tiny_llama(vocab_size=48, num_layers=2)
PROMPTS = [[5, 9, 1, 33, 2], [7, 7, 40, 12, 3, 6, 11], [21, 4], [8, 30, 17]]
PAD = 0
NEW = 6


@functools.cache
def model() -> dec.Decoder:
  """Tiny Llama with random weights filled from NumPy (no JAX init program to compile)."""
  rng = np.random.default_rng(0)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: dec.Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)))
  flat = nnx.to_flat_state(state)
  for key, var in flat:
    if str(key[-1]) == "scale":
      value = 1.0 + 0.3 * rng.standard_normal(var.shape)
    elif str(key[-1]) == "embedding":
      value = rng.standard_normal(var.shape)
    else:
      value = rng.standard_normal(var.shape) / np.sqrt(var.shape[0])
    var.set_value(jnp.asarray(value, jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@jax.jit
def forward(m, tokens, attention_mask):
  return m(tokens, attention_mask=attention_mask)


sequence_logps = jax.jit(sampling.sequence_logps, static_argnames="num_segments")


def left_pad(prompts, length=7):
  tokens = np.full((len(prompts), length), PAD, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):], mask[i, length - len(p):] = p, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def greedy_without_cache(prompts, steps, eos_id=None, *, min_gap=1e-3):
  """Reference: re-run the full forward each step on a right-padded buffer, take argmax.

  Each argmax must lead the runner-up by ``min_gap`` (ten times the 1e-4 to which the tests
  compare log-probs; this fixture's smallest lead is 0.0023), so that another program's
  greedy tokens (cached, sharded) equal these on any CPU, not only by luck of round-off."""
  length = max(map(len, prompts)) + steps
  buf = np.full((len(prompts), length), PAD, np.int32)
  lens = np.array([len(p) for p in prompts])
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  out = np.full((len(prompts), steps), PAD, np.int32)
  logps = np.zeros((len(prompts), steps), np.float32)
  mask = np.zeros((len(prompts), steps), np.int32)
  done = np.zeros(len(prompts), bool)
  for step in range(steps):
    attn = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    logits = np.asarray(forward(model(), jnp.asarray(buf), jnp.asarray(attn)), np.float64)
    last = logits[np.arange(len(prompts)), lens - 1]
    for i in np.flatnonzero(~done):
      tok = int(np.argmax(last[i]))
      runner_up, best = np.partition(last[i], -2)[-2:]
      assert best - runner_up > min_gap, f"row {i} step {step}: a near-tie, {best - runner_up:.2g}"
      out[i, step], mask[i, step] = tok, 1
      logps[i, step] = last[i, tok] - np.log(np.exp(last[i] - last[i].max()).sum()) - last[i].max()
      buf[i, lens[i]] = tok
      lens[i] += 1
      done[i] = eos_id is not None and tok == eos_id
  return out, logps, mask


def run(prompts=PROMPTS, **kw):
  tokens, mask = left_pad(prompts)
  kw = {"rng": jax.random.key(0), "max_new_tokens": NEW, "pad_id": PAD, **kw}
  return jax.tree.map(np.asarray, sampling.generate(model(), tokens, mask, **kw))


def assert_same_generation(gen, want, *, atol):
  """``gen`` (a ``Generation``) against ``want = (tokens, logps, mask)``: tokens and mask
  equal, log-probs within ``atol``."""
  want_tokens, want_logps, want_mask = want
  np.testing.assert_array_equal(np.asarray(gen.tokens), want_tokens)
  np.testing.assert_array_equal(np.asarray(gen.mask), want_mask)
  np.testing.assert_allclose(np.asarray(gen.logps), want_logps, atol=atol)


@pytest.mark.parametrize("phases", [1, 3, NEW + 2])
def test_greedy_cached_generation_equals_uncached_argmax(phases):
  gen = run(temperature=0.0, cache_phases=phases)
  assert_same_generation(gen, greedy_without_cache(PROMPTS, NEW), atol=1e-4)
  assert len({tuple(r) for r in gen.tokens}) > 1  # rows really differ


def test_one_prompt_greedy_generation_equals_uncached_argmax():
  """Batch 1: each decoding step is one query (``layers.cached_attention``'s own path on CPU)."""
  prompts = [PROMPTS[1]]
  gen = run(prompts, temperature=0.0)
  assert_same_generation(gen, greedy_without_cache(prompts, NEW), atol=1e-4)


@pytest.mark.parametrize("phases", [1, 2])
def test_eos_stops_rows_and_pads_after_it(phases):
  free = run(temperature=0.0)
  eos = int(free.tokens[0, 2])
  assert eos not in free.tokens[0, :2]
  gen = run(temperature=0.0, eos_id=eos, cache_phases=phases)
  assert_same_generation(gen, greedy_without_cache(PROMPTS, NEW, eos_id=eos), atol=1e-4)
  np.testing.assert_array_equal(gen.mask[0], [1, 1, 1, 0, 0, 0])  # EOS itself kept
  np.testing.assert_array_equal(gen.tokens[0, 3:], PAD)
  assert (gen.logps[0, 3:] == 0).all()


@pytest.mark.parametrize("phases", [1, 3])
def test_all_rows_finish_at_their_first_token(phases):
  first = run(temperature=0.0).tokens[0, 0]
  gen = run([PROMPTS[0]] * 4, temperature=0.0, eos_id=int(first), cache_phases=phases)
  np.testing.assert_array_equal(gen.mask, [[1, 0, 0, 0, 0, 0]] * 4)
  np.testing.assert_array_equal(gen.tokens[:, 0], first)
  np.testing.assert_array_equal(gen.tokens[:, 1:], PAD)


@pytest.mark.parametrize("phases", [1, 3])
def test_any_of_several_stop_ids_ends_a_row(phases):
  """A chat model ends its turn with a token besides EOS (Gemma's ``<end_of_turn>``):
  each row stops at the first of the ids it emits, and a row that emits none runs on."""
  free = run(temperature=0.0)
  first_stop, second_stop = int(free.tokens[0, 1]), int(free.tokens[1, 3])
  assert first_stop not in free.tokens[0, :1] and second_stop not in free.tokens[1, :3]
  gen = run(temperature=0.0, eos_id=(second_stop, first_stop), cache_phases=phases)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(np.isin(free.tokens[row], [first_stop, second_stop]))
    length = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(gen.mask[row], np.arange(NEW) < length)
    np.testing.assert_array_equal(gen.tokens[row, :length], free.tokens[row, :length])
    np.testing.assert_array_equal(gen.tokens[row, length:], PAD)
  assert gen.mask[0].sum() == 2 and gen.mask[1].sum() <= 4
  np.testing.assert_array_equal(run(temperature=0.0, eos_id=[first_stop]).tokens,
                                run(temperature=0.0, eos_id=first_stop).tokens)


def test_greedy_needs_no_key_and_sampling_asks_for_one():
  np.testing.assert_array_equal(run(temperature=0.0, rng=None).tokens,
                                run(temperature=0.0).tokens)
  with pytest.raises(ValueError, match=r"temperature=0.7 samples: pass rng=jax.random.key"):
    run(temperature=0.7, rng=None)


def test_top_k_one_equals_greedy():
  greedy = run(temperature=0.0)
  topk = run(temperature=1.0, top_k=1, rng=jax.random.key(7))
  np.testing.assert_array_equal(topk.tokens, greedy.tokens)
  np.testing.assert_allclose(topk.logps, greedy.logps, atol=1e-6)


def concat_for_scoring(gen):
  prompt, prompt_mask = left_pad(PROMPTS)
  tokens = jnp.concatenate([prompt, jnp.asarray(gen.tokens)], 1)
  attn = jnp.concatenate([prompt_mask, jnp.asarray(gen.mask)], 1)
  loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask), jnp.asarray(gen.mask)], 1)
  return tokens, attn, loss_mask


@pytest.mark.parametrize("phases", [1, 3])
def test_sampled_logps_equal_sequence_logps(phases):
  gen = run(temperature=1.3, top_p=0.95, rng=jax.random.key(3), cache_phases=phases)
  tokens, attn, loss_mask = concat_for_scoring(gen)
  summed, per_token = sequence_logps(model(), tokens, loss_mask, attention_mask=attn)
  np.testing.assert_allclose(np.asarray(per_token)[:, -NEW:], gen.logps, atol=1e-5)
  np.testing.assert_allclose(np.asarray(summed), gen.logps.sum(1), atol=1e-4)
  assert (np.asarray(per_token)[:, :-NEW] == 0).all()


def test_tempered_logps_are_of_the_sampling_distribution():
  temperature = 0.6
  gen = run(temperature=temperature, rng=jax.random.key(4), tempered_logps=True)
  tokens, attn, _ = concat_for_scoring(gen)
  logits = np.asarray(forward(model(), tokens, attn), np.float64)[:, -NEW - 1:-1] / temperature
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.take_along_axis(logits, gen.tokens[..., None], -1)[..., 0] - logz
  np.testing.assert_allclose(gen.logps, want * gen.mask, atol=1e-5)


HAND = np.log(np.array([0.05, 0.5, 0.1, 0.2, 0.15]))


@pytest.mark.parametrize("p, kept", [
    (0.3, {1}), (0.6, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_smallest_nucleus(p, kept):
  perm = np.array([3, 0, 4, 1, 2])
  logits = jnp.asarray(np.stack([HAND, HAND[perm]]), jnp.float32)
  out = np.asarray(sampling.top_p_filter(logits, p))
  assert {i for i in range(5) if np.isfinite(out[0, i])} == kept
  assert {int(perm[i]) for i in range(5) if np.isfinite(out[1, i])} == kept
  np.testing.assert_array_equal(out[np.isfinite(out)], np.asarray(logits)[np.isfinite(out)])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_sorting_reference_on_random_logits(p):
  logits = np.random.default_rng(1).normal(scale=3.0, size=(6, 300)).astype(np.float32)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  kept = np.asarray(jnp.isfinite(sampling.top_p_filter(jnp.asarray(logits), p)))
  for row, row_kept in zip(probs, kept):
    order = np.argsort(-row)
    mass_above = np.cumsum(row[order]) - row[order]
    want = np.zeros(row.shape, bool)
    want[order[mass_above < p]] = True
    np.testing.assert_array_equal(row_kept, want)


def test_top_p_of_one_keeps_every_token_and_learned_positions_are_bounded():
  # One token holds all but 1e-13 of the mass: float32's mass rounds to 1 and the
  # bisection cut the other 99 (tokens below one ulp) although p = 1 keeps everything.
  logits = jnp.asarray(np.r_[0.0, np.full(99, -30.0)][None], jnp.float32)
  assert bool(jnp.isfinite(sampling.top_p_filter(logits, 1.0)).all())
  gpt2 = dec.Decoder(dec.DecoderConfig.tiny_gpt2().replace(max_position_embeddings=8),
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"12 tokens exceeds this decoder's 8 learned positions"):
    gpt2(jnp.ones((1, 12), jnp.int32))
  prompts = jnp.ones((1, 6), jnp.int32)  # 6 + 8 new tokens, the last never fed back: 13
  with pytest.raises(ValueError, match=r"13 tokens exceeds this decoder's 8 learned"):
    sampling.generate(gpt2, prompts, jnp.ones_like(prompts), rng=jax.random.key(0),
                      max_new_tokens=8)
  assert sampling.generate(gpt2, prompts, jnp.ones_like(prompts), rng=jax.random.key(0),
                           max_new_tokens=3).tokens.shape == (1, 3)


def test_phases_sample_the_same_tokens_as_one_loop():
  one = run(temperature=1.0, rng=jax.random.key(5), cache_phases=1)
  three = run(temperature=1.0, rng=jax.random.key(5), cache_phases=3)
  np.testing.assert_array_equal(three.tokens, one.tokens)
  np.testing.assert_allclose(three.logps, one.logps, atol=1e-5)


def test_phase_ends_and_default_phases():
  assert sampling.phase_ends(127, 4) == (32, 64, 96, 127)
  assert sampling.phase_ends(2, 4) == (1, 2)
  assert sampling.phase_ends(0, 3) == (0,)
  assert [sampling.default_cache_phases(n) for n in (1, 31, 32, 100, 128, 4096)] == [
      1, 1, 1, 3, 4, 4]


def test_grown_cache_keeps_slots_and_appends_empty_ones():
  cache = model().init_cache(2, 3)
  cache = cache.replace(keys=tuple(k + 1.0 for k in cache.keys),
                        segments=jnp.ones_like(cache.segments), index=jnp.int32(3))
  grown = cache.grown(5)
  assert grown.max_length == 5 and int(grown.index) == 3
  np.testing.assert_array_equal(grown.keys[0][:, :, :3], cache.keys[0])
  assert (np.asarray(grown.keys[0][:, :, 3:]) == 0).all()
  np.testing.assert_array_equal(grown.segments, [[1, 1, 1, 0, 0]] * 2)
  with pytest.raises(ValueError, match="shrink"):
    cache.grown(2)


def test_top_k_filter():
  out = np.asarray(sampling.top_k_filter(jnp.asarray([[3.0, 1.0, 4.0, 1.5, 5.0]]), 2))
  np.testing.assert_array_equal(np.isfinite(out), [[False, False, True, False, True]])


def test_sampling_frequencies_follow_tempered_filtered_distribution():
  logits = jnp.asarray(HAND, jnp.float32)[None]
  draw = jax.jit(jax.vmap(lambda k: sampling._sample_step(
      logits, k, jnp.float32(2.0), jnp.float32(1.0), greedy=False, top_k=3,
      use_top_p=False, tempered_logps=False)[0][0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 20000))),
                       minlength=5) / 20000
  want = np.where(np.isin(np.arange(5), [1, 3, 4]), np.exp(HAND / 2.0), 0.0)
  np.testing.assert_allclose(counts, want / want.sum(), atol=0.015)


def test_categorical_frequencies_across_blocks_with_excluded_tokens():
  """V = 21 in blocks of 4 (the last block padded): excluded tokens never drawn, masses kept."""
  probs = np.zeros(21)
  probs[[0, 3, 4, 11, 20]] = [0.1, 0.25, 0.15, 0.3, 0.2]
  logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1.0)) + np.where(probs > 0, 0, -np.inf),
                       jnp.float32)[None]
  draw = jax.jit(jax.vmap(lambda k: sampling.categorical(k, logits, block=4)[0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(3), 20000))),
                       minlength=21) / 20000
  np.testing.assert_array_equal(counts[probs == 0], 0.0)
  np.testing.assert_allclose(counts, probs, atol=0.015)


def test_categorical_never_returns_an_excluded_first_token_of_a_block(monkeypatch):
  """Tokens 3, 4, 6, 7 are excluded. In rows where the mass before block 1 rounds
  differently as cum[1] − block mass than as cum[0], a draw at that boundary used to land
  before block 1's start and return its first token, 4 (a helper's find)."""
  rng = np.random.default_rng(0)
  p = np.zeros((2000, 8), np.float32)
  p[:, 0], p[:, 1:3], p[:, 5] = 1.0, rng.uniform(0.05, 1.0, (2000, 2)), rng.uniform(0.05, 1, 2000)
  logits = jnp.asarray(np.where(p > 0, np.log(np.maximum(p, 1e-30)), -np.inf), jnp.float32)
  within = jnp.cumsum(jnp.exp(logits - logits.max(-1, keepdims=True)).reshape(-1, 2, 4), -1)
  cum = np.asarray(jnp.cumsum(within[..., -1], -1))
  rows = np.flatnonzero(cum[:, 1] - np.asarray(within[:, 1, -1]) > cum[:, 0])[:20]
  assert rows.size == 20  # the rounding the test is about occurs
  for r in rows:
    boundary = np.float32(cum[r, 0] / cum[r, 1])
    for u in (np.nextafter(boundary, np.float32(0)), boundary, np.nextafter(boundary, np.float32(1))):
      monkeypatch.setattr(jax.random, "uniform", lambda *_, u=u, **__: jnp.full((1, 2), u))
      token = int(sampling.categorical(jax.random.key(0), logits[r:r + 1], block=4)[0])
      assert p[r, token] > 0, (r, u, token)


@pytest.mark.parametrize("u_block,u_token,token", [
    (0.2, 0.0, 0), (0.2, 0.6, 1), (0.2, 0.99, 3), (0.5, 0.0, 4), (0.5, 0.49, 4),
    (0.5, 0.51, 6), (0.5, 0.99, 7)])
def test_categorical_picks_the_block_with_one_uniform_and_the_token_with_another(
    monkeypatch, u_block, u_token, token):
  """Blocks of 4: [0.1, 0.2, 0, 0.1 | 0.3, 0, 0.2, 0.1]. The second uniform is a fraction of
  the chosen block's own mass, so a token's resolution no longer is 2^-23 of the total
  (one shared uniform left a third of a 49k vocabulary's tokens undrawable; a helper's
  exact enumeration)."""
  probs = np.array([0.1, 0.2, 0.0, 0.1, 0.3, 0.0, 0.2, 0.1])
  logits = jnp.asarray(np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf),
                       jnp.float32)[None]
  monkeypatch.setattr(jax.random, "uniform",
                      lambda *_, **__: jnp.asarray([[u_block, u_token]], jnp.float32))
  assert int(sampling.categorical(jax.random.key(0), logits, block=4)[0]) == token


def test_categorical_one_hot_rows_return_their_token():
  """Block starts and ends, and the last (padded) block: u near 1 must not fall past the token."""
  index = np.array([0, 3, 4, 20])
  logits = jnp.full((4, 21), -jnp.inf).at[np.arange(4), index].set(0.0)
  keys = jax.random.split(jax.random.key(1), 300)
  draws = jax.jit(jax.vmap(lambda k: sampling.categorical(k, logits, block=4)))(keys)
  np.testing.assert_array_equal(np.asarray(draws), np.broadcast_to(index, (300, 4)))


def test_sharded_generation_equals_unsharded():
  prompts = PROMPTS * 2  # batch 8, one row per device
  kw = dict(temperature=1.3, top_p=0.95, rng=jax.random.key(5))
  want = run(prompts, **kw)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  tokens, mask = left_pad(prompts)
  rows = NamedSharding(mesh, P("data"))
  graphdef, state = nnx.split(model())
  replicated = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
  gen = sampling.generate(replicated, jax.device_put(tokens, rows), jax.device_put(mask, rows),
                          max_new_tokens=NEW, pad_id=PAD, **kw)
  assert len(gen.tokens.sharding.device_set) == 8
  assert_same_generation(gen, want, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_generation_on_a_data_fsdp_tensor_mesh_equals_unsharded(temperature):
  """Parameters by ``decoder.PARTITION_RULES`` on a (2, 2, 2) mesh: the KV cache and the
  vocabulary are split over ``tensor``, so the products and the sampling's reductions
  combine partial results across devices."""
  prompts = PROMPTS * 2
  kw = dict(temperature=temperature, top_p=0.95 if temperature else None,
            rng=jax.random.key(7))
  want = run(prompts, **kw)
  mesh = parallel.make_mesh((2, 2, 2), parallel.MESH_AXES)
  sharded = nnx.clone(model())
  parallel.shard_model(sharded, mesh, dec.PARTITION_RULES)
  assert sharded.layers[0].attn.k_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
  tokens, mask = left_pad(prompts)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    gen = sampling.generate(sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows),
                            max_new_tokens=NEW, pad_id=PAD, **kw)
  assert_same_generation(gen, want, atol=1e-5)


def test_one_compile_for_repeated_calls_with_same_shapes():
  run(temperature=0.9, top_p=0.8)
  before = sampling.TRACE_COUNTS["generate"]
  size = sampling._generate_jit._cache_size()
  prompts = [p[::-1] for p in PROMPTS]
  for i, (temp, top_p) in enumerate([(0.5, 0.3), (1.7, 0.99), (1.0, 0.5)]):
    run(prompts, temperature=temp, top_p=top_p, rng=jax.random.key(i))
  assert sampling.TRACE_COUNTS["generate"] == before
  assert sampling._generate_jit._cache_size() == size


def test_packed_sequence_logps_equal_padded():
  seqs = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
  responses = [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1], [0, 1, 1]]
  tokens, attn = left_pad(seqs)
  padded_tokens = np.zeros((3, 7), np.int32)
  padded_attn = np.zeros((3, 7), np.int32)
  padded_loss = np.zeros((3, 7), np.int32)
  for i, (s, r) in enumerate(zip(seqs, responses)):
    padded_tokens[i, :len(s)], padded_attn[i, :len(s)], padded_loss[i, :len(s)] = s, 1, r
  want, want_tok = sequence_logps(model(), jnp.asarray(padded_tokens),
                                           jnp.asarray(padded_loss),
                                           attention_mask=jnp.asarray(padded_attn))
  logits = np.asarray(forward(model(), jnp.asarray(padded_tokens), jnp.asarray(padded_attn)),
                      np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = np.take_along_axis(logp[:, :-1], padded_tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(want_tok)[:, 1:], ref * padded_loss[:, 1:], atol=1e-5)
  # Pack sequences 0 and 2 in row 0, sequence 1 in row 1.
  rows = [[0, 2], [1]]
  packed = np.zeros((2, 10), np.int32)
  seg = np.zeros((2, 10), np.int32)
  loss = np.zeros((2, 10), np.int32)
  for r, members in enumerate(rows):
    start = 0
    for sid, i in enumerate(members, 1):
      n = len(seqs[i])
      packed[r, start:start + n], seg[r, start:start + n] = seqs[i], sid
      loss[r, start:start + n] = responses[i]
      start += n
  summed, _ = sequence_logps(model(), jnp.asarray(packed), jnp.asarray(loss),
                                      segment_ids=jnp.asarray(seg), num_segments=2)
  summed = np.asarray(summed)
  np.testing.assert_allclose([summed[0, 1], summed[1, 1], summed[0, 2]], np.asarray(want),
                             atol=1e-4)
  assert summed[:, 0].tolist() == [0.0, 0.0] and summed[1, 2] == 0.0


def test_token_entropy():
  logits = np.random.default_rng(0).normal(size=(2, 3, 7))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(sampling.token_entropy(jnp.asarray(logits, jnp.float32)),
                             -(p * np.log(p)).sum(-1), atol=1e-5)
  uniform = sampling.token_entropy(jnp.zeros((5,)))
  np.testing.assert_allclose(uniform, np.log(5), rtol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=49), "vocabulary"), (dict(eos_id=-3), "eos_id"), (dict(eos_id=[2, -1]), "eos_id"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(cache_phases=0), "cache_phases")])
def test_bad_arguments_raise(kw, message):
  with pytest.raises(ValueError, match=message):
    run(**kw)


_SCORED = [[0, 1, 0, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0, 1]]  # 3 and 2 scored slots
# 3 and 1: one row over a capacity of 2, the two within 2 x 2 in all.
_LOPSIDED = [[0, 1, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("capacity, scored", [(0, _SCORED), (2, _SCORED), (3, _SCORED),
                                              (8, _SCORED), (2, _LOPSIDED)],
                         ids=["every_slot", "overflow", "compact", "capacity_at_length",
                              "compact_pooled_over_rows"])
def test_logps_at_scores_the_selected_slots_on_either_path(capacity, scored):
  """``logps_at`` against float64 numpy, values and gradients: the compact branch (the
  rows' scored slots fit in ``rows x capacity``) and the every-slot branch give the same."""
  rng = np.random.default_rng(3)
  rows, length, width, vocab = 2, 8, 4, 6
  hidden = rng.normal(size=(rows, length, width))
  kernel = rng.normal(size=(width, vocab))
  tokens = rng.integers(0, vocab, (rows, length))
  source = np.array([[-1, 0, 1, 2, 3, 4, 5, 6], [-1, -1, 1, 0, 3, 4, 2, 6]])
  scored = np.array(scored, bool)
  weights = rng.normal(size=(rows, length))

  def total(hidden, kernel):
    out = sampling.logps_at(lambda h: h @ kernel, hidden, jnp.asarray(source),
                            jnp.asarray(tokens), jnp.asarray(scored), capacity=capacity)
    return jnp.sum(out * weights), out

  (_, got), (d_hidden, d_kernel) = jax.jit(jax.value_and_grad(total, (0, 1), has_aux=True))(
      jnp.asarray(hidden, jnp.float32), jnp.asarray(kernel, jnp.float32))
  want = np.zeros((rows, length))
  want_d_hidden, want_d_kernel = np.zeros_like(hidden), np.zeros_like(kernel)
  for r, l in zip(*np.nonzero(scored)):
    h = hidden[r, source[r, l]]
    logits = h @ kernel
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    want[r, l] = np.log(probs[tokens[r, l]])
    d_logits = weights[r, l] * (np.eye(vocab)[tokens[r, l]] - probs)
    want_d_hidden[r, source[r, l]] += kernel @ d_logits
    want_d_kernel += np.outer(h, d_logits)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_hidden, want_d_hidden, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_kernel, want_d_kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scored, capacity, slots_run", [
    (_SCORED, 3, 2 * 3), (_SCORED, 2, 2 * 8), (_LOPSIDED, 2, 2 * 2), (_LOPSIDED, 1, 2 * 8)],
    ids=["fits", "five_over_four", "one_row_over_pooled_fits", "four_over_two"])
def test_logps_at_takes_the_compact_branch_when_the_scored_slots_fit_in_all(
    scored, capacity, slots_run):
  """Which branch runs: the head sees ``rows x capacity`` slots when the rows' scored slots
  fit there in all (one row may hold more than ``capacity``), else every slot."""
  rows, length, width = 2, 8, 4
  ran = []

  def logits_fn(h):
    jax.debug.callback(ran.append, h.reshape(-1, width).shape[0])  # fires in the taken branch
    return h @ jnp.ones((width, 3))

  out = jax.jit(lambda: sampling.logps_at(
      logits_fn, jnp.ones((rows, length, width)), jnp.zeros((rows, length), jnp.int32),
      jnp.zeros((rows, length), jnp.int32), jnp.asarray(scored, bool), capacity=capacity))()
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert ran == [slots_run]
  np.testing.assert_allclose(out, np.where(np.asarray(scored, bool), -np.log(3), 0), rtol=1e-6)


def test_right_padded_prompts_are_refused():
  """Prefill continues from each row's last slot: a right-padded row continued from its
  padding (other greedy tokens, no error)."""
  tokens = np.array([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]], np.int32)
  mask = (np.arange(5) < 3)[None].repeat(2, 0).astype(np.int32)
  mask[1] = mask[1, ::-1]
  with pytest.raises(ValueError, match=r"prompt rows \[0\] are padded on the right"):
    sampling.generate(model(), tokens, mask, max_new_tokens=2, temperature=0.0)
  assert sampling.generate(model(), tokens[1:], mask[1:], max_new_tokens=2,
                           temperature=0.0).tokens.shape == (1, 2)
