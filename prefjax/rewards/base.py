"""The reward-function interface, programmatic (gold) rewards and normalised rewards.

A ``RewardFn`` scores a batch of N sequences given as tokens (``tokens [N, T]``
int32 with ``attention_mask [N, T]``, 1 = real token) and/or as decoded texts.
Calling it returns float32 rewards of shape ``[N]`` when ``num_members == 1``
and ``[N, K]`` when it has K > 1 members (an ensemble); ``score`` always
returns ``[N]`` (the ensemble aggregate, or the member mean for plain
multi-member rewards), which is what optimisers (best-of-n, RL) maximise.

Every implementation validates what it returns: a wrong shape or a non-finite
reward raises ``ValueError`` naming the reward and the first bad row, so that
no NaN is ever silently optimised against.
"""

from __future__ import annotations

import abc
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.rewards import normalize
from prefjax.rewards.aggregate import aggregate

Texts = Sequence[str]
MaybeArray = jax.Array | np.ndarray | None
Encoder = Callable[[Texts], tuple[np.ndarray, np.ndarray]]
Decoder = Callable[[np.ndarray, np.ndarray], list[str]]


class RewardFn(abc.ABC):
  """A batched reward: tokens and/or texts -> ``[N]`` or ``[N, K]`` float32.

  Attributes:
    name: a short identifier used in logs, metrics and error messages.
    num_members: 1 for a scalar reward, K for a K-member ensemble.
  """
  name: str
  num_members: int

  @abc.abstractmethod
  def __call__(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
               texts: Texts | None = None) -> jax.Array:
    """Rewards of N sequences: ``[N]`` if ``num_members == 1`` else ``[N, K]``."""

  def score(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
            texts: Texts | None = None) -> jax.Array:
    """Scalar reward ``[N]`` to optimise (multi-member rewards are averaged)."""
    rewards = self(tokens, attention_mask, texts=texts)
    return rewards if self.num_members == 1 else aggregate(rewards, "mean")


def check_rewards(rewards: jax.Array | np.ndarray, *, num_rows: int, num_members: int,
                  name: str) -> jax.Array:
  """Validates a reward output on the host: shape ``[N]``/``[N, K]`` and finite values.

  Raises:
    ValueError: naming ``name``, the expected and actual shapes, or the first
      non-finite row.
  """
  rewards = jnp.asarray(rewards)
  expected = (num_rows,) if num_members == 1 else (num_rows, num_members)
  if rewards.shape != expected:
    raise ValueError(f"reward {name!r} returned shape {rewards.shape}, expected {expected} "
                     f"({num_rows} sequences, {num_members} member(s))")
  values = np.asarray(rewards, np.float64).reshape(num_rows, max(num_members, 1))
  bad = ~np.isfinite(values).all(axis=1)
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(f"reward {name!r} is not finite for row {row} "
                     f"(value {values[row].tolist()}; {int(bad.sum())} bad rows of {num_rows})")
  return rewards.astype(jnp.float32)


def resolve_tokens(tokens: MaybeArray, attention_mask: MaybeArray, texts: Texts | None,
                   encode: Encoder | None,
                   name: str) -> tuple[jax.Array, jax.Array]:
  """Returns int32 ``(tokens, attention_mask)``, encoding ``texts`` when tokens are absent."""
  if tokens is None:
    if texts is None:
      raise ValueError(f"reward {name!r}: pass tokens or texts")
    if encode is None:
      raise ValueError(f"reward {name!r} scores tokens; got texts but no `encode` function")
    tokens, attention_mask = encode(list(texts))
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"reward {name!r}: tokens must be [N, T], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"reward {name!r}: tokens must be integers, got {tokens.dtype}")
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if attention_mask.shape != tokens.shape:
    raise ValueError(f"reward {name!r}: attention_mask shape {attention_mask.shape} does not "
                     f"match tokens shape {tokens.shape}")
  return tokens.astype(jnp.int32), attention_mask.astype(jnp.int32)


