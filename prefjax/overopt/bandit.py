"""The bandit world of the overoptimization study: candidates, gold, learned proxies.

Each of P prompts has M candidate responses, each a feature vector φ ∈ R^d.
The reference policy is a softmax over a prompt's candidates,
π_ref(m | p) ∝ exp(s_ref(φ_pm)/T), and the gold reward is a larger fixed random
"teacher" network, standardised so that E_{p ~ U, m ~ π_ref}[gold] = 0 and
Var = 1. Proxy reward models (small GELU MLPs) are trained with the project's
reward-model loss and train step on pairs drawn from π_ref and labelled by gold,
then scored on every candidate, so best-of-n and the KL-regularised RL path are
computed EXACTLY over the finite candidate sets (``prefjax.overopt.exact``),
as in Gao, Schulman, Hilton, "Scaling Laws for Reward Model Overoptimization",
arXiv:2210.10760, at bandit scale.

What makes the gold curve decline (``RESEARCH_NOTES.md``): heavy-tailed
features. With Student-t(3) coordinates the proxy's error grows off
distribution, where best-of-n and RL push; Gaussian features give a monotone
gold curve.

World generation is float64 NumPy (host, deterministic per seed); proxy
training is float32 JAX, all K members of a size in ONE jitted program (their
parameters stacked on a leading K axis, each member on its own pair sample and
own initialisation). The learned-policy RL variant lives in
``prefjax.overopt.policy_net`` and is re-exported here.

API: ``WorldConfig``/``make_world``/``World``, ``standardize``,
``sample_pairs``/``heldout_pairs``/``Pairs``/``pair_accuracy``,
``ProxyConfig``/``train_proxies``/``Proxies``, ``tail_residuals``; and from
``policy_net``: ``PolicyConfig``, ``policy_log_probs``, ``train_policy``,
``kl_regularized_loss``.

Measured here (2 CPU cores, quiet): ``make_world(WorldConfig())`` ≈ 4 s;
``train_proxies`` with K = 5, N = 10k, 2,000 steps ≈ 3 s (w ≤ 32), 6 s
(w = 64), 10 s (w = 128), compilation and scoring included.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special

from prefjax.overopt import world_seeds
from prefjax.overopt.policy_net import PolicyConfig  # noqa: F401  (re-exported)
from prefjax.overopt.policy_net import PolicyMLP  # noqa: F401  (re-exported)
from prefjax.overopt.policy_net import StackedMLP
from prefjax.overopt.policy_net import kl_regularized_loss  # noqa: F401  (re-exported)
from prefjax.overopt.policy_net import policy_log_probs  # noqa: F401  (re-exported)
from prefjax.overopt.policy_net import preference_loss
from prefjax.overopt.policy_net import proxy_loss_fn
from prefjax.overopt.policy_net import score_candidates
from prefjax.overopt.policy_net import train_policy  # noqa: F401  (re-exported)
from prefjax.train import schedules
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

# Entropy tags that keep the world's random streams independent of each other. They start
# at 1: SeedSequence ignores trailing zeros, so a tag 0 stream would be the plain seed's,
# which the estimator check (criteria.estimator_check) and seed-0 bootstraps draw from.
_FEATURES, _OFFSETS, _REF_NET, _GOLD_NET, _TRAIN_PAIRS, _HELDOUT_PAIRS, _BATCHES = range(1, 8)
_ROW_CHUNK = 1 << 16   # candidates per float64 MLP chunk (≈130 MB at width 256)


# ----------------------------------------------------------------------------- world


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """A bandit world; defaults are the world of ``RESEARCH_NOTES.md`` (seed 0).

  Attributes:
    num_prompts: P prompts.
    num_candidates: M candidate responses per prompt.
    feature_dim: d features per candidate.
    tail_df: Student-t degrees of freedom of every feature coordinate, rescaled
      to variance 1 (needs > 2); ``math.inf`` gives Gaussian features.
    prompt_offset_sd: per-prompt offset N(0, sd²·I) added to all its candidates.
    ref_hidden: width of s_ref, a random tanh MLP d → ref_hidden → 1,
      standardised over all P·M candidates.
    ref_temperature: T in π_ref ∝ exp(s_ref/T).
    gold_hidden: width of the gold teacher, a tanh MLP d → h → h → 1.
    gold_weight_scale: teacher (and s_ref) weights ~ N(0, scale²/fan_in).
    gold_bias_sd: teacher (and s_ref) biases ~ N(0, sd²).
    seed: world seed; every array is a deterministic function of the config.
  """
  num_prompts: int = 64
  num_candidates: int = 8192
  feature_dim: int = 32
  tail_df: float = 3.0
  prompt_offset_sd: float = 0.5
  ref_hidden: int = 32
  ref_temperature: float = 1.0
  gold_hidden: int = 256
  gold_weight_scale: float = 1.5
  gold_bias_sd: float = 0.1
  seed: int = 0

  def __post_init__(self):
    for name in ("num_prompts", "feature_dim", "ref_hidden", "gold_hidden"):
      if getattr(self, name) < 1:
        raise ValueError(f"WorldConfig.{name}={getattr(self, name)} must be >= 1")
    if self.num_candidates < 2:
      raise ValueError(f"WorldConfig.num_candidates={self.num_candidates} must be >= 2")
    if not self.tail_df > 2:
      raise ValueError(f"WorldConfig.tail_df={self.tail_df} must be > 2 (finite variance); "
                       "use math.inf for Gaussian features")
    if not (self.prompt_offset_sd >= 0 and self.gold_bias_sd >= 0):
      raise ValueError("WorldConfig.prompt_offset_sd and gold_bias_sd must be >= 0")
    if not (self.ref_temperature > 0 and self.gold_weight_scale > 0):
      raise ValueError("WorldConfig.ref_temperature and gold_weight_scale must be > 0")


class World(NamedTuple):
  """A generated bandit world.

  Attributes:
    features: ``[P, M, d]`` float32 candidate features (what proxies see).
    ref_logits: ``[P, M]`` float64 log π_ref, normalised per prompt.
    gold: ``[P, M]`` float64 gold reward, mean 0 / variance 1 under π_ref
      (pooled over prompts, uniform over prompts).
    config: the ``WorldConfig`` it was generated from.
  """
  features: np.ndarray
  ref_logits: np.ndarray
  gold: np.ndarray
  config: WorldConfig


def _rng(*entropy: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def _random_tanh_mlp(rng: np.random.Generator, sizes: Sequence[int], weight_scale: float,
                     bias_sd: float) -> list[tuple[np.ndarray, np.ndarray]]:
  """Layers (W ~ N(0, scale²/fan_in), b ~ N(0, bias_sd²)) of a d → ... → 1 tanh MLP."""
  return [(rng.normal(0.0, weight_scale / math.sqrt(n_in), (n_in, n_out)),
           rng.normal(0.0, bias_sd, n_out)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


def _apply_tanh_mlp(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
  """float64 forward of a tanh MLP on ``[..., d]`` rows, chunked; returns ``[...]``."""
  flat = x.reshape(-1, x.shape[-1])
  out = np.empty(flat.shape[0], np.float64)
  for start in range(0, flat.shape[0], _ROW_CHUNK):
    h = flat[start:start + _ROW_CHUNK].astype(np.float64)
    for w, b in layers[:-1]:
      h = np.tanh(h @ w + b)
    w, b = layers[-1]
    out[start:start + _ROW_CHUNK] = (h @ w + b)[:, 0]
  return out.reshape(x.shape[:-1])


def _features(config: WorldConfig) -> np.ndarray:
  """φ = t(df)·√((df−2)/df) per coordinate (variance 1) + per-prompt N(0, sd²I) offset."""
  shape = (config.num_prompts, config.num_candidates, config.feature_dim)
  rng = _rng(config.seed, _FEATURES)
  if math.isinf(config.tail_df):
    x = rng.standard_normal(shape)
  else:
    x = rng.standard_t(config.tail_df, shape) * math.sqrt((config.tail_df - 2) / config.tail_df)
  offsets = _rng(config.seed, _OFFSETS).normal(
      0.0, config.prompt_offset_sd, (config.num_prompts, 1, config.feature_dim))
  return (x + offsets).astype(np.float32)


def make_world(config: WorldConfig = WorldConfig()) -> World:
  """Generates the world: features, log π_ref and standardised gold (float64 NumPy).

  s_ref is standardised over all P·M candidates (uniform), then
  log π_ref = log_softmax(s_ref/T) per prompt; gold is standardised under
  π_ref with :func:`standardize`. Both networks read the float32 features, so
  a proxy sees exactly the inputs gold was computed from.
  """
  features = _features(config)
  d = config.feature_dim
  ref_net = _random_tanh_mlp(_rng(config.seed, _REF_NET), [d, config.ref_hidden, 1],
                             config.gold_weight_scale, config.gold_bias_sd)
  s_ref = _apply_tanh_mlp(ref_net, features)
  s_ref = (s_ref - s_ref.mean()) / s_ref.std()
  logits = s_ref / config.ref_temperature
  ref_logits = logits - special.logsumexp(logits, axis=1, keepdims=True)
  gold_net = _random_tanh_mlp(_rng(config.seed, _GOLD_NET),
                              [d, config.gold_hidden, config.gold_hidden, 1],
                              config.gold_weight_scale, config.gold_bias_sd)
  gold = standardize(ref_logits, _apply_tanh_mlp(gold_net, features))
  return World(features, ref_logits, gold, config)


def standardize(ref_logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Affine map to mean 0 / variance 1 pooled over prompts (uniform) × π_ref, float64.

  μ = (1/P) Σ_p Σ_m π_ref(m|p)·s_pm,  σ² = (1/P) Σ_p Σ_m π_ref(m|p)·(s_pm − μ)²,
  returns (s − μ)/σ.

  Args:
    ref_logits: ``[P, M]`` π_ref logits or log-probs (normalised here in float64).
    scores: ``[P, M]``, or ``[K, P, M]`` (each of the K members standardised on its own).

  Returns:
    float64 array of the shape of ``scores``.
  """
  ref_logits = np.asarray(ref_logits, np.float64)
  scores = np.asarray(scores, np.float64)
  if ref_logits.ndim != 2 or scores.shape[-2:] != ref_logits.shape or scores.ndim > 3:
    raise ValueError(f"standardize: scores {scores.shape} must be [P, M] or [K, P, M] with "
                     f"[P, M] = ref_logits.shape {ref_logits.shape}")
  if not np.isfinite(scores).all():
    raise ValueError("standardize: scores must be finite")
  weights = np.exp(ref_logits - special.logsumexp(ref_logits, axis=1, keepdims=True))
  weights /= weights.sum(axis=1, keepdims=True) * ref_logits.shape[0]
  mean = np.sum(weights * scores, axis=(-2, -1), keepdims=True)
  var = np.sum(weights * np.square(scores - mean), axis=(-2, -1), keepdims=True)
  if np.any(var <= 0):
    raise ValueError("standardize: scores are constant under pi_ref (variance 0)")
  return (scores - mean) / np.sqrt(var)


