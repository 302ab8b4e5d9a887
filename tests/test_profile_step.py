"""benchmarks.hlo_ops (behind profile_step): HLO parsing, op groups and trace times on a tiny RM step."""

import collections
import glob
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import hlo_ops, steps, workloads
from prefjax.models import attention, heads

N, T, D, F, HEADS = 4, 16, 32, 48, 2


@pytest.fixture(scope="module")
def compiled_step():
  """The benchmark RM step (``steps.prefjax_rm``) of a one-layer decoder, compiled for 4 x 16."""
  config = workloads.rm_model_config(hidden_size=D, num_layers=1, num_heads=HEADS,
                                     num_kv_heads=HEADS, intermediate_size=F, vocab_size=64)
  # Mean pooling sends every slot through the whole layer, so the counts below are a plain
  # layer's; with "last" pooling the one (last) block would run at the pooled slots only.
  with mock.patch.object(workloads, "rm_model_config", lambda **_: config), \
      mock.patch.object(heads, "default_pooling", lambda trunk: "mean"):
    _, info = steps.prefjax_rm(None)
  rng = np.random.default_rng(0)
  mask = np.ones((N, T), np.int32)
  mask[:, 12:] = 0
  batch = dict(tokens=rng.integers(3, 64, (N, T)).astype(np.int32), attention_mask=mask,
               loss_mask=mask, weight=np.ones(N // 2, np.float32),
               outcome=np.ones(N // 2, np.float32), example_index=np.arange(N // 2),
               pair_mask=np.ones(N // 2, bool))
  state = info["state"]()
  return info["train_step"].lower(state, batch).compile(), state, batch


def test_dot_flops_are_grouped_into_forward_input_and_weight_gradients(compiled_step):
  compiled, _, _ = compiled_step
  hlo = hlo_ops.parse_hlo(compiled.as_text())
  flops, count = collections.Counter(), collections.Counter()
  for name in hlo["entry"]:
    op = hlo["ops"][name]
    group = hlo_ops.classify(hlo, op, (N, N * T))
    flops[group] += sum(o.get("flops", 0) for o in hlo_ops.inner(hlo, op))
    count[group] += 1
  rows = N * T
  kernels = 4 * D * D + 3 * D * F  # q, k, v, o and the SwiGLU MLP of the one layer
  head = 2 * N * D  # the scalar reward head reads one pooled vector per row
  assert flops["matmul fwd"] == 2 * rows * kernels + head
  # Layer 0 needs dX (the embedding gradient); the head's dX contracts over its one output,
  # which XLA turns into a multiply.
  assert flops["matmul dX"] == 2 * rows * kernels
  assert flops["matmul dW"] == 2 * rows * kernels + head
  score = 2 * N * HEADS * T * T * (D // HEADS)  # one query block: the full 16 x 16 square
  assert flops["attention fwd"] == 2 * score  # q·kᵀ and p·v
  # dV, dP, dQ, dK: in one program XLA merges the backward's recomputed q·kᵀ with the forward's.
  assert flops["attention bwd"] == 4 * score
  assert sum(flops.values()) == sum(flops[g] for g in hlo_ops.GROUPS[:5])
  assert count["optimizer"] > 0 and count["embedding"] > 0 and count["elementwise/norm"] > 0


def test_trace_splits_the_span_of_the_ops_among_them(compiled_step, tmp_path):
  compiled, state, batch = compiled_step
  hlo = hlo_ops.parse_hlo(compiled.as_text())
  dots = {n for n in hlo["entry"] if hlo["ops"][n]["opcode"] == "dot"}
  state, _ = compiled(state, batch)
  with jax.profiler.trace(str(tmp_path)):
    # An earlier call of the same program in the trace: its events must not be counted.
    state, _ = jax.block_until_ready(compiled(state, batch))
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, batch))
    wall = time.perf_counter() - start
  events = hlo_ops.run_events(glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)[0], hlo)
  times, busy, span = hlo_ops.op_times(events, hlo)
  assert dots and dots <= set(times)
  assert all(times[n] > 0 for n in dots)
  # Every instant of the ops' span goes to exactly one op (gaps to the awaited async op).
  assert sum(times.values()) == pytest.approx(span, rel=1e-6)
  assert 0 < busy <= span <= wall


def _events_of_one_call(compiled, hlo, args, tmp_path):
  """``hlo_ops.run_events`` of one traced call of ``compiled``, after an untraced one."""
  jax.block_until_ready(compiled(*args))
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(compiled(*args))
  return hlo_ops.run_events(glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)[0], hlo)


def test_ops_of_attention_tiles_inside_conditionals_get_their_own_time_and_flops(tmp_path):
  """The tiled kernel's below-diagonal tiles run inside conditionals: the ops of a tile
  that ran get their own time and FLOPs, and a skipped tile's conditional runs none."""
  n, t, h, dh, block = 1, 64, 2, 8, 16
  # Four 16-token blocks: segment 2's queries in blocks 1 and 2 reach back to slot 8, so
  # tiles (1,0), (2,0), (2,1) run; segment 3 (block 3) sees none of the earlier blocks.
  segments = jnp.asarray([[1] * 8 + [2] * 40 + [3] * 16], jnp.int32)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((n, t, h, dh)), jnp.float32) for _ in range(3))

  def loss(q, k, v):
    out = attention.causal_attention(q, k, v, segments, tiled=True, block_size=block)
    return jnp.sum(jnp.sin(out))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  hlo = hlo_ops.parse_hlo(compiled.as_text())
  conditionals = [o for o in hlo["entry"] if hlo["ops"][o]["opcode"] == "conditional"]
  assert len(conditionals) == 2 * 6  # forward and backward of the 6 tiles below the diagonal
  events = _events_of_one_call(compiled, hlo, (q, k, v), tmp_path)
  times, _, span = hlo_ops.op_times(events, hlo)
  nested = set(times) - set(hlo["entry"])
  assert nested and {hlo_ops.top_level(hlo, name) for name in nested} <= set(conditionals)
  assert sum(times.values()) == pytest.approx(span, rel=1e-6)
  executed = hlo_ops.executed_flops(events, hlo)
  assert all(hlo_ops.classify(hlo, hlo["ops"][name], (n, n * t)).startswith("attention")
             for name, flops in executed.items() if flops)
  pairs = attention.computed_pairs(segments, tiled=True, block_size=block)
  assert pairs == 7 * block * block
  tile = 2 * h * dh * block * block  # FLOPs of one [block, dh] x [dh, block] product
  # Tiles (3,0), (3,1), (3,2) are skipped: their forward and backward conditionals run nothing.
  per_tile = collections.Counter()
  for name, flops in executed.items():
    per_tile[hlo_ops.top_level(hlo, name)] += flops
  assert sorted(per_tile[c] for c in conditionals) == [0] * 6 + [2 * tile] * 3 + [5 * tile] * 3
  # Forward q·kᵀ and p·v, backward q·kᵀ, dV, dP, dQ, dK over the computed pairs; XLA may
  # reuse the forward's q·kᵀ in the unconditional diagonal tiles.
  per_product = 2 * h * dh * pairs
  assert 6 * per_product <= sum(executed.values()) <= 7 * per_product


def test_a_loops_dots_count_at_every_trip(tmp_path):
  """A ``while`` (``fori_loop``) body's dot runs as an op of its own at every trip."""
  trips, size = 5, 64
  x, w = jnp.ones((size, size)), jnp.full((size, size), 0.01)
  loop = lambda x, w: jax.lax.fori_loop(0, trips, lambda i, c: jnp.tanh(c @ w), x)
  compiled = jax.jit(loop).lower(x, w).compile()
  hlo = hlo_ops.parse_hlo(compiled.as_text())
  (loop_op,) = [o for o in hlo["entry"] if hlo_ops.runs_computations(hlo["ops"][o])]
  assert hlo["ops"][loop_op]["opcode"] == "while" and len(hlo["ops"][loop_op]["calls"]) == 2
  executed = hlo_ops.executed_flops(_events_of_one_call(compiled, hlo, (x, w), tmp_path), hlo)
  assert sum(executed.values()) == trips * 2 * size ** 3
  assert {hlo_ops.top_level(hlo, name) for name, f in executed.items() if f} == {loop_op}
