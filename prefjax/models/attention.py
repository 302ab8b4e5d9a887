"""Exact causal self-attention computed in query blocks, with a recomputing backward.

``causal_attention`` is softmax attention under the two masking rules of
``prefjax.models.layers`` (a key is visible when it is not after the query and
carries the same segment id; with ``prefixes``, also when it carries the
query's prefix segment id: see ``causal_attention``), computed so that the work
and the memory follow the causal triangle rather than the full ``T x T`` square:

- **Block-causal forward.** Queries are split into ``num_blocks`` contiguous
  blocks; block ``i`` (queries ``[s_i, e_i)``) scores only keys ``[0, e_i)``,
  so the score work is ``(1 + 1/num_blocks) / 2`` of the full square. Only the
  diagonal part needs the causal mask; the segment mask covers padding and
  packed sequences.
- **Flash-style backward** (Dao et al., "FlashAttention", arXiv:2205.14135,
  Alg. 4). The forward keeps ``q, k, v``, the output and the row log-sum-exp
  ``lse``, not the ``[N, H, T, T]`` probabilities; the backward recomputes
  ``p = exp(s - lse)`` block by block and uses ``delta = rowsum(dO * O)``:
  ``dV = pᵀ dO``, ``dS = p ⊙ (dO Vᵀ − delta)``, ``dQ = dS K / √d``,
  ``dK = dSᵀ Q / √d``.

Layout is ``[N, H, T, D]`` inside (heads before time, so every score product is
a plain batched matmul). Grouped-query heads are expanded to full heads before
the kernel (``jnp.repeat``: query head ``j`` reads key head ``j // group``, the
Hugging Face ``repeat_kv`` convention), and autodiff sums their gradients back.
Scores, softmax statistics and accumulations are float32 whatever the input
dtype; the output has the dtype of ``q``.

Blocks are unrolled in Python (each block has its own key length), which is why
their number is capped: a few blocks already take most of the saving, and every
block adds to the compiled program.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from prefjax.models import segments as seg

Array = jax.Array

DEFAULT_BLOCK_SIZE = 128
# The tiled kernel traces one conditional per tile: 256-token tiles (10 per 1,024-token
# row instead of 36) compiled the HH packed steps 37–51% faster, and their 100-step runs
# took 1.5–5% less wall time (benchmarks/RESULTS.md).
DEFAULT_TILE_SIZE = 256
DEFAULT_MAX_BLOCKS = 8
# The forward's residuals, named for remat policies (``jax.ad_checkpoint.checkpoint_name``):
# a policy that saves both keeps the backward from rerunning the kernel's forward.
SAVEABLE_NAMES = ("attention_out", "attention_lse")
_MASKED = -1e30  # finite: a fully masked row cannot occur (a query always sees itself)


def query_blocks(length: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_blocks: int = DEFAULT_MAX_BLOCKS) -> tuple[tuple[int, int], ...]:
  """``(start, end)`` of each query block: ``block_size`` wide, at most ``max_blocks`` of them."""
  if length < 1 or block_size < 1 or max_blocks < 1:
    raise ValueError(f"need length, block_size, max_blocks >= 1; got {length}, "
                     f"{block_size}, {max_blocks}")
  width = max(block_size, math.ceil(length / max_blocks))
  return tuple((s, min(s + width, length)) for s in range(0, length, width))


def causal_attention(q: Array, k: Array, v: Array, segments: Array,
                     prefixes: Array | None = None, *,
                     block_size: int | None = None,
                     max_blocks: int = DEFAULT_MAX_BLOCKS, tiled: bool = False) -> Array:
  """Causal, segment-masked softmax attention; ``q [N,T,H,D]``, ``k, v [N,T,Hkv,D]``.

  ``segments [N, T]`` int: tokens attend only to earlier-or-same slots with the
  same id (padding rows use the attention mask as the id). ``prefixes [N, T]``
  (optional) int: a token also attends to earlier slots whose segment id equals
  its prefix id. A shared-prompt pair is three segments ``p`` (prompt), ``c``
  (chosen response) and ``r`` (rejected response), all with prefix id ``p``: each
  response sees the prompt and itself, never the other response. A token whose
  prefix id is its own segment id follows the plain rule. ``tiled``: visit
  (query block, key block) tiles and skip those no query can see (for packed rows
  of many short sequences; same result when each segment id is ONE contiguous run
  of slots, as the packer writes them: the skip reads where a run starts, so an id
  reused after another segment would lose its earlier run). ``block_size``: query block width (default
  ``DEFAULT_BLOCK_SIZE``, or ``DEFAULT_TILE_SIZE`` when ``tiled``). Returns ``[N, T, H, D]``.
  """
  n, t, h, d = q.shape
  chex.assert_shape([k, v], (n, t, None, d))
  chex.assert_shape(segments, (n, t))
  if prefixes is not None:
    chex.assert_shape(prefixes, (n, t))
    prefixes = prefixes.astype(jnp.int32)
  group = h // k.shape[2]
  if group * k.shape[2] != h:
    raise ValueError(f"{h} query heads are not a multiple of {k.shape[2]} key heads")
  if group > 1:
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  to_bhtd = lambda x: x.transpose(0, 2, 1, 3)
  if block_size is None:
    block_size = DEFAULT_TILE_SIZE if tiled else DEFAULT_BLOCK_SIZE
  blocks = query_blocks(t, block_size, max_blocks)
  kernel = _tiled_attention if tiled else _attention
  out = kernel(to_bhtd(q), to_bhtd(k), to_bhtd(v), (segments.astype(jnp.int32), prefixes),
               blocks)
  return to_bhtd(out)


def _visible(masks: tuple[Array, Array | None], start: int, end: int, key_start: int = 0,
             key_end: int | None = None) -> Array:
  """``[N, 1, end-start, key_end-key_start]`` bool: causal and same-segment (or
  prefix-segment) for queries ``[start, end)`` and keys ``[key_start, key_end)``
  (default ``[0, end)``)."""
  segments, prefixes = masks
  key_end = end if key_end is None else key_end
  q_index = np.arange(start, end)[:, None]
  causal = np.arange(key_start, key_end)[None, :] <= q_index
  keys = segments[:, None, key_start:key_end]
  same = segments[:, start:end, None] == keys
  if prefixes is not None:
    same = same | (prefixes[:, start:end, None] == keys)
  return (same & causal)[:, None]


def _accumulation(x: Array) -> jnp.dtype:
  """float32, or float64 when the inputs are (tests against float64 references)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _scores(q: Array, k: Array, masks, start: int, end: int, key_start: int = 0,
            key_end: int | None = None) -> Array:
  """Scaled, masked float32 scores of queries ``[start, end)`` against keys
  ``[key_start, key_end)`` (default ``[0, end)``)."""
  key_end = end if key_end is None else key_end
  return _tile_scores(q[:, :, start:end], k[:, :, key_start:key_end], masks, start, end,
                      key_start, key_end)


