"""Block-causal attention with a recomputing backward against the explicit-mask reference."""

import itertools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models import attention, layers


# Jitted: run eagerly, every primitive of the block loop compiles on its own (10 s a call).
_attention = jax.jit(attention.causal_attention, static_argnames=("block_size", "tiled"))


def _inputs(seed, n, t, h, kv, d, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, t, h, d)).astype(dtype)
  k = rng.normal(size=(n, t, kv, d)).astype(dtype)
  v = rng.normal(size=(n, t, kv, d)).astype(dtype)
  # Row 0: one sequence; row 1: right padding; row 2: three packed segments + padding.
  segments = np.ones((n, t), np.int32)
  segments[1, t - t // 3:] = 0
  if n > 2:
    segments[2] = np.repeat([1, 2, 3, 0], [t // 4, t // 4, t // 3, t - t // 4 * 2 - t // 3])
  return q, k, v, segments


def _reference(q, k, v, segments, prefixes=None):
  """float64 numpy softmax over visible keys, heads grouped as Hugging Face repeat_kv; with
  ``prefixes``, a token also sees the earlier slots of the segment its prefix id names."""
  n, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros_like(q)
  for b in range(n):
    for j in range(h):
      s = q[b, :, j] @ k[b, :, j // group].T / np.sqrt(d)
      same = segments[b][:, None] == segments[b][None, :]
      if prefixes is not None:
        same |= (prefixes[b][:, None] == segments[b][None, :]) & (segments[b][:, None] > 0)
      visible = np.tril(np.ones((t, t), bool)) & same
      s = np.where(visible, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, j] = (p / p.sum(-1, keepdims=True)) @ v[b, :, j // group]
  return out


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("t,h,kv,block", [(37, 4, 4, 8), (64, 6, 2, 16), (24, 2, 1, 128)])
def test_forward_matches_float64_reference(t, h, kv, block, tiled):
  q, k, v, segments = _inputs(0, 3, t, h, kv, 8)
  with jax.enable_x64(True):
    got = _attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segments),
                     block_size=block, tiled=tiled)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, segments),
                               rtol=1e-10, atol=1e-12)


def test_default_blocks_match_the_reference_across_several_tiles():
  # t = 600 spans three 256-token tiles (the tiled default) and five 128-token blocks.
  q, k, v, segments = _inputs(1, 3, 600, 2, 2, 8)  # row 2: packed segments
  with jax.enable_x64(True):
    for tiled in (False, True):
      got = _attention(*map(jnp.asarray, (q, k, v, segments)), tiled=tiled)
      np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, segments),
                                 rtol=1e-10, atol=1e-12)
  assert attention.query_blocks(600, attention.DEFAULT_TILE_SIZE) == (
      (0, 256), (256, 512), (512, 600))


def _short_segments(n, t, seed):
  """Every row packed with runs of 2-9 tokens (ids 1, 2, ...) and a padding tail: most
  tiles below the diagonal are invisible, so the tiled kernel skips them."""
  rng = np.random.default_rng(seed)
  segments = np.zeros((n, t), np.int32)
  for row in range(n):
    at, seg = 0, 0
    while at < t - 6:
      seg, length = seg + 1, int(rng.integers(2, 10))
      segments[row, at:at + length] = seg
      at += length
  return segments


def _shared_prompt_rows(n, t, seed):
  """Rows packed like the shared-prompt pair layout: groups of a prompt segment and one
  or two response segments, all with the prompt's id as prefix id; padding between
  groups now and then and at the tail."""
  rng = np.random.default_rng(seed)
  segments, prefixes = np.zeros((n, t), np.int32), np.zeros((n, t), np.int32)
  for row in range(n):
    at, sid = int(rng.integers(0, 3)), 0
    while at < t:
      prompt = sid + 1
      for _ in range(1 + int(rng.integers(1, 3))):
        sid, length = sid + 1, int(rng.integers(1, 12))
        segments[row, at:at + length], prefixes[row, at:at + length] = sid, prompt
        at += length
      at += int(rng.integers(0, 3)) * int(rng.random() < 0.3)  # a padding gap
  return segments, prefixes


