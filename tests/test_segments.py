"""Segment reductions against direct NumPy loops."""

import numpy as np

from prefjax.models import segments


def _random_packed(rng, rows=3, length=11, max_segments=3):
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    pos = 0
    for s in range(1, rng.integers(1, max_segments + 1) + 1):
      n = int(rng.integers(1, 4))
      if pos + n > length:
        break
      seg[r, pos:pos + n] = s
      pos += n
  return seg


def test_segment_reductions_match_loops():
  rng = np.random.default_rng(0)
  seg = _random_packed(rng)
  vals = rng.normal(size=seg.shape).astype(np.float32)
  s_max = 3
  sums = np.asarray(segments.segment_sums(vals, seg, s_max))
  last = np.asarray(segments.segment_last_index(seg, s_max))
  first = np.asarray(segments.segment_first_index(seg, s_max))
  counts = np.asarray(segments.segment_counts(seg, s_max))
  for r in range(seg.shape[0]):
    assert sums[r, 0] == 0 and counts[r, 0] == 0
    for s in range(1, s_max + 1):
      where = np.nonzero(seg[r] == s)[0]
      np.testing.assert_allclose(sums[r, s], vals[r, where].sum(), rtol=1e-6, atol=1e-6)
      assert counts[r, s] == len(where)
      assert last[r, s] == (where.max() if len(where) else 0)
      assert first[r, s] == (where.min() if len(where) else 0)


def test_last_token_index_left_and_right_padding():
  mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(segments.last_token_index(mask), [2, 4, 0])


def test_gather_pairs():
  per_seg = np.arange(12, dtype=np.float32).reshape(3, 4)
  idx = np.array([[0, 1], [2, 3]])
  np.testing.assert_array_equal(segments.gather_pairs(per_seg, idx), [1.0, 11.0])


def _dot_precisions(fn, *args):
  """The ``precision`` of every ``dot_general`` ``fn`` traces to (inner jaxprs included)."""
  import jax  # pylint: disable=import-outside-toplevel

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn.params["precision"]
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          yield from walk(inner)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_sums_over_segments_and_reward_heads_ask_for_full_float32_dots():
  """At the default precision a GPU rounds float32 dot operands to TF32 (a TPU to bf16):
  a 500-token log-prob sum then errs by up to 2 nats. CPUs compute float32 either way, so
  only the requested precision can be checked here."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from prefjax.models import heads  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  highest = jax.lax.Precision.HIGHEST
  exact = (highest, highest)
  seg = _random_packed(np.random.default_rng(1))
  values = np.ones(seg.shape, np.float32)
  assert _dot_precisions(lambda v: segments.segment_sums(v, seg, 3), values) == [exact]
  hidden = np.ones((*seg.shape, 4), np.float32)
  assert _dot_precisions(lambda h: heads.pool_packed(h, seg, 3, "mean"), hidden) == [exact] * 2
  head = heads._head_linear(4, 1, nnx.Rngs(0))  # pylint: disable=protected-access
  assert _dot_precisions(lambda h: head(h), hidden) == [exact]