def _tile_scores(q_tile: Array, k_tile: Array, masks, start: int, end: int, key_start: int,
                 key_end: int) -> Array:
  """``_scores`` of queries ``q_tile`` (slots ``[start, end)``) against keys ``k_tile``
  (slots ``[key_start, key_end)``), already sliced."""
  s = jnp.einsum("nhtd,nhsd->nhts", q_tile, k_tile,
                 preferred_element_type=_accumulation(q_tile)) * q_tile.shape[-1] ** -0.5
  return jnp.where(_visible(masks, start, end, key_start, key_end), s, _MASKED)


def _forward(q, k, v, masks, blocks):
  outs, lses = [], []
  for start, end in blocks:
    s = _scores(q, k, masks, start, end)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("nhts,nhsd->nhtd", p.astype(v.dtype), v[:, :, :end],
                   preferred_element_type=_accumulation(q)) / total
    outs.append(o.astype(q.dtype))
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, masks, blocks):
  return _forward(q, k, v, masks, blocks)[0]


def _named(out: Array, lse: Array) -> tuple[Array, Array]:
  return tuple(checkpoint_name(x, name)
               for x, name in zip((out, lse), SAVEABLE_NAMES))


def _attention_fwd(q, k, v, masks, blocks):
  out, lse = _named(*_forward(q, k, v, masks, blocks))
  return out, (q, k, v, masks, out, lse)