@pytest.mark.parametrize("block", [1, 4, 16, 64])
def test_reach_is_the_earliest_key_a_real_query_of_each_block_sees(block):
  """``_reach`` decides which tiles the tiled kernel skips: against brute force over the
  visibility rule, on shared-prompt rows and on plain packed rows."""
  for seed in range(8):
    segments, prefixes = _shared_prompt_rows(3, 100, seed)
    for pre in (prefixes, None):
      groups = segments if pre is None else pre
      visible = np.tril(np.ones((100, 100), bool)) & (
          (segments[:, :, None] == segments[:, None, :])
          | (groups[:, :, None] == segments[:, None, :]))
      earliest = np.where(segments > 0, visible.argmax(-1), 100)  # a query sees itself
      blocks = attention.query_blocks(100, block, max_blocks=128)
      want = [earliest[:, s:e].min() for s, e in blocks]
      masks = (jnp.asarray(segments), None if pre is None else jnp.asarray(pre))
      np.testing.assert_array_equal(jax.jit(attention._reach, static_argnums=1)(
          masks, blocks), want, err_msg=f"seed {seed}, prefixes {pre is not None}")


@pytest.mark.parametrize("tiled", [False, True])
def test_shared_prompt_rows_match_the_float64_reference_across_tiles(tiled):
  """Responses whose prompt lies blocks earlier (the tiles the kernel visits for them),
  checked on the attention output itself, not only on which tiles it visits."""
  segments, prefixes = _shared_prompt_rows(3, 100, seed=5)
  q, k, v, _ = _inputs(6, 3, 100, 4, 2, 8)
  want = _reference(q, k, v, segments, prefixes)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(lambda q, k, v: attention.causal_attention(
        q, k, v, jnp.asarray(segments), jnp.asarray(prefixes), block_size=8, tiled=tiled))(
            *(jnp.asarray(x) for x in (q, k, v))))
  real = segments > 0
  np.testing.assert_allclose(got[real], want[real], rtol=1e-10, atol=1e-12)


def _two_sequences(t=1024, first=300):
  segments = np.repeat([[1, 2]], [first, t - first], axis=1).astype(np.int32)
  return segments.reshape(1, t)


def test_computed_pairs_count_block_causal_blocks_and_visited_tiles():
  # Block-causal: blocks [0,128), [128,256), [256,300) score keys up to their end.
  assert attention.computed_pairs(np.ones((2, 300), np.int32)) == 2 * (
      128 * 128 + 128 * 256 + 44 * 300)
  # Tiled, 256-token tiles, sequences [0, 300) and [300, 1024): the 4 diagonal tiles,
  # (1, 0) (queries 256-299 see keys 0-255), then (2, 1), (3, 1) and (3, 2), which
  # reach back to key 300; (2, 0) and (3, 0) are skipped. A padding-only row adds its
  # tiles to the count but cannot widen the shared conditionals.
  segments = _two_sequences()
  assert attention.computed_pairs(segments, tiled=True) == 8 * 256 ** 2
  padded = np.concatenate([segments, np.zeros_like(segments)])
  assert attention.computed_pairs(padded, tiled=True) == 2 * 8 * 256 ** 2
  # Shared prompt [0, 200) with responses [200, 400) and [400, 600), then padding: both
  # responses reach the prompt's first key, so block 2 needs tiles (2, 0) and (2, 1);
  # the padding-only block 3 only its diagonal.
  shared = np.repeat([[1, 2, 3, 0]], [200, 200, 200, 424], axis=1).astype(np.int32)
  prefixes = np.where(shared > 0, 1, 0).astype(np.int32)
  assert attention.computed_pairs(shared, prefixes, tiled=True) == 7 * 256 ** 2
  assert attention.computed_pairs(shared, tiled=True) == 6 * 256 ** 2  # no prefix: no (2, 0)