def resolve_texts(tokens: MaybeArray, attention_mask: MaybeArray, texts: Texts | None,
                  decode: Decoder | None, name: str) -> list[str]:
  """Returns the texts, decoding ``tokens`` when texts are absent."""
  if texts is not None:
    if isinstance(texts, str):
      raise ValueError(f"reward {name!r}: texts must be a sequence of strings, got one str")
    return list(texts)
  if tokens is None:
    raise ValueError(f"reward {name!r}: pass tokens or texts")
  if decode is None:
    raise ValueError(f"reward {name!r} scores texts; got tokens but no `decode` function")
  tokens = np.asarray(tokens)
  mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask)
  return list(decode(tokens, mask))


class ProgrammaticReward(RewardFn):
  """A reward computed by a function: gold rewards, rule-based rewards, test oracles.

  With ``inputs="texts"`` the function is plain Python ``fn(texts) -> [N]``
  (array-like) and token inputs are decoded with ``decode(tokens, mask)``.
  With ``inputs="tokens"`` it is ``fn(tokens, attention_mask) -> [N]`` (or
  ``[N, K]``); it is jitted unless ``jit=False`` and texts are encoded with
  ``encode(texts) -> (tokens, mask)``.
  """

  def __init__(self, fn: Callable[..., object], *, inputs: Literal["texts", "tokens"],
               name: str | None = None, num_members: int = 1, decode: Decoder | None = None,
               encode: Encoder | None = None, jit: bool = True):
    if inputs not in ("texts", "tokens"):
      raise ValueError(f"ProgrammaticReward: inputs must be 'texts' or 'tokens', got {inputs!r}")
    if num_members < 1:
      raise ValueError(f"ProgrammaticReward: num_members must be >= 1, got {num_members}")
    self.name = name or getattr(fn, "__name__", "programmatic")
    self.num_members = num_members
    self.inputs = inputs
    self._decode, self._encode = decode, encode
    self._fn = jax.jit(fn) if (jit and inputs == "tokens") else fn

  def __call__(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
               texts: Texts | None = None) -> jax.Array:
    if self.inputs == "texts":
      texts = resolve_texts(tokens, attention_mask, texts, self._decode, self.name)
      rewards = np.asarray(self._fn(texts), np.float32)
      return check_rewards(rewards, num_rows=len(texts), num_members=self.num_members,
                           name=self.name)
    tokens, attention_mask = resolve_tokens(tokens, attention_mask, texts, self._encode,
                                            self.name)
    return check_rewards(self._fn(tokens, attention_mask), num_rows=tokens.shape[0],
                         num_members=self.num_members, name=self.name)


class NormalizedReward(RewardFn):
  """Wraps a reward with a ``RewardNormalizer`` (per member), e.g. so π_ref scores 0."""

  def __init__(self, base: RewardFn, normalizer: normalize.RewardNormalizer,
               name: str | None = None):
    expected = () if base.num_members == 1 else (base.num_members,)
    if normalizer.mean.shape != expected:
      raise ValueError(f"NormalizedReward: normaliser statistics have shape "
                       f"{normalizer.mean.shape}, reward {base.name!r} needs {expected}")
    self.base, self.normalizer = base, normalizer
    self.name = name or base.name
    self.num_members = base.num_members

  @classmethod
  def fit(cls, base: RewardFn, tokens: MaybeArray = None,
          attention_mask: MaybeArray = None, *, texts: Texts | None = None,
          standardize: bool = False, weights: MaybeArray = None) -> "NormalizedReward":
    """Fits the normaliser on reference-policy samples (tokens or texts) of ``base``."""
    reference = base(tokens, attention_mask, texts=texts)
    return cls(base, normalize.RewardNormalizer.fit(reference, standardize=standardize,
                                                    weights=weights))

  def __call__(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
               texts: Texts | None = None) -> jax.Array:
    return self.normalizer(self.base(tokens, attention_mask, texts=texts))

  def score(self, tokens: MaybeArray = None, attention_mask: MaybeArray = None, *,
            texts: Texts | None = None) -> jax.Array:
    """The base's own aggregate (an ``EnsembleReward``'s WCO / UWO) of the normalised
    members; the mean for a base without one."""
    rewards = self(tokens, attention_mask, texts=texts)
    if self.num_members == 1:
      return rewards
    return aggregate(rewards, getattr(self.base, "aggregation", "mean"),
                     getattr(self.base, "lam", 0.0))