def _attention_bwd(blocks, residuals, d_out):
  q, k, v, masks, out, lse = residuals
  scale = q.shape[-1] ** -0.5
  acc = _accumulation(q)
  f32 = functools.partial(jnp.einsum, preferred_element_type=acc)
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), -1, keepdims=True)
  dq_blocks = []
  dk = jnp.zeros(k.shape, acc)
  dv = jnp.zeros(v.shape, acc)
  for start, end in blocks:
    p = jnp.exp(_scores(q, k, masks, start, end) - lse[:, :, start:end])
    do = d_out[:, :, start:end]
    dv = dv.at[:, :, :end].add(f32("nhts,nhtd->nhsd", p.astype(do.dtype), do))
    dp = f32("nhtd,nhsd->nhts", do, v[:, :, :end])
    ds = (p * (dp - delta[:, :, start:end]) * scale).astype(q.dtype)
    dq_blocks.append(f32("nhts,nhsd->nhtd", ds, k[:, :, :end]))
    dk = dk.at[:, :, :end].add(f32("nhts,nhtd->nhsd", ds, q[:, :, start:end]))
  dq = jnp.concatenate(dq_blocks, axis=2)
  d_masks = jax.tree.map(lambda m: np.zeros(m.shape, jax.dtypes.float0), masks)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_masks


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_at(q: Array, k: Array, v: Array, select: Array, segments: Array,
                 prefixes: Array | None = None) -> Array:
  """``causal_attention``'s output at the query slots ``select [N, P]`` only.

  ``q [N, P, H, D]`` are the queries of those slots; ``k, v [N, T, Hkv, D]`` every
  slot's keys and values; ``segments``/``prefixes [N, T]`` as in ``causal_attention``.
  A pooled reward head reads one slot per sequence, so the last block needs no
  other query (``Decoder.hidden_states(select=...)``). Dense over the ``P x T``
  scores, which are few. Returns ``[N, P, H, D]``.
  """
  n, p, h, d = q.shape
  chex.assert_shape([k, v], (n, None, None, d))
  chex.assert_shape(select, (n, p))
  t, group = k.shape[1], h // k.shape[2]
  chex.assert_shape(segments, (n, t))
  q_segments = jnp.take_along_axis(segments, select, axis=1)
  keys = segments[:, None, :]
  visible = q_segments[:, :, None] == keys
  if prefixes is not None:
    visible |= jnp.take_along_axis(prefixes, select, axis=1)[:, :, None] == keys
  visible &= jnp.arange(t)[None, None, :] <= select[:, :, None]
  acc = _accumulation(q)
  q = q.reshape(n, p, k.shape[2], group, d)
  s = jnp.einsum("npkgd,ntkd->nkgpt", q, k, preferred_element_type=acc) * d ** -0.5
  s = jnp.where(visible[:, None, None], s, _MASKED)
  probs = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("nkgpt,ntkd->npkgd", probs.astype(v.dtype), v, preferred_element_type=acc)
  return out.reshape(n, p, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------------- tiled
# Packed rows hold many short sequences, so most (query block, key block) tiles below
# the diagonal hold no visible score at all. The tiled kernel visits tiles one by one
# with an online softmax (Dao et al., Alg. 1) and skips, at run time (``lax.cond``), every
# tile that no real query of its query block can see; the backward skips the same tiles.


def _group_starts(masks: tuple[Array, Array | None]) -> Array:
  """``[N, T]`` first slot of the run of tokens sharing each token's group (its prefix
  id if given, else its segment id): no key before it is visible to the token."""
  segments, prefixes = masks
  return seg.run_starts(segments if prefixes is None else prefixes)


def _reach(masks, blocks) -> Array:
  """``[num_blocks]`` int32: the earliest key a real (segment > 0) query of each block
  can see, over all rows; the row length when the block holds only padding."""
  segments = masks[0]
  lo = jnp.where(segments > 0, _group_starts(masks), segments.shape[1])
  return jnp.stack([jnp.min(lo[:, s:e]) for s, e in blocks])


def _visits(masks, blocks) -> Array:
  """``[num_blocks, num_blocks]`` bool: the (query block, key block) tiles the tiled
  kernel computes. Every diagonal tile; a tile below it when a real query of its block,
  in any row, can see one of its keys (one conditional covers all rows); none above."""
  reach = _reach(masks, blocks)
  ends = jnp.array([e for _, e in blocks])
  below = jnp.asarray(np.tril(np.ones((len(blocks),) * 2, bool), -1))
  return jnp.eye(len(blocks), dtype=bool) | (below & (reach[:, None] < ends[None, :]))


def computed_pairs(segments: Array, prefixes: Array | None = None, *,
                   tiled: bool = False, block_size: int | None = None,
                   max_blocks: int = DEFAULT_MAX_BLOCKS) -> int:
  """(query, key) score pairs ``causal_attention`` computes per head, summed over rows.

  Block-causal (``tiled=False``): query block ``[s, e)`` scores keys ``[0, e)``. Tiled:
  the pairs of every tile it visits (``_visits``), decided at run time from the masks.
  Counts what the kernel does, masked pairs included, to set beside the visible pairs
  a FLOP count credits (``benchmarks.run``). ``segments``/``prefixes [N, T]`` as in
  ``causal_attention``; concrete arrays.
  """
  n, t = segments.shape
  if block_size is None:
    block_size = DEFAULT_TILE_SIZE if tiled else DEFAULT_BLOCK_SIZE
  blocks = query_blocks(t, block_size, max_blocks)
  widths = np.array([e - s for s, e in blocks])
  if not tiled:
    return int(n * sum(w * e for w, (_, e) in zip(widths, blocks)))
  masks = (jnp.asarray(segments, jnp.int32),
           None if prefixes is None else jnp.asarray(prefixes, jnp.int32))
  visits = np.asarray(_visits(masks, blocks))
  return int(n * np.sum(visits * np.outer(widths, widths)))


def _maybe(needed: Array | None, fn, state, tiles):
  """``fn(state, tiles)`` on the diagonal (``needed`` None), else only where ``needed``.

  The tiles (slices of ``q, k, v``, ...) are cut before the conditional, not inside it:
  the kernel's ``[N, H, T, D]`` inputs are transposed views that XLA CPU lays out
  ``[N, T, H, D]``, and a branch that slices them first copied each whole array into
  its own layout, three 4 MB copies per visited tile on ``rm_step_hh`` (4-5% of its
  step; benchmarks/RESULTS.md).
  """
  if needed is None:
    return fn(state, tiles)
  return jax.lax.cond(needed, fn, lambda state, _: state, state, tiles)


def _tiled_forward(q, k, v, masks, blocks, visits):
  acc = _accumulation(q)
  outs, lses = [], []
  for i, (qs, qe) in enumerate(blocks):
    shape = q.shape[:2] + (qe - qs,)
    state = (jnp.full(shape + (1,), _MASKED, acc), jnp.zeros(shape + (1,), acc),
             jnp.zeros(shape + (q.shape[3],), acc))
    for j, (ks, ke) in enumerate(blocks[:i + 1]):
      def update(state, tiles, qs=qs, qe=qe, ks=ks, ke=ke):
        (m, total, o), (q_i, k_j, v_j) = state, tiles
        s = _tile_scores(q_i, k_j, masks, qs, qe, ks, ke)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        # A row with nothing visible yet carries m = _MASKED and weights exp(0) = 1;
        # the first visible score rescales that by exp(_MASKED - m) = 0.
        shrink, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
        o = o * shrink + jnp.einsum("nhts,nhsd->nhtd", p.astype(v_j.dtype), v_j,
                                    preferred_element_type=acc)
        return m_new, total * shrink + jnp.sum(p, axis=-1, keepdims=True), o
      state = _maybe(None if j == i else visits[i, j], update, state,
                     (q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke]))
    m, total, o = state
    outs.append((o / total).astype(q.dtype))
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_attention(q, k, v, masks, blocks):
  return _tiled_forward(q, k, v, masks, blocks, _visits(masks, blocks))[0]