def test_tiled_kernel_does_not_read_the_tiles_it_skips():
  """Values of keys [0, 256) are NaN: a computed tile would turn its masked weights'
  0 × NaN into NaN. Query blocks 2 and 3 skip tile 0 (``computed_pairs``), so their
  outputs and gradients stay finite and equal the reference's."""
  q, k, v = np.random.default_rng(0).normal(size=(3, 1, 1024, 1, 8))
  segments = _two_sequences()
  poisoned = v.copy()
  poisoned[:, :256] = np.nan
  with jax.enable_x64(True):
    tiled = lambda q, v: _attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(segments),
                                    tiled=True)
    out = np.asarray(tiled(jnp.asarray(q), poisoned))
    late_grad = lambda v: np.asarray(jax.grad(
        lambda q: jnp.sum(tiled(q, v)[:, 512:] ** 2))(jnp.asarray(q)))[:, 512:]
    grad, clean_grad = late_grad(poisoned), late_grad(v)
  np.testing.assert_allclose(out[:, 512:], _reference(q, k, v, segments)[:, 512:],
                             rtol=1e-10, atol=1e-12)
  assert np.isnan(out[:, :256]).all()  # the first sequence reads its own NaN values
  np.testing.assert_allclose(grad, clean_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t,h,kv,block,layout,tiled", [
    (37, 4, 4, 8, "mixed", False), (64, 6, 2, 16, "mixed", False),
    (37, 4, 4, 8, "mixed", True), (64, 6, 2, 16, "mixed", True),
    (64, 2, 1, 8, "short", True)])
def test_gradient_matches_autodiff_of_masked_reference(t, h, kv, block, layout, tiled):
  """The hand-written backward against autodiff of the explicit-mask softmax, in float64."""
  q, k, v, segments = _inputs(1, 3, t, h, kv, 8)
  if layout == "short":
    segments = _short_segments(3, t, seed=1)
    reach = attention._reach((jnp.asarray(segments), None), attention.query_blocks(t, block))
    assert (np.asarray(reach)[2:] >= 2 * block - 9).all()  # tiles far below are skipped
  cotangent = np.random.default_rng(2).normal(size=q.shape)
  index = np.arange(t)
  mask = layers.attention_mask_from_segments(segments, segments, index, index)

  def blocked(q, k, v):
    out = attention.causal_attention(q, k, v, jnp.asarray(segments), block_size=block,
                                     tiled=tiled)
    return jnp.sum(out * cotangent)

  def masked(q, k, v):  # softmax over the explicit mask, in the inputs' dtype throughout
    k, v = (jnp.repeat(x, h // kv, axis=2) for x in (k, v))
    s = jnp.einsum("nthd,nshd->nhts", q, k) / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    return jnp.sum(jnp.einsum("nhts,nshd->nthd", p, v) * cotangent)

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (q, k, v))
    if layout == "short":
      np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: attention.causal_attention(
          *a, jnp.asarray(segments), block_size=block, tiled=True))(*args)),
          _reference(q, k, v, segments), rtol=1e-10, atol=1e-12)
    got = jax.jit(jax.grad(blocked, argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(masked, argnums=(0, 1, 2)))(*args)
    for name, g, w in zip("qkv", got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9, atol=1e-11,
                                 err_msg=f"d{name}")


def test_gradient_matches_finite_differences():
  q, k, v, segments = _inputs(3, 2, 12, 2, 1, 4)
  cotangent = np.random.default_rng(4).normal(size=q.shape)
  with jax.enable_x64(True):
    f = jax.jit(lambda q, k, v: jnp.sum(attention.causal_attention(
        q, k, v, jnp.asarray(segments), block_size=4) * cotangent))
    args = [jnp.asarray(x) for x in (q, k, v)]
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
    rng = np.random.default_rng(5)
    for i, g in enumerate(grads):
      direction = rng.normal(size=args[i].shape)
      eps = 1e-6
      plus = list(args); plus[i] = args[i] + eps * direction
      minus = list(args); minus[i] = args[i] - eps * direction
      numeric = (f(*plus) - f(*minus)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.sum(g * direction)), float(numeric), rtol=1e-6)


