"""Scalar reward, ensemble, multi-objective and value heads on any prefjax trunk.

A trunk is any module with ``config.hidden_size`` and ``hidden_states(tokens, *,
attention_mask=None, segment_ids=None, positions=None) -> [N, T, D]``: the
causal ``Decoder`` or the BERT ``Encoder``. A reward model reads the trunk's
hidden state at one token of each sequence and projects it to a scalar:

  decoder  "last": the last real token (padded: ``segments.last_token_index``;
                   packed: ``segments.segment_last_index``), as in Stiennon et
                   al., "Learning to summarize from human feedback" (arXiv:2009.01325)
                   and Ouyang et al., InstructGPT (arXiv:2203.02155);
  encoder  "mean": the masked mean of all tokens (sentence-transformers style,
                   the pooling all-MiniLM-L6-v2 was trained with), "cls": the
                   first token, or "pooler": the first token through the encoder's
                   pooler (``Encoder.pool``), as BERT, RoBERTa and DistilBERT sequence
                   classifiers score.

Padded calls return one value per row (``[N]``, ``[N, K]``). Packed calls (pass
``segment_ids`` and the static ``num_segments``) return one value per segment,
``[R, S + 1]`` (``[R, S + 1, K]``), column ``s`` for segment ``s`` and column 0
(padding) zero; pick pairs out of it with ``segments.gather_pairs``.

Reward and value heads are initialised from N(0, 1/(D+1)) with zero bias
(Stiennon et al., 2020) and always compute in float32.

Ensembles: ``MultiHeadEnsemble`` puts K independent linear heads on one shared
trunk (cheap; Zhang et al., "Improving Reinforcement Learning from Human
Feedback with Efficient Reward Model Ensemble", arXiv:2401.16635);
``DeepEnsemble`` holds K complete models whose parameters are stacked on a
leading axis by ``nnx.vmap`` (Coste et al., "Reward Model Ensembles Help
Mitigate Overoptimization", arXiv:2310.02743); shard that axis over a mesh
axis ``ensemble`` with ``ensemble_partition_rules``. Its members run as one
vmapped program, or on CPU one after another in the same step
(``DeepEnsemble(forward=...)``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefjax.models import layers
from prefjax.models import segments as seg
from prefjax.models.decoder import Decoder
from prefjax.models.encoder import Encoder

Array = jax.Array
POOLINGS = ("last", "cls", "mean", "pooler")

# Heads are tiny: replicated. Listed so that `prefjax.parallel` finds them explicitly.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"(^|/)(head|value_head)/(kernel|bias)$", P()),
]


def default_pooling(trunk: nnx.Module) -> str:
  """"pooler" for an encoder with one (a classifier's trunk), else "mean" for encoders,
  "last" for causal decoders."""
  if isinstance(trunk, Encoder):
    return "mean" if trunk.pooler is None else "pooler"
  return "last"


def _head_linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
  init = nnx.initializers.normal(stddev=(in_features + 1) ** -0.5)
  return nnx.Linear(in_features, out_features, kernel_init=init, dtype=jnp.float32,
                    param_dtype=jnp.float32, precision=seg.EXACT, rngs=rngs)


def _gather_tokens(hidden: Array, index: Array) -> Array:
  """``hidden [N, T, D]`` at ``index [N, ...]`` along T -> ``[N, ..., D]``."""
  picked = layers.take_slots(hidden, index.reshape(index.shape[0], -1))
  return picked.reshape(index.shape + hidden.shape[-1:])


def pooled_slots(tokens: Array, attention_mask: Array | None, segment_ids: Array | None,
                 num_segments: int | None, pooling: str, *,
                 last_skips_id: int | None = None, prefix_ids: Array | None = None) -> Array:
  """The slot that "last" or "cls" pooling reads: ``[N]`` per padded row, ``[R, S + 1]``
  per packed segment (column 0 and absent segments: slot 0).

  ``last_skips_id``: "last" pooling reads the last token whose id is not this one
  (Hugging Face's sequence classifiers read the last token that is not their pad id,
  which skips a trailing EOS when pad = EOS). A shared-prompt response segment
  (``prefix_ids``) with no other token then reads its prompt's last, as the padded
  sequence prompt + response would.
  """
  if pooling == "last" and last_skips_id is not None:
    keep = tokens != last_skips_id
    if segment_ids is not None:
      kept_ids = jnp.where(keep, segment_ids, 0)
      last = seg.segment_last_index(kept_ids, num_segments)
      if prefix_ids is None:
        return last
      member = seg.segment_one_hot(segment_ids, num_segments) > 0  # [R, L, S + 1]
      prompt_of = jnp.max(jnp.where(member, prefix_ids[..., None], 0), axis=1)  # [R, S + 1]
      emptied = seg.segment_counts(kept_ids, num_segments) == 0
      return jnp.where(emptied, jnp.take_along_axis(last, prompt_of, axis=1), last)
    attention_mask = keep if attention_mask is None else (attention_mask > 0) & keep
  if segment_ids is not None:
    pick = seg.segment_last_index if pooling == "last" else seg.segment_first_index
    return pick(segment_ids, num_segments)
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape[:2], jnp.int32)
  if pooling == "last":
    return seg.last_token_index(attention_mask)
  return jnp.argmax(attention_mask > 0, axis=-1).astype(jnp.int32)


def pool_padded(hidden: Array, attention_mask: Array | None, pooling: str) -> Array:
  """One feature vector per padded row: ``[N, T, D] -> [N, D]`` float32."""
  n, t, _ = hidden.shape
  if attention_mask is None:
    attention_mask = jnp.ones((n, t), jnp.int32)
  if pooling != "mean":
    index = pooled_slots(hidden, attention_mask, None, None, pooling)
    return _gather_tokens(hidden, index).astype(jnp.float32)
  m = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def pool_packed(hidden: Array, segment_ids: Array, num_segments: int, pooling: str) -> Array:
  """One feature vector per packed segment: ``[R, L, D] -> [R, S + 1, D]`` (column 0 zero)."""
  if pooling != "mean":
    feats = _gather_tokens(hidden, pooled_slots(hidden, None, segment_ids, num_segments,
                                                pooling))
  else:
    one_hot = seg.segment_one_hot(segment_ids, num_segments)
    sums = jnp.einsum("rld,rls->rsd", hidden.astype(jnp.float32), one_hot, precision=seg.EXACT)
    counts = seg.segment_counts(segment_ids, num_segments)
    feats = sums / jnp.maximum(counts, 1.0)[..., None]
  return feats.astype(jnp.float32).at[:, 0].set(0.0)


class PooledHeadModel(nnx.Module):
  """Trunk + pooling + a float32 linear head with ``num_outputs`` outputs (base class)."""

  def __init__(self, trunk: nnx.Module, num_outputs: int, *, pooling: str | None,
               rngs: nnx.Rngs):
    pooling = default_pooling(trunk) if pooling is None else pooling
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "last" and isinstance(trunk, Encoder):
      raise ValueError("pooling='last' is for causal decoders; use 'mean' or 'cls' "
                       "with an Encoder" + (", or 'pooler', its classifier's"
                                            if trunk.pooler is not None else ""))
    if pooling == "pooler" and getattr(trunk, "pooler", None) is None:
      raise ValueError("pooling='pooler' reads an encoder's pooler (a BERT, RoBERTa or "
                       "DistilBERT classifier's trunk, EncoderConfig.pooler); this trunk "
                       "has none")
    self.trunk = trunk
    self.pooling = pooling
    self.last_skips_id: int | None = None  # see ``pooled_slots``
    self.head = _head_linear(trunk.config.hidden_size, num_outputs, rngs)

  def features(self, tokens: Array, *, attention_mask: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None,
               num_segments: int | None = None, **trunk_kwargs) -> Array:
    """Pooled float32 features: ``[N, D]`` (padded) or ``[R, S + 1, D]`` (packed).

    With a ``Decoder`` trunk and "last" or "cls" pooling, the trunk's last block runs
    at the pooled slots only (``Decoder.hidden_states(select=...)``): the same values
    for less work.
    """
    if segment_ids is not None and num_segments is None:
      raise ValueError("packed input (segment_ids given) needs the static "
                       "num_segments=S, the maximum number of segments per row")
    if trunk_kwargs.get("prefix_ids") is not None:
      if isinstance(self.trunk, Encoder):
        raise ValueError("shared-prompt pairs (data.pipeline.share_prompt) need a causal "
                         "decoder trunk: an encoder's prompt tokens would attend to a "
                         "response")
      if self.pooling != "last":
        raise ValueError(
            f"shared-prompt pairs (data.pipeline.share_prompt) with pooling="
            f"{self.pooling!r}: a response's segment there holds no prompt, so the pooled "
            "features would skip it while evaluation (padded rows) reads it; use 'last' "
            "pooling or share_prompt=False")
    trunk_kwargs.update(attention_mask=attention_mask, segment_ids=segment_ids,
                        positions=positions)
    if self.pooling != "mean" and isinstance(self.trunk, Decoder):
      index = pooled_slots(tokens, attention_mask, segment_ids, num_segments, self.pooling,
                           last_skips_id=self.last_skips_id,
                           prefix_ids=trunk_kwargs.get("prefix_ids"))
      select = index.reshape(index.shape[0], -1)
      feats = self.trunk.hidden_states(tokens, select=select, **trunk_kwargs)
      feats = feats.reshape(index.shape + feats.shape[-1:]).astype(jnp.float32)
      return feats if segment_ids is None else feats.at[:, 0].set(0.0)
    hidden = self.trunk.hidden_states(tokens, **trunk_kwargs)
    pooling = "cls" if self.pooling == "pooler" else self.pooling
    if segment_ids is None:
      feats = pool_padded(hidden, attention_mask, pooling)
    else:
      feats = pool_packed(hidden, segment_ids, num_segments, pooling)
    if self.pooling != "pooler":
      return feats
    feats = self.trunk.pool(feats)
    return feats if segment_ids is None else feats.at[:, 0].set(0.0)

  def outputs(self, tokens: Array, **kwargs) -> Array:
    """Head outputs ``[N, K]`` or ``[R, S + 1, K]`` (packed: padding column and absent segments 0)."""
    out = self.head(self.features(tokens, **kwargs))
    segment_ids = kwargs.get("segment_ids")
    if segment_ids is None:
      return out
    present = seg.segment_counts(segment_ids, kwargs["num_segments"]) > 0
    return jnp.where(present[..., None], out, 0.0)


class RewardModel(PooledHeadModel):
  """Scalar reward ``r(x, y)``: ``[N]`` for padded input, ``[R, S + 1]`` for packed input."""

  def __init__(self, trunk: nnx.Module, *, pooling: str | None = None, rngs: nnx.Rngs):
    super().__init__(trunk, 1, pooling=pooling, rngs=rngs)

  def __call__(self, tokens: Array, **kwargs) -> Array:
    return self.outputs(tokens, **kwargs)[..., 0]


class MultiHeadEnsemble(PooledHeadModel):
  """K independent reward heads on one shared trunk: ``[N, K]`` / ``[R, S + 1, K]``."""

  def __init__(self, trunk: nnx.Module, num_members: int, *, pooling: str | None = None,
               rngs: nnx.Rngs):
    if num_members < 1:
      raise ValueError(f"an ensemble needs at least one member, got {num_members}")
    super().__init__(trunk, num_members, pooling=pooling, rngs=rngs)
    self.num_members = num_members

  def __call__(self, tokens: Array, **kwargs) -> Array:
    return self.outputs(tokens, **kwargs)


class MultiObjectiveRewardModel(PooledHeadModel):
  """Named reward objectives (e.g. helpful/harmless/honest) on one trunk.

  ``__call__`` returns ``[N, len(names)]`` (``[R, S + 1, len(names)]`` packed) in
  the order of ``names``; ``as_dict`` splits it by name.
  """

  def __init__(self, trunk: nnx.Module, names: Sequence[str], *,
               pooling: str | None = None, rngs: nnx.Rngs):
    names = tuple(names)
    if not names or any(not n for n in names) or len(set(names)) != len(names):
      raise ValueError(f"objective names must be non-empty and unique, got {names}")
    super().__init__(trunk, len(names), pooling=pooling, rngs=rngs)
    self.names = names

  def __call__(self, tokens: Array, **kwargs) -> Array:
    return self.outputs(tokens, **kwargs)

  def as_dict(self, outputs: Array) -> dict[str, Array]:
    return {name: outputs[..., i] for i, name in enumerate(self.names)}


class ValueModel(nnx.Module):
  """Per-token value ``V(s_t)`` for PPO: ``[N, T]`` float32, zero on padding.

  The value at token t estimates the return after the prefix ending at t.
  """

  def __init__(self, trunk: nnx.Module, *, rngs: nnx.Rngs):
    self.trunk = trunk
    self.value_head = _head_linear(trunk.config.hidden_size, 1, rngs)

  def __call__(self, tokens: Array, *, attention_mask: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None,
               **trunk_kwargs) -> Array:
    hidden = self.trunk.hidden_states(tokens, attention_mask=attention_mask,
                                      segment_ids=segment_ids, positions=positions,
                                      **trunk_kwargs)
    values = self.value_head(hidden.astype(jnp.float32))[..., 0]
    real = segment_ids if segment_ids is not None else attention_mask
    return values if real is None else jnp.where(real > 0, values, 0.0)


class DeepEnsemble(nnx.Module):
  """K complete models with parameters stacked on a leading axis (``nnx.vmap``).

  ``build(rngs)`` constructs one member; member k is built from
  ``nnx.Rngs(seeds[k])``, so it equals ``build(nnx.Rngs(seeds[k]))`` built alone.
  The forward pass returns the members' outputs with the member axis LAST:
  ``[N, K]`` for padded reward models, ``[R, S + 1, K]`` packed.

  ``forward``: ``"vmap"`` maps one member's program over the stacked axis (batched
  matmuls; what a mesh with an ``ensemble`` axis shards); ``"unrolled"`` calls the
  members one after another on slices of the stacked parameters, K independent
  programs in one step that XLA's CPU runtime overlaps on its cores; ``"auto"``
  (default) is ``"unrolled"`` on CPU unless the current mesh has an ``ensemble``
  axis, else ``"vmap"``. The same outputs and gradients either way, up to float
  rounding.
  """

  FORWARDS = ("auto", "vmap", "unrolled")

  def __init__(self, build: Callable[[nnx.Rngs], nnx.Module], seeds: Sequence[int],
               forward: str = "auto"):
    seeds = [int(s) for s in seeds]
    if not seeds:
      raise ValueError("DeepEnsemble needs at least one seed")
    if forward not in self.FORWARDS:
      raise ValueError(f"forward must be one of {self.FORWARDS}, got {forward!r}")
    keys = jnp.stack([jax.random.key(s) for s in seeds])

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
      return build(nnx.Rngs(key))

    self.members = create(keys)
    self.num_members = len(seeds)
    self.forward = forward

  def __call__(self, tokens: Array, **kwargs) -> Array:
    arrays = {k: v for k, v in kwargs.items() if v is not None and hasattr(v, "shape")}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    if self.unrolled():
      return jnp.stack([self.member(k)(tokens, **arrays, **static)
                        for k in range(self.num_members)], axis=-1)

    @nnx.vmap(in_axes=(0, None, None), out_axes=-1)
    def forward(member, tokens, arrays):
      return member(tokens, **arrays, **static)

    return forward(self.members, tokens, arrays)

  def unrolled(self) -> bool:
    """Whether ``__call__`` runs the members one by one (see ``forward``)."""
    if self.forward != "auto":
      return self.forward == "unrolled"
    if jax.tree.leaves(nnx.state(self.members, nnx.Not(nnx.Param))):
      return False  # a slice's updates to such state would be lost; vmap carries them
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and dict(mesh.shape).get("ensemble", 1) > 1
    return jax.default_backend() == "cpu" and not sharded

  def member(self, k: int) -> nnx.Module:
    """A standalone copy of member ``k`` (unstacked parameters)."""
    if not 0 <= k < self.num_members:
      raise IndexError(f"member {k} out of range for {self.num_members} members")
    graphdef, state = nnx.split(self.members)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[k], state))


def ensemble_partition_rules(rules: Sequence[tuple[str, P]], axis: str = "ensemble",
                             ) -> list[tuple[str, P]]:
  """Partition rules for ``DeepEnsemble`` params: the member axis over mesh axis ``axis``.

  Each rule's spec gets ``axis`` prepended; parameters no rule matches are
  still split over members (catch-all rule).
  """
  return [(pattern, P(axis, *spec)) for pattern, spec in rules] + [(r".*", P(axis))]


def parse_head(head: str | None) -> tuple[str | None, Any]:
  """Parses a head spec into ``(kind, argument)``; raises ValueError with the grammar."""
  grammar = ('expected None, "reward", "reward_ensemble:K" (K >= 1), "value" or '
             '"multi:name1,name2,..."')
  if head is None:
    return None, None
  if not isinstance(head, str):
    raise ValueError(f"head spec must be a string or None, got {head!r}; {grammar}")
  kind, _, arg = head.strip().partition(":")
  if kind in ("reward", "value") and not arg:
    return kind, None
  if kind == "reward_ensemble":
    if not arg.strip().isdigit() or int(arg) < 1:
      raise ValueError(f"bad head spec {head!r}: K must be a positive integer; {grammar}")
    return kind, int(arg)
  if kind == "multi":
    names = tuple(n.strip() for n in arg.split(","))
    if not arg or any(not n for n in names) or len(set(names)) != len(names):
      raise ValueError(f"bad head spec {head!r}: objective names must be non-empty "
                       f"and unique; {grammar}")
    return kind, names
  raise ValueError(f"unknown head spec {head!r}; {grammar}")


def head_spec(model: nnx.Module) -> str | None:
  """The spec ``attach_head`` builds ``model``'s head from (None for a bare trunk)."""
  if isinstance(model, MultiObjectiveRewardModel):
    return "multi:" + ",".join(model.names)
  if isinstance(model, MultiHeadEnsemble):
    return f"reward_ensemble:{model.num_members}"
  if isinstance(model, ValueModel):
    return "value"
  return "reward" if isinstance(model, RewardModel) else None


