"""Batched autoregressive sampling with a KV cache, and sequence log-probabilities.

``generate`` runs one jit-compiled program per (model structure, shapes,
sampling flags): a prefill of the left-padded prompts (``Decoder.prefill``),
then a ``lax.while_loop`` that decodes one token per step and stops as soon as
every row has emitted EOS. The model is passed through ``nnx.split`` so the
jitted function sees its graph definition (static, hashable) and its parameters
(traced); repeated calls with the same shapes reuse the compiled program.

Log-probabilities returned by ``generate`` are, by default, those of the
UNDERLYING model: ``log_softmax(logits)[token]`` at temperature 1 without
top-k/top-p filtering, which is what KL penalties and importance ratios
against the policy need. ``tempered_logps=True`` returns the log-probabilities
of the distribution actually sampled from (tempered and filtered) instead. They are the
KV-cache program's values: in bfloat16 they differ from a full forward's by about 0.015
nats a token (float32: 1e-6), so the RL trainers recompute the old log-probs with the
training forward; do the same before using them as importance-ratio denominators.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.models import segments as seg

Array = jax.Array

# Number of times the generation program was traced, keyed by function name
# (tests use it to check that repeated calls with equal shapes do not retrace).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


class Generation(NamedTuple):
  """Generated continuations, right-padded.

  tokens: ``[B, N]`` int32; after a row's EOS every token is ``pad_id``.
  logps: ``[B, N]`` float32 log-prob of each generated token (0 where mask is 0).
  mask: ``[B, N]`` int32, 1 for generated tokens including the EOS itself.
  """

  tokens: Array
  logps: Array
  mask: Array


def top_k_filter(logits: Array, k: int) -> Array:
  """Keeps the ``k`` largest logits of the last axis, sets the rest to -inf (ties kept)."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: Array, p: float | Array, *, iterations: int = 40) -> Array:
  """Nucleus filter: keeps the smallest set of top tokens whose probability mass is >= p.

  The Curious Case of Neural Text Degeneration (arXiv:1904.09751). A token is
  kept when the mass of the tokens ranked strictly above it is < p, so the
  most likely token always survives; ties with the last kept token are kept.

  Implemented without sorting the vocabulary (slow on CPU, and this runs every
  decoding step): bisection finds the largest probability threshold t with
  mass(probs >= t) >= p, then keeps probs >= t. The bisection keeps ``lo``
  feasible, so at most tokens within 2**-iterations below the exact threshold
  are kept in addition.
  """
  if isinstance(p, (int, float)) and p >= 1.0:  # every token (float32 mass rounds to 1)
    return logits
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  mass_at_least = lambda t: jnp.sum(jnp.where(probs >= t, probs, 0.0), axis=-1, keepdims=True)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    feasible = mass_at_least(mid) >= p
    return jnp.where(feasible, mid, lo), jnp.where(feasible, hi, mid)

  lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.float32)
  hi = jnp.max(probs, axis=-1, keepdims=True) * (1 + 1e-6) + 1e-30
  lo, _ = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
  return jnp.where(probs >= lo, logits, -jnp.inf)


def categorical(rng: Array, logits: Array, *, block: int = 128) -> Array:
  """One draw per row from ``softmax(logits [B, V])`` (``-inf`` = excluded) by inverse CDF.

  Two uniforms per row instead of ``jax.random.categorical``'s V Gumbel draws,
  whose threefry bits dominated a CPU sampling step (2026-12-01, 64 x 8,192
  logits: 59 ms against 2 ms for argmax). The CDF is two-level: the first uniform
  picks a ``block``-wide vocabulary block by the blocks' masses, the second a token
  by the cumulative sum inside it (P(block)·P(token | block) = P(token)). A draw
  that float rounding pushes past the end falls back to the last token of positive
  probability, so excluded tokens never come out.
  """
  b, v = logits.shape
  nb = -(-v // block)
  logits = jnp.pad(logits.astype(jnp.float32), ((0, 0), (0, nb * block - v)),
                   constant_values=-jnp.inf)
  p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).reshape(b, nb, block)
  within = jnp.cumsum(p, axis=-1)                      # [B, nb, block]
  cum = jnp.cumsum(within[..., -1], axis=-1)           # [B, nb]
  # One uniform picks the block, a second the token inside it: one uniform for both
  # resolved a token only to 2^-23 of the total mass (a third of a 49k vocabulary's
  # tokens could never be drawn); the second resolves 2^-23 of the block's mass.
  u = jax.random.uniform(rng, (b, 2), jnp.float32)
  last = lambda positive: positive.shape[-1] - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
  j = jnp.minimum(jnp.sum(cum <= u[:, :1] * cum[:, -1:], axis=-1), last(within[..., -1] > 0))
  rows = jnp.arange(b)
  in_block = within[rows, j]                            # [B, block]
  rest = u[:, 1] * in_block[:, -1]
  i = jnp.minimum(jnp.sum(in_block <= rest[:, None], axis=-1), last(p[rows, j] > 0))
  return (j * block + i).astype(jnp.int32)