# ----------------------------------------------------------------------------- pairs


class Pairs(NamedTuple):
  """Gold-labelled comparisons; ``[N]`` int32 each (candidate indices within the prompt)."""
  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray


def _sample_ref(world: World, rng: np.random.Generator, prompt: np.ndarray) -> np.ndarray:
  """One candidate per row from π_ref(· | prompt) by inverse CDF, ``[N]``."""
  num_prompts, m = world.ref_logits.shape
  cdf = np.cumsum(np.exp(world.ref_logits), axis=1)
  cdf /= cdf[:, -1:]
  cdf[:, -1] = 1.0
  offset_cdf = (cdf + np.arange(num_prompts)[:, None]).ravel()   # increasing over prompts
  flat = np.searchsorted(offset_cdf, prompt + rng.random(prompt.shape), side="right")
  return np.minimum(flat - prompt * m, m - 1)


def _sample_pairs(world: World, num_pairs: int, label_noise: float,
                  rng: np.random.Generator) -> Pairs:
  if num_pairs < 1:
    raise ValueError(f"num_pairs={num_pairs} must be >= 1")
  if not 0.0 <= label_noise < 0.5:
    raise ValueError(f"label_noise={label_noise} must be in [0, 0.5)")
  prompt = rng.integers(0, world.ref_logits.shape[0], num_pairs)
  a = _sample_ref(world, rng, prompt)
  b = _sample_ref(world, rng, prompt)
  for _ in range(1000):          # rejection: a pair of one candidate with itself has no label
    same = a == b
    if not same.any():
      break
    a[same] = _sample_ref(world, rng, prompt[same])
    b[same] = _sample_ref(world, rng, prompt[same])
  else:
    raise ValueError("pi_ref is too concentrated to draw pairs of distinct candidates")
  a_wins = world.gold[prompt, a] > world.gold[prompt, b]
  flip = rng.random(num_pairs) < label_noise
  a_chosen = a_wins ^ flip
  return Pairs(prompt.astype(np.int32), np.where(a_chosen, a, b).astype(np.int32),
               np.where(a_chosen, b, a).astype(np.int32))


