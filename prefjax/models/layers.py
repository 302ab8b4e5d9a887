"""Building blocks of the decoder: norms, rotary embeddings, attention and MLPs.

Everything here is Flax NNX. Parameter names follow Hugging Face's Llama/GPT-2
modules so that checkpoint import is a renaming, not a re-layout:
``Norm`` holds ``scale`` (and ``bias`` for LayerNorm); ``Attention`` holds
``{q,k,v,o}_proj`` (``nnx.Linear``: ``kernel [in, out]``, optional ``bias``);
``MLP`` holds ``gate_proj``/``up_proj``/``down_proj`` (SwiGLU) or
``up_proj``/``down_proj`` (GELU, GPT-2's ``c_fc``/``c_proj``).

Attention masks are built from two rules only: a key is visible to a query when
its slot index is not after the query's slot index (causality) and both carry
the same segment id. Padded batches use the attention mask as the segment id
(1 = real, 0 = padding), packed batches their ``segment_ids``, and the KV cache
stores the segment id of every cached slot. Padding queries therefore attend to
padding keys only (never an empty row, so no NaN), and real tokens never see
padding or another packed sequence. Without a cache, attention runs block-causal
with a recomputing backward (``prefjax.models.attention``); with a cache, it
applies the mask explicitly over the heads-first cache (``cached_attention``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from prefjax.models import attention as attention_lib

Array = jax.Array
DType = Any


class Norm(nnx.Module):
  """RMSNorm (Llama) or LayerNorm (GPT-2), always computed in float32.

  RMSNorm: ``x / sqrt(mean(x^2) + eps) * scale``;
  LayerNorm: ``(x - mean) / sqrt(var + eps) * scale + bias``.
  The output is cast back to the compute dtype.
  """

  def __init__(self, features: int, *, kind: str, eps: float, dtype: DType,
               param_dtype: DType):
    if kind not in ("rms", "layer"):
      raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
    self.kind = kind
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    if kind == "layer":
      self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "rms":
      x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
      out = x32 * self.scale[...].astype(jnp.float32)
    else:
      mean = jnp.mean(x32, -1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
      x32 = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
      out = x32 * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """``(cos, sin)`` of the rotary angles, ``[N, T, 1, head_dim]`` float32, for ``rope``."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def materialized_rope_tables(positions: Array, head_dim: int,
                             theta: float) -> tuple[Array, Array]:
  """``rope_tables``, computed once: on CPU inside a ``lax.cond`` whose two branches are
  the same function, so the result does not depend on the predicate.

  XLA CPU fuses ``cos``/``sin`` into every rotation that reads them and recomputes both
  for each head (and ``optimization_barrier`` is gone before fusion). A conditional is a
  boundary fusion cannot cross. Measured 2026-12-02 at [2, 1024, 8, 64]: 12 rotations
  and their gradient 35 + 60 ms fused, 6 + 5 ms from the conditional's tables. Elsewhere
  (GPU, TPU) the recomputation is cheap and a conditional would cost a host sync.
  """
  if jax.default_backend() != "cpu":
    return rope_tables(positions, head_dim, theta)
  tables = functools.partial(rope_tables, head_dim=head_dim, theta=theta)
  return jax.lax.cond(positions[0, 0] > 0, tables, tables, positions)


def rope(x: Array, tables: tuple[Array, Array]) -> Array:
  """Rotary position embedding, Hugging Face "rotate half" layout.

  RoFormer: Enhanced Transformer with Rotary Position Embedding (arXiv:2104.09864).
  ``x [N, T, H, D]``, ``tables`` from ``rope_tables``; computed in float32.
  """
  cos, sin = tables
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask_from_segments(q_segments: Array, kv_segments: Array,
                                 q_index: Array, kv_index: Array) -> Array:
  """``[N, Tq, Tk]`` bool: causal in slot index and within the same segment."""
  causal = kv_index[None, None, :] <= q_index[None, :, None]
  same = q_segments[:, :, None] == kv_segments[:, None, :]
  return causal & same


@dataclasses.dataclass(frozen=True)
class AttentionDims:
  hidden_size: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


