"""Per-sequence reductions for padded and packed token batches.

Padded rows hold one sequence each (``attention_mask`` 1 on real tokens).
Packed rows hold several sequences: ``segment_ids`` numbers them 1..S within the
row and 0 marks padding. Every reduction below returns ``[R, S + 1]`` for packed
input, where column ``s`` belongs to segment ``s`` and column 0 (padding) is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def continues_run(ids: jax.Array) -> jax.Array:
  """``[N, T] -> [N, T]`` bool: the token has the id of the slot before it (False at the
  first slot of each run, e.g. a packed segment's first token)."""
  prev = jnp.pad(ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return ids == prev


def run_starts(ids: jax.Array) -> jax.Array:
  """``[N, T] -> [N, T]``: the first slot of the run of equal ids that holds each token
  (a packed segment's start)."""
  idx = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
  return jax.lax.cummax(jnp.where(continues_run(ids), 0, idx), axis=1)


def positions_in_segments(segment_ids: jax.Array) -> jax.Array:
  """``[N, T] -> [N, T]``: each token's offset within its packed segment (restarting
  where the id changes); 0 on padding (id 0), as the pipeline writes it, so that a long
  padding tail never indexes past a learned position table (NaN, which attention then
  spreads to real tokens through its zero weights)."""
  offsets = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32) - run_starts(segment_ids)
  return jnp.where(segment_ids > 0, offsets, 0)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """Index of the last real token of each padded row ``[N, T] -> [N]``.

  Works for right padding and left padding alike (it is the largest index
  whose mask is set); rows with no real token give index 0.
  """
  t = attention_mask.shape[-1]
  idx = jnp.arange(t, dtype=jnp.int32)
  return jnp.max(jnp.where(attention_mask > 0, idx, 0), axis=-1)


def segment_one_hot(segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """``[R, L] -> [R, L, S + 1]`` float32 one-hot of the segment id of every token."""
  return jax.nn.one_hot(segment_ids, num_segments + 1, dtype=jnp.float32)


# A sum of log-probs over hundreds of tokens as a product with a one-hot: at the default
# precision a GPU rounds the float32 summands to TF32 (a TPU to bfloat16) first.
EXACT = jax.lax.Precision.HIGHEST


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Sum of ``values [R, L]`` within each segment -> ``[R, S + 1]`` (column 0 zeroed), in
  float32 on every backend (``EXACT``)."""
  sums = jnp.einsum("rl,rls->rs", values.astype(jnp.float32),
                    segment_one_hot(segment_ids, num_segments), precision=EXACT)
  return sums.at[:, 0].set(0.0)


def segment_counts(segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Number of tokens of each segment -> ``[R, S + 1]`` (column 0 zeroed)."""
  return segment_sums(jnp.ones(segment_ids.shape, jnp.float32), segment_ids, num_segments)


def segment_last_index(segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Index of the last token of each segment -> ``[R, S + 1]`` int32 (absent segments give 0)."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)[None, :, None]
  member = segment_one_hot(segment_ids, num_segments) > 0
  last = jnp.max(jnp.where(member, idx, 0), axis=1)
  return last.at[:, 0].set(0)


def segment_first_index(segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Index of the first token of each segment -> ``[R, S + 1]`` int32 (absent segments give 0)."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)[None, :, None]
  member = segment_one_hot(segment_ids, num_segments) > 0
  first = jnp.min(jnp.where(member, idx, length), axis=1)
  first = jnp.where(first == length, 0, first)
  return first.at[:, 0].set(0)


def gather_pairs(per_segment: jax.Array, index: jax.Array) -> jax.Array:
  """Picks per-segment values for pairs: ``per_segment [R, S+1]``, ``index [B, 2]`` (row, segment) -> ``[B]``."""
  return per_segment[index[:, 0], index[:, 1]]