def sample_pairs(world: World, num_pairs: int, *, label_noise: float = 0.0,
                 seed: int = 0) -> Pairs:
  """N pairs: prompt ~ U(P), two DISTINCT candidates ~ π_ref × π_ref, labelled by gold.

  chosen = the candidate with the higher gold (deterministic labels), then the
  label is flipped with probability ``label_noise`` ∈ [0, 0.5). A pair that
  drew one candidate twice carries no preference and is redrawn whole
  (rejection sampling), so the pair law is π_ref × π_ref conditioned on a ≠ b. Deterministic per
  (world seed, ``seed``); held-out pairs use a separate stream.
  """
  return _sample_pairs(world, num_pairs, label_noise,
                       _rng(world.config.seed, _TRAIN_PAIRS, seed))


def heldout_pairs(world: World, num_pairs: int) -> Pairs:
  """Noise-free gold-labelled pairs from a stream no training seed uses."""
  return _sample_pairs(world, num_pairs, 0.0, _rng(world.config.seed, _HELDOUT_PAIRS))


def pair_accuracy(scores: np.ndarray, pairs: Pairs) -> np.ndarray:
  """Fraction of pairs where score(chosen) > score(rejected) (ties count ½).

  ``scores`` ``[P, M]`` → scalar, or ``[K, P, M]`` → ``[K]``.
  """
  chosen = scores[..., pairs.prompt, pairs.chosen]
  rejected = scores[..., pairs.prompt, pairs.rejected]
  return np.mean((chosen > rejected) + 0.5 * (chosen == rejected), axis=-1)


