"""``EnsembleReward``: K reward members, normalised per member, aggregated (mean, wco or uwo).

Members are either K scalar ``RewardFn``s (e.g. proxies trained with different
seeds) or one ``RewardFn`` with ``num_members == K`` (e.g. a ``ModelReward``
around an ensemble head). Calling the ensemble returns the normalised member
rewards ``[N, K]``; ``score`` returns the aggregate ``[N]`` (``mean``, ``wco``
or ``uwo``, see ``prefjax.rewards.aggregate``), which is what best-of-n and RL
optimise in the ensemble experiments of Coste et al., arXiv:2310.02743.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from prefjax.rewards import base
from prefjax.rewards import model as model_lib
from prefjax.rewards import normalize
from prefjax.rewards.aggregate import AGGREGATIONS
from prefjax.rewards.aggregate import aggregate
from prefjax.rewards.base import MaybeArray
from prefjax.rewards.base import Texts


class EnsembleReward(base.RewardFn):
  """An ensemble reward with a (conservative) aggregation of its members.

  Args:
    members: K single-member ``RewardFn``s, or one ``RewardFn`` returning ``[N, K]``.
    aggregation: ``"mean"``, ``"wco"`` or ``"uwo"``.
    lam: the UWO variance penalty λ.
    normalizer: optional per-member ``RewardNormalizer`` (statistics ``[K]``),
      applied before aggregation; see ``fit_normalizer``.
    name: identifier (default ``"<aggregation>(<member names>)"``).
  """

  def __init__(self, members: base.RewardFn | Sequence[base.RewardFn], *,
               aggregation: str = "mean", lam: float = 0.0,
               normalizer: normalize.RewardNormalizer | None = None, name: str | None = None):
    if aggregation not in AGGREGATIONS:
      raise ValueError(f"EnsembleReward: unknown aggregation {aggregation!r}; expected one of "
                       f"{sorted(AGGREGATIONS)}")
    if lam < 0:
      raise ValueError(f"EnsembleReward: lam must be >= 0, got {lam}")
    if isinstance(members, base.RewardFn):
      self.members: tuple[base.RewardFn, ...] = (members,)
      self.num_members = members.num_members
    else:
      self.members = tuple(members)
      if not self.members:
        raise ValueError("EnsembleReward: needs at least one member")
      multi = [m.name for m in self.members if m.num_members != 1]
      if multi:
        raise ValueError(f"EnsembleReward: a list of members must hold scalar rewards; "
                         f"{multi} have several members (pass one ensemble RewardFn instead)")
      self.num_members = len(self.members)
    if normalizer is not None and normalizer.mean.shape != (self.num_members,):
      raise ValueError(f"EnsembleReward: normaliser statistics have shape "
                       f"{normalizer.mean.shape}, expected ({self.num_members},)")
    self.aggregation, self.lam, self.normalizer = aggregation, float(lam), normalizer
    member_names = ",".join(m.name for m in self.members)
    self.name = name or f"{aggregation}({member_names})"

  @classmethod
  def from_model(cls, model: Callable[..., Any], num_members: int | None = None, *,
                 aggregation: str = "mean", lam: float = 0.0,
                 normalizer: normalize.RewardNormalizer | None = None, name: str | None = None,
                 **model_kwargs) -> "EnsembleReward":
    """An ensemble around one model returning ``[N, K]`` (e.g. a K-member ensemble head).

    ``num_members`` defaults to the model's ``num_members`` attribute.

    ``model_kwargs`` go to ``ModelReward`` (``batch_size``, ``encode``, ``jit``).
    """
    member = model_lib.ModelReward(model, name=name or "ensemble_model",
                                   num_members=num_members, **model_kwargs)
    return cls(member, aggregation=aggregation, lam=lam, normalizer=normalizer, name=name)

  def raw_members(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
                  texts: Texts | None = None) -> jax.Array:
    """Un-normalised member rewards ``[N, K]``."""
    if len(self.members) == 1:
      rewards = self.members[0](tokens, attention_mask, texts=texts)
      return rewards[:, None] if rewards.ndim == 1 else rewards
    return jnp.stack([m(tokens, attention_mask, texts=texts) for m in self.members], axis=-1)

  def __call__(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
               texts: Texts | None = None) -> jax.Array:
    rewards = self.raw_members(tokens, attention_mask, texts=texts)
    if self.normalizer is not None:
      rewards = self.normalizer(rewards)
    return rewards if self.num_members > 1 else rewards[:, 0]

  def score(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
            texts: Texts | None = None) -> jax.Array:
    """The aggregate ``[N]`` over normalised members."""
    rewards = self(tokens, attention_mask, texts=texts)
    if rewards.ndim == 1:
      rewards = rewards[:, None]
    return aggregate(rewards, self.aggregation, self.lam)

  def fit_normalizer(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None,
                     *, texts: Texts | None = None, standardize: bool = False,
                     weights: MaybeArray = None) -> "EnsembleReward":
    """A copy normalised per member on reference-policy samples: each member, and so the
    mean, scores 0 under π_ref; WCO and UWO score below 0 there (a minimum and a variance
    penalty of centred members)."""
    reference = self.raw_members(tokens, attention_mask, texts=texts)
    normalizer = normalize.RewardNormalizer.fit(reference, standardize=standardize,
                                                weights=weights)
    return EnsembleReward(self._members_arg(), aggregation=self.aggregation, lam=self.lam,
                          normalizer=normalizer, name=self.name)

  def with_aggregation(self, aggregation: str, lam: float = 0.0) -> "EnsembleReward":
    """The same members and normaliser under another aggregation."""
    return EnsembleReward(self._members_arg(), aggregation=aggregation, lam=lam,
                          normalizer=self.normalizer)

  def _members_arg(self) -> base.RewardFn | tuple[base.RewardFn, ...]:
    """The members as the constructor takes them: one ``[N, K]`` reward alone, or scalars."""
    return self.members[0] if len(self.members) == 1 else self.members
