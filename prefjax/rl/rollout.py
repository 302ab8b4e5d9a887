"""Policy/value/reference bundle, prompt encoding, sampling and per-token statistics.

``PolicyBundle`` holds the trained policy, the frozen reference and (for PPO)
the value model in ONE NNX module, so that the train state's ``params`` are the
trained variables and its ``extra`` holds the frozen reference: a checkpoint
then captures everything a resumed run needs (including a reference that was
warm-started inside the run).

Value model options (``value_trunk``):
  * ``"separate"`` (default): a ``ValueModel`` whose trunk is a COPY of the
    reference (``ValueModel`` = trunk + scalar head; an untied LM head is dropped),
    trained by the value loss only, as in Ziegler et al. 2019 and most open
    PPO-for-LM implementations.
  * ``"shared"``: the value head sits on the policy's own trunk; the value loss
    then also shapes the policy's features (cheaper, less stable).

Token layout (shared conventions): a rollout row is ``left-padded prompt ++
right-padded response``; ``loss_mask`` is 1 on generated tokens (EOS
included), whose log-probs come from the logits at t−1.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.data import tokenize as tokenize_lib
from prefjax.data import truncation
from prefjax.losses import policy as policy_losses
from prefjax.models import heads as heads_lib
from prefjax.models import sampling

Array = jax.Array
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("reference")))


class PolicyBundle(nnx.Module):
  """``policy`` (trained), ``reference`` (frozen) and optional ``value`` (trained)."""

  def __init__(self, policy: nnx.Module, reference: nnx.Module, value: nnx.Module | None):
    self.policy = policy
    self.reference = reference
    self.value = value


def build_bundle(policy: nnx.Module, *, with_value: bool, value_trunk: str = "separate",
                 seed: int = 0) -> PolicyBundle:
  """Reference = a frozen copy of ``policy``; value model per ``value_trunk``."""
  reference = nnx.clone(policy)
  value = None
  if with_value:
    if value_trunk == "separate":
      trunk = nnx.clone(policy)
      # The value head replaces an untied LM head: left in, it would be D x V parameters
      # with zero gradients that the optimizer still carries and checkpoints still store.
      getattr(trunk, "drop_output_head", lambda: None)()
    elif value_trunk == "shared":
      trunk = policy
    else:
      raise ValueError(f"value_trunk must be 'separate' or 'shared', got {value_trunk!r}")
    value = heads_lib.ValueModel(trunk, rngs=nnx.Rngs(seed))
  return PolicyBundle(policy, reference, value)


class Prompts(NamedTuple):
  """``texts`` (the reward's view) and left-padded ``tokens``/``mask`` [B, P] int32."""
  texts: list[str]
  tokens: np.ndarray
  mask: np.ndarray

  def repeat(self, k: int) -> "Prompts":
    """Each prompt k times in a row (groups of k for RLOO)."""
    return Prompts([t for t in self.texts for _ in range(k)],
                   np.repeat(self.tokens, k, axis=0), np.repeat(self.mask, k, axis=0))


def encode_prompts(texts: Sequence[str], token_ids: Sequence[Sequence[int]], *,
                   pad_id: int, max_length: int, pad_to_max: bool = True,
                   bos_id: int | None = None) -> Prompts:
  """Left-pads token ids; over-long prompts keep their END (and their leading ``bos_id``).

  With ``pad_to_max`` every batch is ``max_length`` wide, so sampling and the
  update compile once per run instead of once per distinct prompt length.
  """
  if not texts:
    raise ValueError("encode_prompts: no prompts")
  ids = [truncation.left_truncate(list(x), max_length, bos_id) for x in token_ids]
  empty = [i for i, x in enumerate(ids) if not x]
  if empty:
    raise ValueError(f"encode_prompts: prompt {empty[0]} ({texts[empty[0]]!r}) has no tokens")
  length = max_length if pad_to_max else max(len(x) for x in ids)
  tokens = np.full((len(ids), length), pad_id, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for i, row in enumerate(ids):
    tokens[i, length - len(row):], mask[i, length - len(row):] = row, 1
  return Prompts(list(texts), tokens, mask)


class Rollout(NamedTuple):
  """Sampled responses: full rows ``[B, P+N]``, the decoded response texts, and whether
  each response ended with a stop token (``finished``: EOS, a chat end of turn) or was cut at ``max_new_tokens``."""
  tokens: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  prompts: list[str]
  responses: list[str]
  finished: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return self.loss_mask.sum(axis=1)


def sample(policy: nnx.Module, prompts: Prompts, rng: Array, *, tokenizer: Any,
           max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> Rollout:
  """Samples one response per prompt row with the KV-cache ``generate``."""
  stops = tokenize_lib.stop_ids(tokenizer)
  gen = sampling.generate(policy, prompts.tokens, prompts.mask, rng=rng,
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_id=stops, pad_id=tokenizer.pad_id)
  resp_tokens, resp_mask = np.asarray(gen.tokens), np.asarray(gen.mask)
  tokens = np.concatenate([prompts.tokens, resp_tokens], axis=1)
  attention = np.concatenate([prompts.mask, resp_mask], axis=1)
  loss_mask = np.concatenate([np.zeros_like(prompts.mask), resp_mask], axis=1)
  responses = [tokenizer.decode([t for t, m in zip(row, mrow) if m and t not in stops])
               for row, mrow in zip(resp_tokens.tolist(), resp_mask.tolist())]
  finished = np.any(np.isin(resp_tokens, stops) & (resp_mask > 0), axis=1)
  return Rollout(tokens, attention, loss_mask, list(prompts.texts), responses, finished)


class TokenStats(NamedTuple):
  """Per-token statistics of a rollout, ``[B, T]`` float32, 0 off the response.

  ``values[:, t]`` is the value of the state BEFORE response token t (the value
  model's output at t−1); ``exact_kl`` and ``entropy`` are full-vocabulary
  quantities (zeros unless requested).
  """
  logp: Array
  ref_logp: Array
  values: Array
  exact_kl: Array
  entropy: Array


def token_stats(bundle: PolicyBundle, tokens: Array, attention_mask: Array, loss_mask: Array,
                *, full_vocab: bool = False, with_reference: bool = True) -> TokenStats:
  """Policy/reference log-probs, values and optional exact KL/entropy (traceable).

  ``with_reference=False`` skips the reference forward (``ref_logp`` and
  ``exact_kl`` are zeros), e.g. inside the policy update.
  """
  mask = loss_mask.astype(jnp.float32)
  zeros = jnp.zeros_like(mask)
  logits = bundle.policy(tokens, attention_mask=attention_mask)
  logp = sampling.token_logps(logits, tokens) * mask
  ref_logp = zeros
  if with_reference:
    ref_logits = jax.lax.stop_gradient(bundle.reference(tokens, attention_mask=attention_mask))
    ref_logp = sampling.token_logps(ref_logits, tokens) * mask
  values = zeros
  if bundle.value is not None:
    full = bundle.value(tokens, attention_mask=attention_mask)
    values = jnp.pad(full[:, :-1], ((0, 0), (1, 0))) * mask
  exact, entropy = zeros, zeros
  if full_vocab:
    # The distribution of token t is predicted at t−1.
    prev = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    if with_reference:
      exact = jnp.pad(policy_losses.exact_kl(logits, ref_logits, prev)[:, :-1],
                      ((0, 0), (1, 0)))
    entropy = jnp.pad(policy_losses.entropy_from_logits(logits, prev)[:, :-1],
                      ((0, 0), (1, 0)))
  return TokenStats(logp, ref_logp, values, exact, entropy)