def _tiled_attention_fwd(q, k, v, masks, blocks):
  visits = _visits(masks, blocks)
  out, lse = _named(*_tiled_forward(q, k, v, masks, blocks, visits))
  return out, (q, k, v, masks, visits, out, lse)


def _tiled_attention_bwd(blocks, residuals, d_out):
  q, k, v, masks, visits, out, lse = residuals
  scale, acc = q.shape[-1] ** -0.5, _accumulation(q)
  f32 = functools.partial(jnp.einsum, preferred_element_type=acc)
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), -1, keepdims=True)
  key_grads = [(jnp.zeros(k.shape[:2] + (e - s, k.shape[3]), acc),) * 2 for s, e in blocks]
  dq_blocks = []
  for i, (qs, qe) in enumerate(blocks):
    dq = jnp.zeros(q.shape[:2] + (qe - qs, q.shape[3]), acc)
    rows = (q[:, :, qs:qe], d_out[:, :, qs:qe], lse[:, :, qs:qe], delta[:, :, qs:qe])
    for j, (ks, ke) in enumerate(blocks[:i + 1]):
      def grad(state, tiles, qs=qs, qe=qe, ks=ks, ke=ke):
        (dq, dk, dv), (q_i, do, lse_i, delta_i, k_j, v_j) = state, tiles
        p = jnp.exp(_tile_scores(q_i, k_j, masks, qs, qe, ks, ke) - lse_i)
        dv = dv + f32("nhts,nhtd->nhsd", p.astype(do.dtype), do)
        dp = f32("nhtd,nhsd->nhts", do, v_j)
        ds = (p * (dp - delta_i) * scale).astype(q_i.dtype)
        return dq + f32("nhts,nhsd->nhtd", ds, k_j), dk + f32(
            "nhts,nhtd->nhsd", ds, q_i), dv
      dq, *key_grads[j] = _maybe(None if j == i else visits[i, j], grad,
                                 (dq, *key_grads[j]), rows + (k[:, :, ks:ke], v[:, :, ks:ke]))
    dq_blocks.append(dq)
  dk = jnp.concatenate([g[0] for g in key_grads], axis=2)
  dv = jnp.concatenate([g[1] for g in key_grads], axis=2)
  d_masks = jax.tree.map(lambda m: np.zeros(m.shape, jax.dtypes.float0), masks)
  return (jnp.concatenate(dq_blocks, axis=2).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), d_masks)


_tiled_attention.defvjp(_tiled_attention_fwd, _tiled_attention_bwd)