class TailResiduals(NamedTuple):
  """Proxy error by how far out a candidate is: bins of t = max_j |φ_j|.

  Attributes:
    edges: ``[B + 1]`` bin edges of t (first 0, last inf).
    mass: ``[B]`` π_ref mass per bin (prompt-averaged).
    residual_sd: ``[..., B]`` √E_{π_ref}[(proxy − gold)² | bin] (leading K axis kept).
  """
  edges: np.ndarray
  mass: np.ndarray
  residual_sd: np.ndarray


def tail_residuals(world: World, scores: np.ndarray,
                   edges: Sequence[float] = (3.0, 5.0, 8.0)) -> TailResiduals:
  """RMS of proxy − gold under π_ref within bins of max_j |φ_j| (``scores`` ``[..., P, M]``).

  The mechanism of the decline (``RESEARCH_NOTES.md``): with heavy-tailed
  features the error grows where max|φ| is large, where optimisation pushes.
  """
  edges = np.concatenate([[0.0], np.asarray(edges, np.float64), [np.inf]])
  t = np.abs(world.features).max(axis=-1)
  weights = np.exp(world.ref_logits) / world.ref_logits.shape[0]
  square = np.square(np.asarray(scores, np.float64) - world.gold)
  mass, sd = [], []
  for lo, hi in zip(edges[:-1], edges[1:]):
    w = weights * ((t >= lo) & (t < hi))
    mass.append(w.sum())
    sd.append(np.sqrt(np.sum(w * square, axis=(-2, -1)) / max(w.sum(), 1e-300)))
  return TailResiduals(edges, np.array(mass), np.stack(sd, axis=-1))