def test_float32_matches_masked_attention():
  """The training path (float32) against the cache path on the same inputs."""
  q, k, v, segments = _inputs(6, 3, 96, 4, 2, 16, np.float32)
  index = np.arange(96)
  mask = layers.attention_mask_from_segments(segments, segments, index, index)
  got = _attention(q, k, v, segments, block_size=32)
  want = layers.masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_cached_attention_of_one_query_per_row_equals_float64_softmax(rows):
  """A decoding step over a heads-first cache with empty slots, grouped-query heads; one row
  takes the multiply-and-sum path on CPU, three the batched products."""
  rng = np.random.default_rng(rows)
  heads, kv_heads, slots, dim = 6, 2, 11, 8
  q = rng.standard_normal((rows, 1, heads, dim))
  k, v = (rng.standard_normal((rows, kv_heads, slots, dim)) for _ in range(2))
  mask = rng.random((rows, 1, slots)) < 0.7
  mask[:, :, 0] = True
  got = layers.cached_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                                jnp.asarray(mask))
  group = heads // kv_heads
  want = np.zeros((rows, 1, heads, dim))
  for n, h in itertools.product(range(rows), range(heads)):
    scores = k[n, h // group] @ q[n, 0, h] / np.sqrt(dim)
    scores = np.where(mask[n, 0], scores, -np.inf)
    probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    want[n, 0, h] = probs @ v[n, h // group]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_give_bfloat16_output_close_to_float32():
  q, k, v, segments = _inputs(7, 2, 40, 4, 4, 16, np.float32)
  want = _attention(q, k, v, segments, block_size=16)
  as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  got = _attention(*as_bf16, segments, block_size=16)
  assert got.dtype == jnp.bfloat16
  def grad_of_q(q, k, v):
    return jax.jit(jax.grad(lambda q: jnp.sum(attention.causal_attention(
        q, k, v, segments, block_size=16).astype(jnp.float32))))(q)
  grads = grad_of_q(*as_bf16)
  want_grads = np.asarray(grad_of_q(*(jnp.asarray(x, jnp.float32) for x in as_bf16)))
  assert grads.dtype == jnp.bfloat16
  scale = np.abs(want_grads).max()  # bfloat16 keeps 8 bits: 2% of the largest gradient
  np.testing.assert_allclose(np.asarray(grads, np.float32), want_grads, atol=0.02 * scale)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.05)


def test_query_blocks_cover_the_sequence_and_respect_the_cap():
  assert attention.query_blocks(300, 128, 8) == ((0, 128), (128, 256), (256, 300))
  assert attention.query_blocks(4096, 128, 8) == tuple((s, s + 512) for s in range(0, 4096, 512))
  assert attention.query_blocks(5, 128, 8) == ((0, 5),)
  with pytest.raises(ValueError, match="block_size"):
    attention.query_blocks(10, 0, 8)


def test_heads_that_do_not_group_are_an_error():
  q = jnp.zeros((1, 4, 3, 2))
  k = jnp.zeros((1, 4, 2, 2))
  with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
    attention.causal_attention(q, k, k, jnp.ones((1, 4), jnp.int32))


def test_tiled_kernel_slices_its_tiles_before_the_conditionals():
  """No op inside a skippable tile's branch handles a whole ``[N, H, T, D]`` input. The
  kernel's inputs are transposed views that XLA CPU lays out ``[N, T, H, D]``; branches
  that sliced them copied each whole array into their own layout at every visited tile."""
  from benchmarks import hlo_ops
  n, t, h, d, block = 2, 64, 2, 8, 16
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((n, t, h, d)), jnp.float32) for _ in range(3))
  segments = jnp.asarray(np.tile([1] * 8 + [2] * 40 + [3] * 16, (n, 1)), jnp.int32)
  loss = lambda q, k, v: jnp.sum(jnp.sin(attention.causal_attention(
      q, k, v, segments, tiled=True, block_size=block)))
  hlo = hlo_ops.parse_hlo(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v)
                          .compile().as_text())
  branches = {c for name in hlo["entry"] if hlo["ops"][name]["opcode"] == "conditional"
              for c in hlo["ops"][name]["calls"]}
  in_branches = [op for op in hlo["ops"].values() if op["computation"] in branches]
  assert any(op["opcode"] == "dot" for op in in_branches)
  whole = q.size * q.dtype.itemsize
  too_big = [(op["name"], op["type"]) for op in in_branches
             if op["opcode"] not in ("parameter", "get-tuple-element", "tuple")
             and hlo_ops.nbytes(op["type"]) >= whole]
  assert not too_big, too_big
