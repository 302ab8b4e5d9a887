"""Exact causal self-attention computed in query blocks, with a recomputing backward.

``causal_attention`` is softmax attention under the two masking rules of
``prefjax.models.layers`` (a key is visible when it is not after the query and
carries the same segment id), computed so that the work and the memory follow
the causal triangle rather than the full ``T x T`` square:

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

Array = jax.Array

DEFAULT_BLOCK_SIZE = 128
DEFAULT_MAX_BLOCKS = 8
_MASKED = -1e30  # finite: a fully masked row cannot occur (a query always sees itself)


def query_blocks(length: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_blocks: int = DEFAULT_MAX_BLOCKS) -> tuple[tuple[int, int], ...]:
  """``(start, end)`` of each query block: ``block_size`` wide, at most ``max_blocks`` of them."""
  if length < 1 or block_size < 1 or max_blocks < 1:
    raise ValueError(f"need length, block_size, max_blocks >= 1; got {length}, "
                     f"{block_size}, {max_blocks}")
  width = max(block_size, math.ceil(length / max_blocks))
  return tuple((s, min(s + width, length)) for s in range(0, length, width))


def causal_attention(q: Array, k: Array, v: Array, segments: Array, *,
                     block_size: int = DEFAULT_BLOCK_SIZE,
                     max_blocks: int = DEFAULT_MAX_BLOCKS) -> Array:
  """Causal, segment-masked softmax attention; ``q [N,T,H,D]``, ``k, v [N,T,Hkv,D]``.

  ``segments [N, T]`` int: tokens attend only to earlier-or-same slots with the
  same id (padding rows use the attention mask as the id). Returns ``[N, T, H, D]``.
  """
  n, t, h, d = q.shape
  chex.assert_shape([k, v], (n, t, None, d))
  chex.assert_shape(segments, (n, t))
  group = h // k.shape[2]
  if group * k.shape[2] != h:
    raise ValueError(f"{h} query heads are not a multiple of {k.shape[2]} key heads")
  if group > 1:
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  to_bhtd = lambda x: x.transpose(0, 2, 1, 3)
  blocks = query_blocks(t, block_size, max_blocks)
  out = _attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), segments.astype(jnp.int32), blocks)
  return to_bhtd(out)


def _visible(segments: Array, start: int, end: int) -> Array:
  """``[N, 1, end-start, end]`` bool: causal and same-segment for queries ``[start, end)``."""
  q_index = np.arange(start, end)[:, None]
  causal = np.arange(end)[None, :] <= q_index
  same = segments[:, start:end, None] == segments[:, None, :end]
  return (same & causal)[:, None]


def _accumulation(x: Array) -> jnp.dtype:
  """float32, or float64 when the inputs are (tests against float64 references)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _scores(q: Array, k: Array, segments: Array, start: int, end: int) -> Array:
  """Scaled, masked float32 scores of queries ``[start, end)`` against keys ``[0, end)``."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("nhtd,nhsd->nhts", q[:, :, start:end], k[:, :, :end],
                 preferred_element_type=_accumulation(q)) * scale
  return jnp.where(_visible(segments, start, end), s, _MASKED)


def _forward(q, k, v, segments, blocks):
  outs, lses = [], []
  for start, end in blocks:
    s = _scores(q, k, segments, start, end)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("nhts,nhsd->nhtd", p.astype(v.dtype), v[:, :, :end],
                   preferred_element_type=_accumulation(q)) / total
    outs.append(o.astype(q.dtype))
    lses.append(m + jnp.log(total))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segments, blocks):
  return _forward(q, k, v, segments, blocks)[0]


def _attention_fwd(q, k, v, segments, blocks):
  out, lse = _forward(q, k, v, segments, blocks)
  return out, (q, k, v, segments, out, lse)


def _attention_bwd(blocks, residuals, d_out):
  q, k, v, segments, out, lse = residuals
  scale = q.shape[-1] ** -0.5
  acc = _accumulation(q)
  f32 = functools.partial(jnp.einsum, preferred_element_type=acc)
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), -1, keepdims=True)
  dq_blocks = []
  dk = jnp.zeros(k.shape, acc)
  dv = jnp.zeros(v.shape, acc)
  for start, end in blocks:
    p = jnp.exp(_scores(q, k, segments, start, end) - lse[:, :, start:end])
    do = d_out[:, :, start:end]
    dv = dv.at[:, :, :end].add(f32("nhts,nhtd->nhsd", p.astype(do.dtype), do))
    dp = f32("nhtd,nhsd->nhts", do, v[:, :, :end])
    ds = (p * (dp - delta[:, :, start:end]) * scale).astype(q.dtype)
    dq_blocks.append(f32("nhts,nhsd->nhtd", ds, k[:, :, :end]))
    dk = dk.at[:, :, :end].add(f32("nhts,nhtd->nhsd", ds, q[:, :, start:end]))
  dq = jnp.concatenate(dq_blocks, axis=2)
  d_segments = np.zeros(segments.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_segments


_attention.defvjp(_attention_fwd, _attention_bwd)
