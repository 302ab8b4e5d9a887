"""BERT-family bidirectional encoder in Flax NNX (all-MiniLM-L6-v2 is one).

Architecture (Devlin et al., "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", arXiv:1810.04805): word + learned
position + token-type embeddings, LayerNorm, then post-LN blocks

  h = LN(x + Attn(x));  y = LN(h + W2 act(W1 h))

with exact (erf) GELU by default, as in the original BERT and in Hugging Face
``BertModel``. Attention is bidirectional over real tokens; for packed rows it
stays within each segment (``segment_ids``), with ``positions`` restarting at
every segment.

The same blocks are RoBERTa (Liu et al., arXiv:1907.11692; ``model_type`` "roberta",
"xlm-roberta"), whose position table is read from ``pad_token_id + 1`` on, and DistilBERT
(Sanh et al., arXiv:1910.01108), which has no token types. A sequence classifier of these
families pools its first token through a dense layer and an activation (BERT's pooler,
RoBERTa's ``classifier.dense``, DistilBERT's ``pre_classifier``): ``pooler`` builds that
layer, which the "pooler" pooling of ``heads`` reads.

Parameter tree (NNX state paths, used by ``PARTITION_RULES`` and the HF import):

  embed/embedding            [V, D]      word embeddings
  pos_embed/embedding        [P, D]      learned absolute positions
  type_embed/embedding       [types, D]  token types (segment A/B)
  embed_norm/{scale,bias}    [D]
  pooler/{kernel [D, D], bias}                    only with ``config.pooler``
  layers/<i>/attn/{q,k,v,o}_proj/{kernel,bias}   kernel [D, D] (in, out)
  layers/<i>/attn_norm/{scale,bias}
  layers/<i>/mlp/up_proj/{kernel [D, F], bias}
  layers/<i>/mlp/down_proj/{kernel [F, D], bias}
  layers/<i>/mlp_norm/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from prefjax.models import attention as attention_lib
from prefjax.models import segments as seg
from prefjax.models import stack

Array = jax.Array

# Regexes against "/"-joined NNX paths; first match wins, unmatched -> replicated.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"(^|/)embed/embedding$", P("tensor", "fsdp")),
    (r"(pos|type)_embed/embedding$", P(None, "fsdp")),
    (r"attn/(q|k|v)_proj/kernel$", P("fsdp", "tensor")),
    (r"attn/(q|k|v)_proj/bias$", P("tensor")),
    (r"attn/o_proj/kernel$", P("tensor", "fsdp")),
    (r"mlp/up_proj/kernel$", P("fsdp", "tensor")),
    (r"mlp/up_proj/bias$", P("tensor")),
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),
]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
POOLER_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}
# Hugging Face model types of this architecture; RoBERTa's read positions after the pad id.
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert")
ROBERTA_TYPES = ("roberta", "xlm-roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyperparameters of a BERT-family encoder (names follow HF ``BertConfig``)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  model_type: str = "bert"  # one of MODEL_TYPES: the Hugging Face form and position rule
  pooler: str | None = None  # "tanh" / "relu": a dense layer on the first token

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                       f"known: {sorted(_ACTIVATIONS)}")
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
    if self.pooler is not None and self.pooler not in POOLER_ACTIVATIONS:
      raise ValueError(f"pooler {self.pooler!r} is not one of {sorted(POOLER_ACTIVATIONS)} "
                       "or None")
    if self.model_type == "distilbert" and self.type_vocab_size:
      raise ValueError("a DistilBERT encoder has no token types: type_vocab_size must be 0")

  def replace(self, **overrides) -> "EncoderConfig":
    return dataclasses.replace(self, **overrides)

  @classmethod
  def tiny(cls, **overrides) -> "EncoderConfig":
    """A small BERT for tests and CPU experiments."""
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=64, max_position_embeddings=128)
    return cls(**{**base, **overrides})

  @classmethod
  def minilm_l6(cls, **overrides) -> "EncoderConfig":
    """all-MiniLM-L6-v2 (sentence-transformers; 6 layers, 384 hidden, 12 heads)."""
    return cls(**overrides)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def position_offset(self) -> int:
    """Row of the position table read for position 0: RoBERTa's start after its pad id."""
    return self.pad_token_id + 1 if self.model_type in ROBERTA_TYPES else 0

  @property
  def position_limit(self) -> int:
    """The longest sequence the position table holds (RoBERTa's: less its offset)."""
    return self.max_position_embeddings - self.position_offset

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "EncoderConfig":
    """Builds the config from a Hugging Face BERT, RoBERTa or DistilBERT ``config.json`` dict.

    A ``*ForSequenceClassification`` gets the ``pooler`` its classifier scores through;
    so does a prefjax export of one (``POOLER_KEY``).
    """
    model_type = hf.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"EncoderConfig supports model_type {', '.join(MODEL_TYPES)}; got "
                       f"{model_type!r}")
    fields = (_distilbert_fields(hf) if model_type == "distilbert"
              else _bert_fields(hf))
    pad = hf.get("pad_token_id")
    if pad is None:  # transformers' defaults
      pad = 1 if model_type in ROBERTA_TYPES else 0
    return cls(**fields, model_type=model_type, pooler=_pooler_of(hf, model_type),
               max_position_embeddings=hf.get("max_position_embeddings", 512),
               pad_token_id=int(pad))

  def to_hf_dict(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of this config (``BertModel``, ``RobertaModel``,
    ``XLMRobertaModel`` or ``DistilBertModel``)."""
    common = {"model_type": self.model_type, "vocab_size": self.vocab_size,
              "max_position_embeddings": self.max_position_embeddings,
              "pad_token_id": self.pad_token_id}
    if self.pooler is not None:
      common[POOLER_KEY] = self.pooler
    if self.model_type == "distilbert":
      if self.layer_norm_eps != 1e-12:
        raise ValueError(f"DistilBERT's layer norms use eps 1e-12; this encoder's "
                         f"{self.layer_norm_eps} has no Hugging Face form")
      return {"architectures": ["DistilBertModel"], **common, "dim": self.hidden_size,
              "n_layers": self.num_layers, "n_heads": self.num_heads,
              "hidden_dim": self.intermediate_size, "activation": self.hidden_act,
              "sinusoidal_pos_embds": False}
    arch = {"bert": "BertModel", "roberta": "RobertaModel",
            "xlm-roberta": "XLMRobertaModel"}[self.model_type]
    return {"architectures": [arch], **common,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act, "position_embedding_type": "absolute"}


# config.json key of a prefjax export whose encoder has a pooler (``EncoderConfig.pooler``).
POOLER_KEY = "prefjax_pooler"
_CLASSIFIER_POOLERS = {"bert": "tanh", "roberta": "tanh", "xlm-roberta": "tanh",
                       "distilbert": "relu"}


def _pooler_of(hf: Mapping[str, Any], model_type: str) -> str | None:
  if hf.get(POOLER_KEY):
    return str(hf[POOLER_KEY])
  archs = hf.get("architectures") or []
  if any(str(a).endswith("ForSequenceClassification") for a in archs):
    return _CLASSIFIER_POOLERS[model_type]
  return None


def _bert_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  pos_type = hf.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(f"unsupported position_embedding_type {pos_type!r} (only 'absolute')")
  for flag in ("is_decoder", "add_cross_attention"):  # a causal mask / cross-attention
    if hf.get(flag):
      raise ValueError(f"unsupported BERT config {flag}=true: the encoder attends both "
                       "ways and has no cross-attention")
  return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              intermediate_size=hf["intermediate_size"],
              type_vocab_size=hf.get("type_vocab_size", 2),
              layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
              hidden_act=hf.get("hidden_act", "gelu"))


def _distilbert_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
  if hf.get("sinusoidal_pos_embds"):
    raise ValueError("unsupported DistilBERT config sinusoidal_pos_embds=true (only "
                     "learned positions)")
  return dict(vocab_size=hf["vocab_size"], hidden_size=hf["dim"],
              num_layers=hf["n_layers"], num_heads=hf["n_heads"],
              intermediate_size=hf["hidden_dim"], type_vocab_size=0,
              layer_norm_eps=1e-12, hidden_act=hf.get("activation", "gelu"))


def attention_bias(attention_mask: Array | None, segment_ids: Array | None,
                   shape: tuple[int, int]) -> Array:
  """Boolean ``[N, 1, T, T]`` mask of allowed (query, key) pairs, bidirectional.

  Padded input: every query sees every real key. Packed input: a query sees the
  keys of its own segment only; padding (segment 0) sees nothing but is
  harmless because its outputs are never read.
  """
  n, t = shape
  allowed = jnp.ones((n, t, t), dtype=bool)
  if attention_mask is not None:
    allowed &= (attention_mask > 0)[:, None, :]
  if segment_ids is not None:
    allowed &= (segment_ids[:, :, None] == segment_ids[:, None, :])
    allowed &= (segment_ids > 0)[:, None, :]
  return allowed[:, None]


def dot_product_attention(q: Array, k: Array, v: Array, allowed: Array) -> Array:
  """Softmax attention with a boolean mask; ``q,k,v [N, T, H, Dh]``, softmax in float32.

  Fully masked query rows (padding) attend uniformly instead of producing NaN.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("nqhd,nkhd->nhqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
  return checkpoint_name(out, attention_lib.SAVEABLE_NAMES[0])  # remat="attention" keeps it


class SelfAttention(nnx.Module):
  """Multi-head bidirectional self-attention with biased projections."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = config.hidden_size
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    make = lambda: nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = make(), make(), make(), make()

  def __call__(self, x: Array, allowed: Array) -> Array:
    n, t, _ = x.shape
    rows = x.reshape(n * t, -1)  # 2-D projections: much faster dots on XLA CPU
    split = lambda y: y.reshape(n, t, self.num_heads, self.head_dim)
    out = dot_product_attention(split(self.q_proj(rows)), split(self.k_proj(rows)),
                                split(self.v_proj(rows)), allowed)
    return self.o_proj(out.reshape(n * t, -1)).reshape(n, t, -1)


class FeedForward(nnx.Module):
  """Two-layer MLP ``down(act(up(x)))``."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.down_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
    self.hidden_act = config.hidden_act

  def __call__(self, x: Array) -> Array:
    rows = x.reshape(-1, x.shape[-1])
    out = self.down_proj(_ACTIVATIONS[self.hidden_act](self.up_proj(rows)))
    return out.reshape(x.shape[:-1] + (-1,))


def _layer_norm(config: EncoderConfig, rngs: nnx.Rngs, param_dtype) -> nnx.LayerNorm:
  # Normalisation statistics always in float32 (two-pass variance, as PyTorch).
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                       dtype=jnp.float32, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


class EncoderLayer(nnx.Module):
  """Post-LN transformer block."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn = SelfAttention(config, **kw)
    self.attn_norm = _layer_norm(config, rngs, param_dtype)
    self.mlp = FeedForward(config, **kw)
    self.mlp_norm = _layer_norm(config, rngs, param_dtype)
    self.dtype = dtype

  def __call__(self, x: Array, allowed: Array) -> Array:
    h = self.attn_norm(x + self.attn(x, allowed)).astype(self.dtype)
    return self.mlp_norm(h + self.mlp(h)).astype(self.dtype)


def _layer_forward(layer: EncoderLayer, x: Array, allowed: Array) -> Array:
  return layer(x, allowed)


class Encoder(nnx.Module):
  """BERT-family encoder trunk: ``hidden_states(tokens, ...) -> [N, T, D]``.

  ``remat`` and ``scan_layers`` as in ``decoder.Decoder`` (``stack.run_blocks``):
  ``"attention"`` keeps each layer's attention output, whose softmax the backward
  then recomputes from the recomputed queries and keys.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, remat: bool | str = False, scan_layers: bool = False):
    stack.remat_policy(remat)
    self.config = config
    self.remat = remat
    self.scan_layers = scan_layers
    self.dtype = dtype or stack.default_compute_dtype()
    d = config.hidden_size
    init = nnx.initializers.normal(0.02)
    emb = lambda n: nnx.Embed(n, d, dtype=self.dtype, param_dtype=param_dtype,
                              embedding_init=init, rngs=rngs)
    self.embed = emb(config.vocab_size)
    self.pos_embed = emb(config.max_position_embeddings)
    self.type_embed = emb(config.type_vocab_size) if config.type_vocab_size else None
    self.embed_norm = _layer_norm(config, rngs, param_dtype)
    self.layers = nnx.List([
        EncoderLayer(config, rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
        for _ in range(config.num_layers)])
    self.pooler = None if config.pooler is None else nnx.Linear(
        d, d, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

  def hidden_states(self, tokens: Array, *, attention_mask: Array | None = None,
                    segment_ids: Array | None = None, positions: Array | None = None,
                    token_type_ids: Array | None = None) -> Array:
    """Final-layer hidden states ``[N, T, D]`` (compute dtype).

    Args:
      tokens: ``[N, T]`` int32 token ids.
      attention_mask: ``[N, T]``, 1 on real tokens (padded batches).
      segment_ids: ``[N, T]`` packed segment ids (0 = padding); attention stays
        within a segment.
      positions: ``[N, T]`` position ids from 0; default ``0..T-1`` per row, or the
        offset within each segment for packed input. RoBERTa numbers the tokens that
        are not its pad id and reads its table from ``position_offset`` on (its
        ``create_position_ids_from_input_ids``).
      token_type_ids: ``[N, T]`` BERT sentence A/B ids; default 0.

    Padding reads position 0 (RoBERTa's: its pad row), so that a batch padded past the
    table (a pipeline's ``pad_to_multiple``) never reads past it, which would give NaN
    that attention spreads to real tokens through its zero weights. Without a mask every
    token is real and a row longer than the table is an error; real tokens past it in a
    masked batch read NaN (the binaries refuse such a ``max_length`` first).
    """
    n, t = tokens.shape
    offset = self.config.position_offset
    # A packed row may be longer than the table: its positions restart in each segment.
    if (t > self.config.position_limit and positions is None
        and segment_ids is None and attention_mask is None):
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings="
                       f"{self.config.max_position_embeddings}"
                       + (f" less the {offset} rows RoBERTa's positions skip" if offset else ""))
    if positions is None and segment_ids is not None:
      positions = seg.positions_in_segments(segment_ids)
    elif positions is None and offset:
      real = tokens != self.config.pad_token_id
      if attention_mask is not None:  # a tokenizer may pad with another id
        real &= attention_mask > 0
      real = real.astype(jnp.int32)
      positions = jnp.cumsum(real, axis=1) * real - 1  # a pad token reads row pad_id
    elif positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
      if attention_mask is not None:
        positions = jnp.where(attention_mask > 0, positions, 0)
    x = self.embed(tokens) + self.pos_embed(positions + offset)
    if self.type_embed is not None:
      if token_type_ids is None:
        token_type_ids = jnp.zeros((n, t), jnp.int32)
      x = x + self.type_embed(token_type_ids)
    elif token_type_ids is not None:
      raise ValueError(f"a {self.config.model_type} encoder has no token types, but "
                       "token_type_ids were given")
    x = self.embed_norm(x).astype(self.dtype)
    allowed = attention_bias(attention_mask, segment_ids, (n, t))
    return stack.run_blocks(_layer_forward, list(self.layers), x, allowed,
                            remat=self.remat, scan=self.scan_layers)

  def __call__(self, tokens: Array, **kwargs) -> Array:
    return self.hidden_states(tokens, **kwargs)

  def drop_pooler(self) -> None:
    """Deletes the pooler (a head that pools otherwise replaces the classifier's)."""
    self.pooler = None
    self.config = self.config.replace(pooler=None)

  def pool(self, first: Array) -> Array:
    """The classifier's pooled features of first-token states ``[..., D]`` (float32)."""
    if self.pooler is None:
      raise ValueError("this encoder has no pooler (EncoderConfig.pooler is None)")
    return POOLER_ACTIVATIONS[self.config.pooler](self.pooler(first.astype(jnp.float32)))


def mean_pool(hidden: Array, mask: Array) -> Array:
  """Masked mean over tokens: ``hidden [N, T, D]``, ``mask [N, T]`` -> ``[N, D]`` (>= float32)."""
  dtype = jnp.promote_types(hidden.dtype, jnp.float32)
  m = mask.astype(dtype)[..., None]
  total = jnp.sum(hidden.astype(dtype) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """``x / max(||x||, eps)`` along the last axis (as ``torch.nn.functional.normalize``)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


@functools.partial(nnx.jit, static_argnames=("normalize",))
def sentence_embedding(encoder: Encoder, tokens: Array, attention_mask: Array, *,
                       normalize: bool = True, token_type_ids: Array | None = None) -> Array:
  """Sentence-transformers embedding: mean over real tokens, then L2-normalised; ``[N, D]``.

  This is the pooling of all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT",
  arXiv:1908.10084).
  """
  hidden = encoder.hidden_states(tokens, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids)
  pooled = mean_pool(hidden, attention_mask)
  return l2_normalize(pooled) if normalize else pooled
