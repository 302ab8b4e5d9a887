"""Causal decoder for the Llama/SmolLM2 and GPT-2 families (Flax NNX).

One ``Decoder`` covers both families through ``DecoderConfig``: RMSNorm or
LayerNorm, SwiGLU or GELU MLP, rotary or learned positions, grouped-query
attention, tied or untied output embedding, optional biases.

Parameter tree (``nnx.state(model)`` paths, kernels are ``[in, out]``)::

  embed/embedding                           [V, D]
  pos_embed/embedding                       [max_position_embeddings, D]  (position="learned")
  layers/{i}/input_norm/scale               [D]      (+ /bias for norm="layer")
  layers/{i}/attn/{q,k,v}_proj/kernel       [D, H*Dh] / [D, Hkv*Dh]  (+ /bias if attention_bias)
  layers/{i}/attn/o_proj/kernel             [H*Dh, D]                (+ /bias for GPT-2)
  layers/{i}/post_attn_norm/scale           [D]      (+ /bias)
  layers/{i}/mlp/gate_proj/kernel           [D, F]   (mlp="swiglu" only)
  layers/{i}/mlp/up_proj/kernel             [D, F]   (+ /bias if mlp_bias)
  layers/{i}/mlp/down_proj/kernel           [F, D]   (+ /bias if mlp_bias)
  final_norm/scale                          [D]      (+ /bias)
  lm_head/kernel                            [D, V]   (tie_embeddings=False only)

HF Llama maps one-to-one (``input_layernorm`` -> ``input_norm``,
``post_attention_layernorm`` -> ``post_attn_norm``, ``model.norm`` ->
``final_norm``, kernels transposed). GPT-2's fused ``c_attn`` splits into
q/k/v, ``c_proj`` -> ``o_proj``, ``mlp.c_fc``/``mlp.c_proj`` ->
``up_proj``/``down_proj``, ``ln_1``/``ln_2``/``ln_f`` -> the three norms, ``wte``
-> ``embed``, ``wpe`` -> ``pos_embed`` (GPT-2 Conv1D weights are already
``[in, out]``). Layers are an ``nnx.List`` of blocks so that paths are readable
and per-layer surgery is easy; ``scan_layers`` scans them in the forward pass.

Generation uses ``prefill`` (the prompts, through the training kernel, into a new
cache) and ``extend`` (more tokens into a cache; ``init_cache`` makes an empty one).
The cache holds per-layer keys and values ``[B, Hkv, S, Dh]`` (heads first: see
``layers.cached_attention``), the segment id of every slot (1 real, 0 empty or
padding) and the next slot to write; see ``KVCache``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefjax.models import layers
from prefjax.models import segments as seg
from prefjax.models import stack

Array = jax.Array
DType = Any


default_compute_dtype = stack.default_compute_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a causal decoder. ``head_dim`` defaults to hidden/heads."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  intermediate_size: int | None = None
  max_position_embeddings: int = 2048
  norm: str = "rms"
  norm_eps: float = 1e-5
  mlp: str = "swiglu"
  position: str = "rope"
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  attention_bias: bool = False
  attention_out_bias: bool | None = None
  mlp_bias: bool = False
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} not divisible by "
                         f"num_heads={self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.intermediate_size is None:
      object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
    if self.attention_out_bias is None:
      object.__setattr__(self, "attention_out_bias", self.attention_bias)
    for field, allowed in (("norm", ("rms", "layer")), ("mlp", ("swiglu", "gelu")),
                           ("position", ("rope", "learned"))):
      if getattr(self, field) not in allowed:
        raise ValueError(f"DecoderConfig.{field} must be one of {allowed}, "
                         f"got {getattr(self, field)!r}")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

  def replace(self, **overrides) -> "DecoderConfig":
    return dataclasses.replace(self, **overrides)

  @property
  def position_limit(self) -> int | None:
    """The longest sequence the learned position table holds; None for RoPE (no table)."""
    return self.max_position_embeddings if self.position == "learned" else None

  @classmethod
  def llama(cls, **overrides) -> "DecoderConfig":
    """Hugging Face ``LlamaConfig``'s defaults (Llama-2-7B sizes, RMSNorm eps 1e-6, untied).

    The base for a custom-size Llama: override the sizes, e.g. from a config
    ``model.preset="llama"`` with ``model.overrides=dict(hidden_size=512, ...)``.
    """
    base = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                num_kv_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                norm="rms", norm_eps=1e-6, mlp="swiglu", position="rope",
                rope_theta=10000.0, tie_embeddings=False, bos_id=1, eos_id=2)
    return cls(**{**base, **overrides})

  @classmethod
  def tiny_llama(cls, **overrides) -> "DecoderConfig":
    """A small Llama-style config for tests (GQA, SwiGLU, RMSNorm, RoPE)."""
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, intermediate_size=64, max_position_embeddings=128,
                norm="rms", norm_eps=1e-5, mlp="swiglu", position="rope",
                rope_theta=10000.0, tie_embeddings=False)
    return cls(**{**base, **overrides})

  @classmethod
  def tiny_gpt2(cls, **overrides) -> "DecoderConfig":
    """A small GPT-2-style config (LayerNorm, GELU-tanh, learned positions, biases, tied)."""
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=128, max_position_embeddings=128, norm="layer",
                norm_eps=1e-5, mlp="gelu", position="learned", tie_embeddings=True,
                attention_bias=True, attention_out_bias=True, mlp_bias=True)
    return cls(**{**base, **overrides})

  @classmethod
  def smollm2_135m(cls, **overrides) -> "DecoderConfig":
    """SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)."""
    base = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                num_kv_heads=3, head_dim=64, intermediate_size=1536,
                max_position_embeddings=8192, norm="rms", norm_eps=1e-5,
                mlp="swiglu", position="rope", rope_theta=100000.0,
                tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2)
    return cls(**{**base, **overrides})


# Megatron-style tensor parallelism: column-parallel q/k/v/gate/up, row-parallel
# o/down; embeddings split over the vocabulary on `tensor`, hidden on `fsdp`.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"(^|/)embed/embedding$", P("tensor", "fsdp")),
    (r"pos_embed/embedding$", P(None, "fsdp")),
    (r"attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
    (r"attn/(q|k|v)_proj/bias$", P("tensor")),
    (r"attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),
    (r"mlp/(gate|up)_proj/bias$", P("tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"norm/(scale|bias)$", P()),
]


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer plus slot bookkeeping (a pytree).

  keys, values: per layer ``[B, Hkv, S, Dh]``.
  segments: ``[B, S]`` int32 segment id of each slot (1 real token, 0 padding or empty).
  index: ``[]`` int32, the next slot to write (shared by the batch: prompts are left-padded).
  """

  keys: tuple[Array, ...]
  values: tuple[Array, ...]
  segments: Array
  index: Array

  @property
  def max_length(self) -> int:
    return self.segments.shape[1]

  def grown(self, max_length: int) -> "KVCache":
    """This cache with ``max_length`` slots, the new ones empty (appended after the old).

    Attention reads every slot of the cache, filled or not, so decoding in a
    cache that grows in phases (``sampling.generate``) reads fewer bytes.
    """
    extra = max_length - self.max_length
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of {self.max_length} slots to {max_length}")
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return KVCache(keys=tuple(map(pad, self.keys)), values=tuple(map(pad, self.values)),
                   segments=jnp.pad(self.segments, ((0, 0), (0, extra))), index=self.index)


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: DecoderConfig, *, dtype: DType, param_dtype: DType,
               rngs: nnx.Rngs):
    norm = lambda: layers.Norm(config.hidden_size, kind=config.norm, eps=config.norm_eps,
                               dtype=dtype, param_dtype=param_dtype)
    dims = layers.AttentionDims(config.hidden_size, config.num_heads,
                                config.num_kv_heads, config.head_dim)
    self.input_norm = norm()
    self.attn = layers.Attention(
        dims, use_bias=config.attention_bias, out_bias=config.attention_out_bias,
        rope_theta=config.rope_theta if config.position == "rope" else None,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attn_norm = norm()
    self.mlp = layers.MLP(config.hidden_size, config.intermediate_size, kind=config.mlp,
                          use_bias=config.mlp_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, *, positions: Array, segments: Array,
               cache: tuple[Array, Array, Array, Array] | None = None,
               prefixes: Array | None = None, tiled: bool = False, keep_kv: bool = False,
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """``x [N, T, D]`` -> (output, (keys, values) or None); see ``Attention``."""
    attn_out, new_cache = self.attn(self.input_norm(x), positions=positions,
                                    segments=segments, cache=cache, prefixes=prefixes,
                                    tiled=tiled, keep_kv=keep_kv)
    x = x + attn_out
    return x + self.mlp(self.post_attn_norm(x)), new_cache

  def at(self, x: Array, select: Array, *, positions: Array, segments: Array,
         prefixes: Array | None = None) -> Array:
    """The block's output at slots ``select [N, P]`` only: ``[N, P, D]`` (``__call__``'s
    values there; every slot still supplies keys and values)."""
    attn_out = self.attn.at(self.input_norm(x), select, positions=positions,
                            segments=segments, prefixes=prefixes)
    x = layers.take_slots(x, select) + attn_out
    return x + self.mlp(self.post_attn_norm(x))


def positions_from_mask(attention_mask: Array) -> Array:
  """Position of every real token counted from the row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.cache
def _block_forward(tiled: bool):
  """One block's forward; packed rows use the tiled attention kernel on CPU (it skips
  tiles across sequences with run-time conditionals, cheap on XLA CPU, not yet measured
  on GPU)."""
  def block_forward(block: Block, x: Array, positions: Array, segments: Array,
                    prefixes: Array | None) -> Array:
    return block(x, positions=positions, segments=segments, prefixes=prefixes, tiled=tiled)[0]
  return block_forward


class Decoder(nnx.Module):
  """Causal language model. ``__call__`` returns float32 logits ``[N, T, V]``.

  ``remat`` recomputes each block's activations in the backward pass (gradient
  checkpointing; saves memory when training long sequences): ``True`` or ``"full"``
  keeps only each block's input, ``"dots"`` also its projections' outputs (the
  norms, RoPE, attention and activations are recomputed), ``"attention"`` also the
  attention kernel's output and log-sum-exp (the projections and MLP are
  recomputed, the attention is not); ``stack.REMAT_POLICIES``. On XLA CPU it saves memory
  only with ``scan_layers``: unrolled blocks' recomputation is scheduled early.
  ``scan_layers=True`` runs the blocks as one ``lax.scan`` over their stacked
  parameters, so a program compiles one block instead of ``num_layers`` (the
  parameters stay one module per layer; the stack is built in the forward pass). It
  applies to the full-sequence forward (training, scoring); ``prefill`` and ``extend``,
  hence generation, always run the blocks unrolled.
  Both are plain attributes: a loaded model can be switched with ``model.remat = True``.
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, remat: bool | str = False,
               scan_layers: bool = False):
    stack.remat_policy(remat)
    self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    self.dtype = default_compute_dtype() if dtype is None else dtype
    d = config.hidden_size
    self.embed = nnx.Embed(config.vocab_size, d, dtype=self.dtype,
                           param_dtype=param_dtype, rngs=rngs)
    if config.position == "learned":
      self.pos_embed = nnx.Embed(config.max_position_embeddings, d, dtype=self.dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List([Block(config, dtype=self.dtype, param_dtype=param_dtype,
                                  rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = layers.Norm(d, kind=config.norm, eps=config.norm_eps,
                                  dtype=self.dtype, param_dtype=param_dtype)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(d, config.vocab_size, use_bias=False, dtype=self.dtype,
                                param_dtype=param_dtype, rngs=rngs)

  # -- full-sequence forward -------------------------------------------------

  def hidden_states(self, tokens: Array, *, attention_mask: Array | None = None,
                    segment_ids: Array | None = None,
                    positions: Array | None = None,
                    prefix_ids: Array | None = None, select: Array | None = None) -> Array:
    """Final-norm hidden states ``[N, T, D]`` for a padded or a packed batch.

    Padded: ``attention_mask [N, T]`` (right or left padding); positions default
    to the running count of real tokens. Packed: ``segment_ids [N, T]`` (0 =
    padding; each id one contiguous run of slots; takes precedence over ``attention_mask``); positions default to the
    offset within each segment. Shared-prompt packed pairs add ``prefix_ids``
    (the segment each token may also attend to, ``attention.causal_attention``)
    and need explicit ``positions``. Outputs at padding positions are finite but
    meaningless.

    ``select [N, P]`` int: return only the states at these slots, ``[N, P, D]``. The
    last block then computes queries, attention output and MLP for those slots
    alone (a pooled reward head reads one slot per sequence), the same values at a
    fraction of that block's work.
    """
    if prefix_ids is not None and (segment_ids is None or positions is None):
      raise ValueError("prefix_ids (shared-prompt pairs) need segment_ids and positions")
    if segment_ids is None and positions is None:
      self.check_positions(tokens.shape[1])
    if segment_ids is not None:
      segments = segment_ids.astype(jnp.int32)
      if positions is None:
        positions = seg.positions_in_segments(segments)
    elif attention_mask is not None:
      segments = attention_mask.astype(jnp.int32)
      if positions is None:
        positions = positions_from_mask(segments)
    else:
      segments = jnp.ones(tokens.shape, jnp.int32)
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                     tokens.shape)
    x = self._embed(tokens, positions)
    forward = _block_forward(segment_ids is not None and jax.default_backend() == "cpu")
    blocks = list(self.layers) if select is None else list(self.layers)[:-1]
    x = stack.run_blocks(forward, blocks, x, positions, segments, prefix_ids,
                         remat=self.remat, scan=self.scan_layers)
    if select is not None:
      x = self.layers[-1].at(x, select, positions=positions, segments=segments,
                             prefixes=prefix_ids)
    return self.final_norm(x)

  def __call__(self, tokens: Array, *, attention_mask: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None) -> Array:
    hidden = self.hidden_states(tokens, attention_mask=attention_mask,
                                segment_ids=segment_ids, positions=positions)
    return self.logits(hidden)

  def drop_output_head(self) -> None:
    """Deletes the untied ``lm_head`` (a reward or value head replaces it).

    The head is ``D x V`` parameters that a scalar head never reads but that the
    optimizer would still update and checkpoints would still store. Tied
    embeddings stay: they are the input embedding too.
    """
    if not self.config.tie_embeddings and hasattr(self, "lm_head"):
      del self.lm_head

  def output_kernel(self) -> Array:
    """The ``[D, V]`` output projection: the embedding transposed when tied."""
    if self.config.tie_embeddings:
      return self.embed.embedding[...].T
    if hasattr(self, "lm_head"):
      return self.lm_head.kernel[...]
    raise ValueError("this decoder has no output head: drop_output_head() removed it "
                     "when a reward/value head was attached")

  def logits(self, hidden: Array, kernel: Array | None = None) -> Array:
    """Output projection of hidden states, accumulated in float32.

    ``kernel``: ``output_kernel()`` computed once by a caller that projects many
    times (the decoding loop), so that a tied embedding is transposed once.
    """
    kernel = self.output_kernel() if kernel is None else kernel
    rows = hidden.reshape(-1, hidden.shape[-1])  # a 2-D dot: much faster on XLA CPU
    logits = jnp.dot(rows, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return logits.reshape(hidden.shape[:-1] + (-1,))

  def check_positions(self, length: int) -> None:
    """Learned position embeddings have ``max_position_embeddings`` rows; a longer
    sequence would read past them (NaN that spreads through attention), so it is an
    error, as in Hugging Face. RoPE has no such table."""
    limit = self.config.position_limit
    if limit is not None and length > limit:
      raise ValueError(f"a sequence of {length} tokens exceeds this decoder's "
                       f"{limit} learned positions (max_position_embeddings)")

  def _embed(self, tokens: Array, positions: Array) -> Array:
    x = self.embed(tokens.astype(jnp.int32))
    if self.config.position == "learned":
      x = x + self.pos_embed(positions)
    return x

  # -- incremental decoding --------------------------------------------------

  def init_cache(self, batch: int, max_length: int, dtype: DType | None = None) -> KVCache:
    """An empty cache of ``max_length`` slots for ``batch`` rows."""
    c = self.config
    shape = (batch, c.num_kv_heads, max_length, c.head_dim)
    dtype = self.dtype if dtype is None else dtype
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                   segments=jnp.zeros((batch, max_length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

  def prefill(self, tokens: Array, max_length: int, *, attention_mask: Array | None = None,
              output_kernel: Array | None = None) -> tuple[Array, KVCache]:
    """Starts decoding: runs the prompts ``tokens [B, T]`` into a new cache of
    ``max_length >= T`` slots; returns the last token's float32 logits ``[B, 1, V]``
    and the cache (``index = T``).

    The same values as ``extend`` on an empty cache with ``last_only``, but the
    prompts attend to each other through ``attention.causal_attention``, the kernel
    of training and scoring (query blocks, no ``[B, H, T, max_length]`` score
    tensor) instead of every cache slot. ``attention_mask [B, T]``: 1 on real
    tokens of the LEFT-padded prompts.
    """
    b, t = tokens.shape
    if t > max_length:
      raise ValueError(f"a cache of {max_length} slots cannot hold {t} prompt tokens")
    segments = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                else attention_mask.astype(jnp.int32))
    positions = positions_from_mask(segments)
    x = self._embed(tokens, positions)
    heads_first = lambda y: y.transpose(0, 2, 1, 3).astype(self.dtype)  # as init_cache
    keys, values = [], []
    for block in self.layers:
      x, (k, v) = block(x, positions=positions, segments=segments, keep_kv=True)
      keys.append(heads_first(k))
      values.append(heads_first(v))
    logits = self.logits(self.final_norm(x[:, -1:]), output_kernel)
    full = KVCache(keys=tuple(keys), values=tuple(values), segments=segments,
                   index=jnp.asarray(t, jnp.int32))
    return logits, full.grown(max_length)

  def extend(self, tokens: Array, cache: KVCache, *, attention_mask: Array | None = None,
             positions: Array | None = None, last_only: bool = False,
             output_kernel: Array | None = None) -> tuple[Array, KVCache]:
    """Runs ``tokens [B, T]`` at cache slots ``index .. index+T-1``.

    ``attention_mask [B, T]`` marks which new tokens are real (left-padded
    prompts, rows that finished generating); masked tokens are cached as
    padding and never seen by real tokens. ``positions`` default to the number of
    real tokens already cached plus the running count of real new tokens.
    Returns float32 logits ``[B, T, V]`` (``[B, 1, V]`` of the last token when
    ``last_only``, e.g. for a prefill) and the updated cache. The caller sizes
    the cache: ``index + T`` must not exceed ``max_length``; the slot index is
    traced, so an overflow cannot raise here (``dynamic_update_slice`` would clamp
    the write onto the last slots): its logits are NaN instead, and stay so for
    every later step. ``output_kernel``: see ``logits``.
    """
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    segments = attention_mask.astype(jnp.int32)
    if positions is None:
      past = jnp.sum(cache.segments, axis=1, keepdims=True)
      positions = past + positions_from_mask(segments)
    zero = jnp.zeros((), cache.index.dtype)  # indices of one dtype (x64 makes 0 an int64)
    kv_segments = jax.lax.dynamic_update_slice(cache.segments, segments, (zero, cache.index))
    x = self._embed(tokens, positions)
    keys, values = [], []
    for i, block in enumerate(self.layers):
      layer_cache = (cache.keys[i], cache.values[i], kv_segments, cache.index)
      x, (k, v) = block(x, positions=positions, segments=segments, cache=layer_cache)
      keys.append(k)
      values.append(v)
    if last_only:
      x = x[:, -1:]
    logits = self.logits(self.final_norm(x), output_kernel)
    logits = jnp.where(cache.index + t <= cache.max_length, logits, jnp.nan)
    new_cache = KVCache(keys=tuple(keys), values=tuple(values), segments=kv_segments,
                        index=cache.index + t)
    return logits, new_cache