def output_layer(model: nnx.Module) -> nnx.Linear | None:
  """The linear head of a head model (``head``, or a ``ValueModel``'s ``value_head``)."""
  return model.value_head if isinstance(model, ValueModel) else getattr(model, "head", None)


def attach_head(trunk: nnx.Module, head: str | None, *, rngs: nnx.Rngs,
                pooling: str | None = None) -> nnx.Module:
  """Wraps ``trunk`` with the head named by ``head`` (see ``parse_head``).

  A decoder trunk loses its untied LM head (``Decoder.drop_output_head``), an encoder
  its pooler where the head does not pool through it (``Encoder.drop_pooler``).
  """
  kind, arg = parse_head(head)
  if kind is None:
    return trunk
  if hasattr(trunk, "drop_output_head"):  # scalar heads never read the LM head
    trunk.drop_output_head()
  if kind == "reward":
    model = RewardModel(trunk, pooling=pooling, rngs=rngs)
  elif kind == "reward_ensemble":
    model = MultiHeadEnsemble(trunk, arg, pooling=pooling, rngs=rngs)
  elif kind == "multi":
    model = MultiObjectiveRewardModel(trunk, arg, pooling=pooling, rngs=rngs)
  else:
    model = ValueModel(trunk, rngs=rngs)
  if getattr(model, "pooling", None) != "pooler" and hasattr(trunk, "drop_pooler"):
    trunk.drop_pooler()  # parameters nothing reads, which checkpoints would still hold
  return model