def _pick(logits: Array, tokens: Array) -> Array:
  """``log_softmax(logits)[..., tokens]`` without materialising the log-softmax."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _sample_step(logits: Array, rng: Array, temperature: Array, top_p: Array, *,
                 greedy: bool, top_k: int | None, use_top_p: bool,
                 tempered_logps: bool) -> tuple[Array, Array]:
  """Draws one token per row from ``logits [B, V]``; returns (tokens, logps)."""
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, (jnp.zeros(tokens.shape, jnp.float32) if tempered_logps
                    else _pick(logits, tokens))
  scaled = logits / temperature
  if top_k is not None:
    scaled = top_k_filter(scaled, top_k)
  if use_top_p:
    scaled = top_p_filter(scaled, top_p)
  tokens = categorical(rng, scaled)
  return tokens, _pick(scaled if tempered_logps else logits, tokens)


class _LoopState(NamedTuple):
  step: Array
  cache: object
  logits: Array
  tokens: Array
  logps: Array
  mask: Array
  done: Array
  rng: Array


PHASE_STEPS = 32  # decoding steps per phase at least
MAX_PHASES = 4


def default_cache_phases(max_new_tokens: int) -> int:
  """One phase per ``PHASE_STEPS`` new tokens, at most ``MAX_PHASES``.

  Each phase compiles its own copy of the decoding step; beyond four the
  saving stopped paying for it (batch 64, 64-token prompts, 128 new tokens,
  25M decoder on a 2-core CPU: 1 phase 4.35 s, 2: 4.21, 4: 3.63, 8: 3.90).
  """
  return max(1, min(MAX_PHASES, max_new_tokens // PHASE_STEPS))


def phase_ends(decode_steps: int, phases: int) -> tuple[int, ...]:
  """Step counts at which each decoding phase ends: ``phases`` near-equal parts of
  ``decode_steps`` (fewer when there are fewer steps), the last ending at ``decode_steps``."""
  if phases < 1:
    raise ValueError(f"cache_phases must be >= 1, got {phases}")
  ends = sorted({-(-j * decode_steps // phases) for j in range(1, phases + 1)})
  return tuple(ends) if decode_steps else (0,)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p", "tempered_logps",
    "cache_phases"))
def _generate_jit(graphdef, state, prompt_tokens, prompt_mask, rng, temperature, top_p,
                  stop_ids, pad_id, *, max_new_tokens, greedy, top_k, use_top_p,
                  tempered_logps, cache_phases):
  """The whole generation program; ``stop_ids`` ``[K]``, -1 where unused.

  Token ``i`` is sampled from the logits of the tokens before it, so the last
  token needs no forward pass: ``max_new_tokens - 1`` decoding steps. They run
  in ``cache_phases`` loops whose cache holds only the slots written by the end
  of the phase, then grows (``KVCache.grown``): each step's attention reads
  ``prompt + phase end`` slots instead of ``prompt + max_new_tokens``.
  """
  TRACE_COUNTS["generate"] += 1
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_tokens.shape
  ends = phase_ends(max_new_tokens - 1, cache_phases)
  logits, cache = model.prefill(prompt_tokens, prompt_len + ends[0], attention_mask=prompt_mask)
  sample = functools.partial(_sample_step, greedy=greedy, top_k=top_k,
                             use_top_p=use_top_p, tempered_logps=tempered_logps)

  def record(s: _LoopState) -> tuple[_LoopState, Array, Array]:
    """Samples token ``s.step`` from ``s.logits`` and writes it; returns (state, tokens, live)."""
    rng, step_rng = jax.random.split(s.rng)
    tokens, logps = sample(s.logits, step_rng, temperature, top_p)
    live = ~s.done
    tokens = jnp.where(live, tokens, pad_id)
    return s._replace(
        tokens=s.tokens.at[:, s.step].set(tokens),
        logps=s.logps.at[:, s.step].set(jnp.where(live, logps, 0.0)),
        mask=s.mask.at[:, s.step].set(live.astype(jnp.int32)),
        done=s.done | (live & jnp.any(tokens[:, None] == stop_ids, axis=1)), rng=rng), tokens, live

  # A tied embedding's transpose, materialized once: a dot reading the [V, D]
  # embedding transposed ran 2x slower at batch 16 on XLA CPU.
  kernel = {"output_kernel": model.output_kernel()} if hasattr(model, "output_kernel") else {}

  def body(s: _LoopState) -> _LoopState:
    s, tokens, live = record(s)
    logits, cache = model.extend(tokens[:, None], s.cache,
                                 attention_mask=live[:, None].astype(jnp.int32), **kernel)
    return s._replace(step=s.step + 1, cache=cache, logits=logits[:, -1])

  s = _LoopState(
      step=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1],
      tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),  # traced fill value
      logps=jnp.zeros((batch, max_new_tokens), jnp.float32),
      mask=jnp.zeros((batch, max_new_tokens), jnp.int32),
      done=jnp.zeros((batch,), bool), rng=rng)
  for phase, end in enumerate(ends):
    if phase:
      s = s._replace(cache=s.cache.grown(prompt_len + end))
    s = jax.lax.while_loop(lambda s, end=end: (s.step < end) & ~jnp.all(s.done), body, s)
  s, _, _ = record(s)  # the last token (a no-op when every row is done)
  return Generation(s.tokens, s.logps, s.mask)


def _check_left_padded(prompt_mask: Array) -> None:
  """Prefill continues from each row's last slot: a right-padded prompt would continue
  from padding (silently other samples). Checked where this process holds the whole mask."""
  if isinstance(prompt_mask, jax.core.Tracer) or (
      isinstance(prompt_mask, jax.Array) and not prompt_mask.is_fully_addressable):
    return
  mask = np.asarray(prompt_mask) > 0
  rows = np.flatnonzero(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1))
  if rows.size:
    raise ValueError(f"prompt rows {rows[:5].tolist()} are padded on the right: generate "
                     "continues from each row's last slot, so prompts must be left-padded "
                     "(padding first, mask 0...0 1...1)")


def check_settings(*, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_k: int | None = None, top_p: float | None = None,
                   prefix: str = "") -> None:
  """The ranges of ``generate``'s settings (None: not given); ``prefix`` names their config
  section in the errors (``"sampling."``), so a binary can check them before building."""
  if max_new_tokens is not None and max_new_tokens < 1:
    raise ValueError(f"{prefix}max_new_tokens={max_new_tokens} must be >= 1")
  if temperature is not None and temperature < 0:
    raise ValueError(f"{prefix}temperature={temperature} must be >= 0 (0 decodes greedily)")
  if top_k is not None and top_k < 1:
    raise ValueError(f"{prefix}top_k={top_k} must be >= 1 (None samples the whole vocabulary)")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"{prefix}top_p={top_p} must be in (0, 1] (None keeps every token)")


def generate(model: nnx.Module, prompt_tokens: Array, prompt_mask: Array, *,
             rng: Array | None = None, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
             tempered_logps: bool = False, cache_phases: int | None = None) -> Generation:
  """Samples ``max_new_tokens`` continuations of LEFT-padded prompts.

  Args:
    model: a ``Decoder`` (anything with ``init_cache`` and ``extend``).
    prompt_tokens: ``[B, P]`` int32, left-padded.
    prompt_mask: ``[B, P]``, 1 on real prompt tokens.
    rng: PRNG key; required when ``temperature > 0``, unused (may be None) when 0.
    max_new_tokens: number of decoding steps at most.
    temperature: softmax temperature; 0 means greedy (argmax).
    top_k: keep only the k most likely tokens before sampling.
    top_p: nucleus sampling mass (after temperature and top_k, as in Hugging Face; tokens
      tied with the last one kept are all kept, where Hugging Face cuts by sort order).
    eos_id: generation of a row stops after it emits this token, or any of these tokens
      (``tokenize.stop_ids(tokenizer)``: EOS and a chat model's end of turn); None: every
      row runs ``max_new_tokens``, past the end of its turn.
    pad_id: token written after EOS (with mask 0).
    tempered_logps: return log-probs of the tempered/filtered sampling
      distribution instead of the model's own (see module docstring).
    cache_phases: decode in this many loops over a growing KV cache, so that
      early steps read fewer cache slots (same tokens; each phase compiles its
      own copy of the decoding step). 1: one loop over a full-size cache;
      default ``default_cache_phases(max_new_tokens)``.

  Returns:
    ``Generation(tokens [B, N], logps [B, N], mask [B, N])`` with N = max_new_tokens.
  """
  chex.assert_rank([prompt_tokens, prompt_mask], 2)
  chex.assert_equal_shape([prompt_tokens, prompt_mask])
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p)
  if rng is None:
    if temperature > 0:
      raise ValueError(f"temperature={temperature} samples: pass rng=jax.random.key(seed) "
                       "(temperature=0 decodes greedily without one)")
    rng = jax.random.key(0)  # unused by greedy decoding
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if top_k is not None and vocab is not None and top_k > vocab:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}")
  _check_left_padded(prompt_mask)
  stop_ids = _stop_ids(eos_id)
  if hasattr(model, "check_positions"):  # the last token sampled is never fed back
    model.check_positions(prompt_tokens.shape[1] + max_new_tokens - 1)
  graphdef, state = nnx.split(model)
  return _generate_jit(
      graphdef, state, jnp.asarray(prompt_tokens, jnp.int32),
      jnp.asarray(prompt_mask, jnp.int32), rng,
      jnp.float32(temperature if temperature > 0 else 1.0),
      jnp.float32(1.0 if top_p is None else top_p),
      jnp.asarray(stop_ids, jnp.int32), jnp.int32(pad_id),
      max_new_tokens=int(max_new_tokens), greedy=temperature == 0, top_k=top_k,
      use_top_p=top_p is not None and top_p < 1.0, tempered_logps=tempered_logps,
      cache_phases=int(default_cache_phases(max_new_tokens) if cache_phases is None
                       else cache_phases))


def _stop_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
  """``generate``'s ``eos_id`` as a non-empty tuple of ids, (-1,) for none."""
  ids = () if eos_id is None else (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  for i in ids:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
      raise ValueError(f"eos_id must be token ids >= 0, got {eos_id!r}")
  return tuple(int(i) for i in ids) or (-1,)


def token_logps(logits: Array, tokens: Array) -> Array:
  """``out[n, t] = log p(tokens[n, t] | tokens[n, <t])`` from next-token ``logits [N, T, V]``.

  The prediction for token t comes from the logits at t-1; position 0 gets 0.
  """
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape_prefix([logits, tokens], 2)
  # Shift the [N, T] token ids, not the [N, T, V] logits (slicing those copies them).
  following = jnp.pad(tokens[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
  return jnp.pad(_pick(logits, following)[:, :-1], ((0, 0), (1, 0)))


def token_entropy(logits: Array) -> Array:
  """Entropy ``-sum_v p_v log p_v`` of the next-token distribution, ``[..., V] -> [...]``."""
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def sequence_logps(model: nnx.Module, tokens: Array, loss_mask: Array, *,
                   attention_mask: Array | None = None, segment_ids: Array | None = None,
                   positions: Array | None = None, num_segments: int | None = None,
                   prefix_ids: Array | None = None) -> tuple[Array, Array]:
  """Summed and per-token log-probs of the tokens selected by ``loss_mask``.

  ``attention_mask`` defaults to all ones: pass it for any padded row (a left-padded
  prompt from ``generate`` included), or the padding is attended and the log-probs are
  those of another context.

  ``per_token[n, t] = log p(tokens[n, t] | tokens[n, <t]) * loss_mask[n, t]``;
  position 0 and, in packed rows, the first token of every segment get 0 (their
  context would cross a segment boundary). ``summed`` is ``[N]`` for a padded
  batch and ``[R, S + 1]`` per segment for a packed one (``segment_ids`` and
  ``num_segments`` given; column 0 is padding). Shared-prompt pairs
  (``prefix_ids``, see ``prefjax.data.packing``): a response's first token is
  predicted from its prompt's last token, wherever the response sits in the row.
  ``positions`` (``[N, T]``, default from the mask or segments) are the rotary positions
  of the tokens, as the pipeline's packed and shared-prompt rows carry them.
  """
  chex.assert_equal_shape([tokens, loss_mask])
  if segment_ids is not None and num_segments is None:
    raise ValueError("sequence_logps: num_segments is required with segment_ids")
  if prefix_ids is not None:
    return _shared_prompt_logps(model, tokens, loss_mask, segment_ids, positions,
                                num_segments, prefix_ids)
  logits = model(tokens, attention_mask=attention_mask, segment_ids=segment_ids,
                 positions=positions)
  per_token = token_logps(logits, tokens) * loss_mask.astype(jnp.float32)
  if segment_ids is None:
    return jnp.sum(per_token, axis=-1), per_token
  per_token = jnp.where(seg.continues_run(segment_ids), per_token, 0.0)
  return seg.segment_sums(per_token, segment_ids, num_segments), per_token


def _shared_prompt_logps(model, tokens, loss_mask, segment_ids, positions, num_segments,
                         prefix_ids) -> tuple[Array, Array]:
  """``sequence_logps`` of shared-prompt rows: every token is scored from the hidden
  state of the slot before it in its own sequence (``predictor_index``)."""
  hidden = model.hidden_states(tokens, segment_ids=segment_ids, positions=positions,
                               prefix_ids=prefix_ids)
  kernel = model.output_kernel()
  source = predictor_index(segment_ids, prefix_ids, num_segments)
  # A segment's first token has no predictor inside its sequence unless it follows a prompt.
  scored = (source >= 0) & (segment_ids > 0) & (loss_mask != 0)
  # The half-the-slots branch is measured on CPU only; elsewhere its lax.cond would add a host
  # sync to every step (as for layers.materialized_rope_tables), so every slot runs.
  length = tokens.shape[1]
  capacity = -(-length // 2) if jax.default_backend() == "cpu" else length
  per_token = logps_at(lambda h: model.logits(h, kernel), hidden, source, tokens, scored,
                       capacity=capacity)
  per_token = per_token * loss_mask.astype(jnp.float32)
  return seg.segment_sums(per_token, segment_ids, num_segments), per_token


def logps_at(logits_fn, hidden: Array, source: Array, tokens: Array, scored: Array, *,
             capacity: int) -> Array:
  """``[R, L]``: ``log p(tokens[r, l])`` from ``logits_fn(hidden[r, source[r, l]])`` where
  ``scored [R, L]``, else 0.

  The output head and log-softmax are the costliest part of a policy's step after
  the blocks (an ``[L, D] x [D, V]`` product forward and two backward, and passes over
  ``[L, V]``), and a shared-prompt row scores only its responses' tokens (≈ 45% of an HH
  row). When the rows hold at most ``R · capacity`` (static) scored slots in all, they
  run on those slots alone, gathered to the front in order; otherwise on every slot.
  Both branches give the same values (a ``lax.cond``: one runs). The slots are pooled
  over the rows, so one long row does not send the batch to the every-slot branch
  while another row is short.
  """
  rows, length = tokens.shape
  tokens = tokens.astype(jnp.int32)

  def compact():
    slots = jnp.argsort(~scored.reshape(-1), stable=True)[:rows * capacity].astype(jnp.int32)
    r, l = slots // length, slots % length
    values = jnp.where(scored[r, l], _pick(logits_fn(hidden[r, source[r, l]]), tokens[r, l]),
                       0.0)
    return jnp.zeros((rows * length,), jnp.float32).at[slots].set(
        values, unique_indices=True).reshape(rows, length)

  def every_slot():
    before = jnp.take_along_axis(hidden, source[..., None], 1)
    return jnp.where(scored, _pick(logits_fn(before), tokens), 0.0)

  if capacity >= length:
    return every_slot()
  return jax.lax.cond(jnp.sum(scored) <= rows * capacity, compact, every_slot)


def predictor_index(segment_ids: Array, prefix_ids: Array, num_segments: int) -> Array:
  """``[R, L]`` slot whose next-token logits predict each token: the slot before it in
  the same segment; for a response's first token, its prompt's last slot; -1 for a
  segment start that follows nothing (a prompt's first token, padding)."""
  idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
  prompt_last = jnp.take_along_axis(seg.segment_last_index(segment_ids, num_segments),
                                    prefix_ids, axis=1)
  return jnp.where(seg.continues_run(segment_ids), idx - 1,
                   jnp.where(prefix_ids != segment_ids, prompt_last, -1))