# ----------------------------------------------------------------------------- proxies


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
  """A proxy reward model and how it is trained.

  Attributes:
    width: hidden width w of the GELU MLP d → w (× depth) → 1.
    depth: number of hidden layers.
    num_pairs: N training pairs per member (each member its own sample).
    steps: optimizer updates; batches are epochs of shuffled pairs.
    batch_size: pairs per update (≤ num_pairs).
    learning_rate: AdamW peak learning rate, cosine-decayed to 0 at ``steps``.
    weight_decay: AdamW decoupled weight decay.
    label_noise: probability a gold label is flipped, in [0, 0.5).
    loss: name of a reward-model loss in ``prefjax.losses.preference``
      (``fn(r_chosen, r_rejected) -> [B, K]``).
    warmup_steps: linear warmup before the cosine decay.
    eval_pairs: held-out noise-free pairs for ``gold_accuracy``.
  """
  width: int
  depth: int = 2
  num_pairs: int = 10_000
  steps: int = 2_000
  batch_size: int = 256
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  label_noise: float = 0.0
  loss: str = "bradley_terry"
  warmup_steps: int = 0
  eval_pairs: int = 10_000

  def __post_init__(self):
    for name in ("width", "depth", "num_pairs", "steps", "batch_size", "eval_pairs"):
      if getattr(self, name) < 1:
        raise ValueError(f"ProxyConfig.{name}={getattr(self, name)} must be >= 1")
    if self.batch_size > self.num_pairs:
      raise ValueError(f"ProxyConfig.batch_size={self.batch_size} exceeds "
                       f"num_pairs={self.num_pairs}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"ProxyConfig.warmup_steps={self.warmup_steps} must be in [0, steps)")
    if not (self.learning_rate > 0 and self.weight_decay >= 0):
      raise ValueError("ProxyConfig.learning_rate must be > 0 and weight_decay >= 0")
    if not 0.0 <= self.label_noise < 0.5:
      raise ValueError(f"ProxyConfig.label_noise={self.label_noise} must be in [0, 0.5)")
    preference_loss(self.loss)   # unknown names fail here, not after world generation


class Proxies(NamedTuple):
  """K trained proxies of one size.

  Attributes:
    scores: ``[K, P, M]`` float64, each member standardised under π_ref.
    seeds: the member seeds (init, pair sample and batch order).
    train_loss: ``[K]`` mean training loss over the final epoch of updates.
    train_accuracy: ``[K]`` accuracy on its own (possibly noisy) training pairs.
    gold_accuracy: ``[K]`` accuracy vs gold on fresh held-out π_ref pairs.
    wall_s: wall time of :func:`train_proxies` (compile, train, score).
  """
  scores: np.ndarray
  seeds: tuple[int, ...]
  train_loss: np.ndarray
  train_accuracy: np.ndarray
  gold_accuracy: np.ndarray
  wall_s: float


def _batch_indices(pairs: Sequence[Pairs], seeds: Sequence[int], world_seed: int, steps: int,
                   batch_size: int, num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat candidate indices ``[steps, K, B]`` of chosen/rejected: shuffled epochs per member."""
  chosen, rejected = [], []
  for p, seed in zip(pairs, seeds):
    n = p.prompt.shape[0]
    per_epoch = n // batch_size
    rng = _rng(world_seed, _BATCHES, seed)
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[:per_epoch * batch_size] for _ in range(epochs)])
    order = order[:steps * batch_size].reshape(steps, batch_size)
    base = p.prompt.astype(np.int64) * num_candidates
    chosen.append((base + p.chosen)[order])
    rejected.append((base + p.rejected)[order])
  return (np.stack(chosen, 1).astype(np.int32), np.stack(rejected, 1).astype(np.int32))


def _optimizer(config: ProxyConfig):
  return schedules.make_optimizer(schedules.OptimizerConfig(
      name="adamw", learning_rate=config.learning_rate, schedule="cosine",
      warmup_steps=config.warmup_steps, total_steps=config.steps,
      weight_decay=config.weight_decay, decay_biases_and_norms=True))  # as measured


def _program_key(config: ProxyConfig) -> ProxyConfig:
  """The config with the data-only fields reset: configs with one key share a program."""
  return dataclasses.replace(config, num_pairs=config.batch_size, label_noise=0.0,
                             eval_pairs=1)


@functools.lru_cache(maxsize=64)
def _run_chunk(graphdef: nnx.GraphDef, key: ProxyConfig, num_members: int):
  """The jitted ``lax.scan`` of train steps for one architecture/optimizer (cached)."""
  tx, schedule = _optimizer(key)
  train_step = step_lib.make_train_step(graphdef, proxy_loss_fn(key.loss), tx,
                                        schedule=schedule)

  def run_chunk(state, features, chosen, rejected):
    def body(state, idx):
      batch = {"chosen": features[idx[0]], "rejected": features[idx[1]]}
      state, metrics = train_step(state, batch)
      return state, jnp.stack([metrics[f"loss_{k}"] for k in range(num_members)])
    return jax.lax.scan(body, state, (chosen, rejected))

  return jax.jit(run_chunk, donate_argnums=(0,))


def make_proxy_trainer(config: ProxyConfig, feature_dim: int, seeds: Sequence[int]):
  """``(graphdef, state, run_chunk)`` for K = len(seeds) stacked proxies.

  ``run_chunk(state, features [P·M, d], chosen [T, K, B], rejected [T, K, B])``
  (flat candidate indices) runs T updates of
  ``prefjax.train.step.make_train_step`` (AdamW, cosine decay) in one jitted
  ``lax.scan`` and returns ``(state, member_losses [T, K])``. Programs are
  cached per architecture/optimizer, so seeds, worlds, data sizes and label
  noise reuse one compilation.
  """
  model = StackedMLP(feature_dim, config.width, config.depth, seeds)
  tx, _ = _optimizer(config)
  graphdef, state = state_lib.create_train_state(model, tx, int(seeds[0]))
  return graphdef, state, _run_chunk(graphdef, _program_key(config), len(seeds))


def train_proxies(world: World, config: ProxyConfig, seeds: Sequence[int], *,
                  log_every: int = 0) -> Proxies:
  """Trains K = len(seeds) proxies together (one jitted program) and scores every candidate.

  Member k trains on ``sample_pairs(world, N, label_noise, seed=seeds[k])``
  with its own batch order and initialisation (``seeds[k]`` folded with the world's
  seed by ``world_seeds.stream_seed``, so pooled worlds share no draw), through
  ``make_train_step`` with the registered loss ``config.loss`` and AdamW + cosine decay.
  Its scores on all P·M candidates are standardised under π_ref (:func:`standardize`).

  Args:
    world: the bandit world.
    config: proxy architecture and training.
    seeds: distinct member seeds.
    log_every: log one line (step, mean loss, steps/s) every this many steps (0: silent).
  """
  seeds = tuple(int(s) for s in seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"train_proxies: need distinct member seeds, got {seeds}")
  if log_every < 0:
    raise ValueError(f"log_every={log_every} must be >= 0")
  start = time.perf_counter()
  p, m, d = world.features.shape
  pairs = [sample_pairs(world, config.num_pairs, label_noise=config.label_noise, seed=s)
           for s in seeds]
  chosen, rejected = _batch_indices(pairs, seeds, world.config.seed, config.steps,
                                    config.batch_size, m)
  init_seeds = [world_seeds.stream_seed(s, world.config.seed) for s in seeds]
  graphdef, state, run_chunk = make_proxy_trainer(config, d, init_seeds)
  features = jnp.asarray(world.features.reshape(p * m, d))
  chunk = log_every or config.steps
  losses, last = [], time.perf_counter()
  for begin in range(0, config.steps, chunk):
    end = min(begin + chunk, config.steps)
    state, loss = run_chunk(state, features, chosen[begin:end], rejected[begin:end])
    losses.append(np.asarray(loss))
    if log_every:
      now = time.perf_counter()
      logging.info("proxies w=%d K=%d step %d/%d loss %.4f (%.0f steps/s)", config.width,
                   len(seeds), end, config.steps, losses[-1][-1].mean(),
                   (end - begin) / (now - last))
      last = now
  losses = np.concatenate(losses)
  per_epoch = config.num_pairs // config.batch_size
  raw = score_candidates(graphdef, state.params, world.features)
  scores = standardize(world.ref_logits, raw)
  heldout = heldout_pairs(world, config.eval_pairs)
  train_acc = np.array([pair_accuracy(scores[k], pairs[k]) for k in range(len(seeds))])
  return Proxies(scores=scores, seeds=seeds,
                 train_loss=losses[-min(per_epoch, config.steps):].mean(axis=0),
                 train_accuracy=train_acc, gold_accuracy=pair_accuracy(scores, heldout),
                 wall_s=time.perf_counter() - start)