class Attention(nnx.Module):
  """Multi-head causal self-attention with grouped-query heads (GQA).

  GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
  Checkpoints (arXiv:2305.13245). Scores and softmax are float32.
  """

  def __init__(self, dims: AttentionDims, *, use_bias: bool, out_bias: bool,
               rope_theta: float | None, dtype: DType, param_dtype: DType,
               rngs: nnx.Rngs):
    if dims.num_heads % dims.num_kv_heads:
      raise ValueError(f"num_heads={dims.num_heads} is not a multiple of "
                       f"num_kv_heads={dims.num_kv_heads}")
    self.dims = dims
    self.rope_theta = rope_theta
    linear = lambda i, o, b: nnx.Linear(i, o, use_bias=b, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)
    d, h, kv, hd = dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim
    self.q_proj = linear(d, h * hd, use_bias)
    self.k_proj = linear(d, kv * hd, use_bias)
    self.v_proj = linear(d, kv * hd, use_bias)
    self.o_proj = linear(h * hd, d, out_bias)

  def __call__(self, x: Array, *, positions: Array, segments: Array,
               cache: tuple[Array, Array, Array, Array] | None = None,
               prefixes: Array | None = None, tiled: bool = False, keep_kv: bool = False,
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """Self-attention over ``x [N, T, D]``; ``prefixes`` and ``tiled``: see
    ``attention.causal_attention``.

    Without a cache the keys are the T new tokens. With ``cache = (keys [N,
    Hkv, S, Dh], values, kv_segments [N, S] (already updated), index [])`` the new
    keys/values are written at slots ``index .. index+T-1`` and the queries see
    every cached slot up to their own. Returns ``(out [N, T, D], (keys,
    values))``: the updated cache, or without one the new tokens' rotated keys and
    values ``[N, T, Hkv, Dh]`` when ``keep_kv`` (a prefill), else None.
    """
    n, t, _ = x.shape
    dims = self.dims
    q = _heads(self.q_proj, x, dims.num_heads)
    k = _heads(self.k_proj, x, dims.num_kv_heads)
    v = _heads(self.v_proj, x, dims.num_kv_heads)
    if self.rope_theta is not None:
      tables = materialized_rope_tables(positions, dims.head_dim, self.rope_theta)
      q, k = rope(q, tables), rope(k, tables)
    if cache is None:
      out = attention_lib.causal_attention(q, k, v, segments, prefixes, tiled=tiled)
      new_cache = (k, v) if keep_kv else None
    elif prefixes is not None:
      raise ValueError("prefix segments (shared-prompt pairs) are for full-sequence "
                       "forwards, not KV-cache decoding")
    else:
      cache_k, cache_v, kv_segments, start = cache
      heads_first = lambda x, like: x.transpose(0, 2, 1, 3).astype(like.dtype)
      zero = jnp.zeros((), jnp.asarray(start).dtype)
      k = jax.lax.dynamic_update_slice(cache_k, heads_first(k, cache_k), (zero, zero, start, zero))
      v = jax.lax.dynamic_update_slice(cache_v, heads_first(v, cache_v), (zero, zero, start, zero))
      q_index = start + jnp.arange(t, dtype=jnp.int32)
      kv_index = jnp.arange(k.shape[2], dtype=jnp.int32)
      mask = attention_mask_from_segments(segments, kv_segments, q_index, kv_index)
      out = cached_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
      new_cache = (k, v)
    out = self.o_proj(out.reshape(n * t, dims.num_heads * dims.head_dim))
    return out.reshape(n, t, -1), new_cache

  def at(self, x: Array, select: Array, *, positions: Array, segments: Array,
         prefixes: Array | None = None) -> Array:
    """The self-attention output at slots ``select [N, P]`` only: ``[N, P, D]``.

    Keys and values come from all of ``x [N, T, D]``; queries only from the
    selected slots (``attention.attention_at``).
    """
    dims = self.dims
    k = _heads(self.k_proj, x, dims.num_kv_heads)
    v = _heads(self.v_proj, x, dims.num_kv_heads)
    q = _heads(self.q_proj, take_slots(x, select), dims.num_heads)
    if self.rope_theta is not None:
      tables = materialized_rope_tables(positions, dims.head_dim, self.rope_theta)
      q, k = rope(q, tuple(take_slots(table, select) for table in tables)), rope(k, tables)
    n, p = select.shape
    out = attention_lib.attention_at(q, k, v, select, segments, prefixes)
    return self.o_proj(out.reshape(n * p, -1)).reshape(n, p, -1)


def take_slots(x: Array, select: Array) -> Array:
  """``x [N, T, ...]`` at slots ``select [N, P]`` -> ``[N, P, ...]``."""
  index = select.reshape(select.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _heads(linear: nnx.Linear, x: Array, num_heads: int) -> Array:
  """``linear`` over ``x [N, T, D]`` as one 2-D dot (XLA CPU runs ``[N·T, D]`` dots much
  faster than rank-3 ones), split into ``[N, T, num_heads, -1]``."""
  n, t, _ = x.shape
  return linear(x.reshape(n * t, -1)).reshape(n, t, num_heads, -1)


def masked_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Softmax attention under an explicit ``mask [N, T, S]``; ``q [N,T,H,D]``, ``k, v [N,S,Hkv,D]``.

  The reference the block-causal ``attention.causal_attention`` is tested against.
  """
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  return cached_attention(q, heads_first(k), heads_first(v), mask)


def cached_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """``masked_attention`` with heads-first keys and values ``[N, Hkv, S, D]`` (the KV cache layout).

  Heads before slots make both products plain batched matmuls over (row, kv
  head) with no transpose of the cache. With slots before heads, the decode
  step's ``[1, D] x [D, S]`` products ran ~30x slower on XLA CPU (2026-12-01,
  batch 64, 8 heads, 192 slots: 100 ms against 3.3 ms per layer).

  One row and one new token (batch-1 decoding) multiply and sum instead, on CPU:
  around those one-row products XLA CPU copied and transposed every layer's cache
  at every step, ~14% of a batch-1 decoding call of the 25M decoder
  (``benchmarks/RESULTS.md``).
  """
  n, t, h, d = q.shape
  kv_heads = k.shape[1]
  chex.assert_equal((k.shape[0], k.shape[2]), (n, mask.shape[-1]))
  q = q.reshape(n, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [N, K, G, T, D]
  one_query = n * t == 1 and jax.default_backend() == "cpu"
  slots = lambda x: x[:, :, None, None]  # [N, K, 1, 1, S, D] against [N, K, G, T, S, ...]
  if one_query:
    scores = jnp.sum(q[..., None, :].astype(jnp.float32) * slots(k).astype(jnp.float32), -1)
  else:
    scores = jnp.einsum("nkgtd,nksd->nkgts", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores / jnp.sqrt(jnp.float32(d)),
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if one_query:
    out = jnp.sum(probs[..., None] * slots(v), axis=-2)
  else:
    out = jnp.einsum("nkgts,nksd->nkgtd", probs, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(n, t, h, d)


class MLP(nnx.Module):
  """SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu_tanh(up(x)))``.

  SwiGLU: GLU Variants Improve Transformer (arXiv:2002.05202). GPT-2's
  activation is the tanh approximation of GELU (HF "gelu_new").
  """

  def __init__(self, hidden_size: int, intermediate_size: int, *, kind: str,
               use_bias: bool, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
    if kind not in ("swiglu", "gelu"):
      raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {kind!r}")
    self.kind = kind
    linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    if kind == "swiglu":
      self.gate_proj = linear(hidden_size, intermediate_size)
    self.up_proj = linear(hidden_size, intermediate_size)
    self.down_proj = linear(intermediate_size, hidden_size)

  def __call__(self, x: Array) -> Array:
    rows = x.reshape(-1, x.shape[-1])  # 2-D dots, as in Attention
    if self.kind == "swiglu":
      hidden = jax.nn.silu(self.gate_proj(rows)) * self.up_proj(rows)
    else:
      hidden = jax.nn.gelu(self.up_proj(rows), approximate=True)
    return self.down_proj(hidden).reshape(x.shape[:-1] + (-1,))
