"""Networks of the bandit world: stacked proxy MLPs and the learned RL/DPO policy.

Proxies: ``StackedMLP`` holds K independent GELU MLPs with parameters stacked
on a leading K axis, so K members train in one program (``bandit.train_proxies``
with :func:`proxy_loss_fn`) and score every candidate in one
(:func:`score_candidates`).

The policy is a softmax over a prompt's M candidates,

  log π_θ(m | p) = log_softmax_m( log π_ref(m | p) + f_θ(φ_pm) ),

with f_θ a small GELU MLP d → h → 1 shared over prompts, its output layer
initialised to zero so that π_θ = π_ref at step 0. Training goes through
``prefjax.train.step.make_train_step`` with a generic ``loss_fn(log_pi, batch)``
that sees the policy's full ``[P, M]`` log-probs, so the same trainer serves
the KL-regularised RL loss (:func:`kl_regularized_loss`, computed exactly
over the candidates) and pairwise losses (DPO/IPO/SLiC gather a pair's
log-probs from ``log_pi``).

The exact optimum of −E_π[r] + λ·KL(π‖π_ref) is π_λ ∝ π_ref·exp(r/λ)
(``prefjax.overopt.exact.rl_path_log_probs`` at β = 1/λ); a policy whose f_θ
can represent r/λ up to a per-prompt constant reaches it, which the tests check.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special

from prefjax.losses import preference
from prefjax.train import schedules
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

if TYPE_CHECKING:
  from prefjax.overopt.bandit import World

PolicyLoss = Callable[[jax.Array, Mapping[str, Any]], jax.Array]
EvalFn = Callable[[int, np.ndarray], Mapping[str, Any]]
REF_LOG_PROBS = "ref_log_probs"   # batch key train_policy always provides to the loss


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """The MLP policy and its optimizer (Adam, constant learning rate).

  Attributes:
    hidden: width h of f_θ: d → h → 1 (GELU).
    steps: optimizer updates.
    learning_rate: Adam learning rate.
    seed: initialisation seed.
  """
  hidden: int = 64
  steps: int = 500
  learning_rate: float = 1e-2
  seed: int = 0

  def __post_init__(self):
    if self.hidden < 1 or self.steps < 1:
      raise ValueError(f"PolicyConfig: hidden={self.hidden} and steps={self.steps} must be >= 1")
    if not self.learning_rate > 0:
      raise ValueError(f"PolicyConfig.learning_rate={self.learning_rate} must be > 0")


class PolicyMLP(nnx.Module):
  """f_θ: ``[..., d] → [...]``, a GELU MLP d → h → 1 with a zero-initialised output layer."""

  def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(jax.nn.gelu(self.hidden(x)))[..., 0]


class StackedMLP(nnx.Module):
  """K independent GELU MLPs d → w (× depth) → 1, parameters stacked on a leading K axis.

  Member k is initialised from ``jax.random.key(seeds[k])`` alone (LeCun-normal
  kernels, zero biases), so a member is the same network whether it is trained
  with others or alone.
  """

  def __init__(self, in_dim: int, width: int, depth: int, seeds: Sequence[int]):
    if width < 1 or depth < 1 or not seeds:
      raise ValueError(f"StackedMLP: need width >= 1, depth >= 1 and >= 1 seed; got "
                       f"width={width}, depth={depth}, seeds={seeds}")
    sizes = [in_dim] + [width] * depth + [1]
    init = jax.nn.initializers.lecun_normal()
    self.kernels = nnx.List([
        nnx.Param(jnp.stack([init(jax.random.fold_in(jax.random.key(s), i), (n_in, n_out))
                             for s in seeds]))
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))])
    self.biases = nnx.List([nnx.Param(jnp.zeros((len(seeds), n_out))) for n_out in sizes[1:]])

  def __call__(self, x: jax.Array) -> jax.Array:
    """Rewards: ``x`` ``[K, B, d]`` (member k on its own rows) → ``[K, B]``."""
    return self._forward(x, "kbi,kio->kbo")

  def score(self, x: jax.Array) -> jax.Array:
    """Every member on shared rows: ``x`` ``[B, d]`` → ``[K, B]``."""
    return self._forward(x, "bi,kio->kbo")

  def _forward(self, x: jax.Array, first: str) -> jax.Array:
    h = x
    for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
      h = jnp.einsum(first if i == 0 else "kbi,kio->kbo", h, w[...]) + b[...][:, None, :]
      if i < len(self.kernels) - 1:
        h = jax.nn.gelu(h)
    return h[..., 0]


def preference_loss(name: str) -> Callable[..., jax.Array]:
  """The per-pair reward-model loss ``fn(r_chosen, r_rejected) -> per-pair loss``.

  Names come from ``preference.PREFERENCE_LOSSES``; ``"bradley_terry"`` is
  ``preference.bradley_terry`` (registered as ``"bt"``).
  """
  registry = dict(getattr(preference, "PREFERENCE_LOSSES", {}))
  registry.setdefault("bradley_terry", preference.bradley_terry)
  if name not in registry:
    raise ValueError(f"ProxyConfig.loss={name!r}; registered: {sorted(registry)}")
  entry = registry[name]
  return getattr(entry, "fn", entry)


def proxy_loss_fn(loss: str) -> step_lib.LossFn:
  """``loss_fn(model, batch, rng)`` for ``make_train_step``.

  batch: ``chosen``, ``rejected`` ``[K, B, d]`` features (member k's pairs in
  row k). Loss = Σ_k mean_b ℓ(r_k(chosen), r_k(rejected)): the sum makes each
  member's gradient exactly its own mean-loss gradient. Metrics ``loss_k``.
  """
  fn = preference_loss(loss)

  def loss_fn(model: StackedMLP, batch, rng):
    del rng
    r_chosen, r_rejected = model(batch["chosen"]), model(batch["rejected"])
    member = jnp.mean(fn(r_chosen.T, r_rejected.T), axis=0)           # [K]
    return jnp.sum(member), {f"loss_{k}": member[k] for k in range(member.shape[0])}
  return loss_fn


@functools.lru_cache(maxsize=64)
def _score_program(graphdef: nnx.GraphDef):
  def run(params, x):
    model = nnx.merge(graphdef, params)
    return jax.lax.map(model.score, x)          # [P, K, M]
  return jax.jit(run)


def score_candidates(graphdef: nnx.GraphDef, params, features: np.ndarray) -> np.ndarray:
  """Raw member scores of every candidate, ``features [P, M, d]`` → ``[K, P, M]`` float32.

  One jitted ``lax.map`` over prompts (each step scores one prompt's M rows).
  """
  return np.asarray(_score_program(graphdef)(params, jnp.asarray(features))).transpose(1, 0, 2)


def policy_log_probs(model: PolicyMLP, features: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """log π_θ = log_softmax(ref_logits + f_θ(φ)) over candidates.

  Args:
    model: the policy network f_θ.
    features: ``[P, M, d]`` candidate features.
    ref_logits: ``[P, M]`` log π_ref (or logits of it).

  Returns:
    ``[P, M]`` float32 log-probabilities, normalised per prompt.
  """
  logits = jnp.asarray(ref_logits, jnp.float32) + model(jnp.asarray(features, jnp.float32))
  return jax.nn.log_softmax(logits, axis=-1)


def kl_regularized_loss(reward: np.ndarray, lam: float, *,
                        ref_logits: np.ndarray | None = None) -> PolicyLoss:
  """The KL-regularised RL loss, exact over the candidates: L = mean_p [−E_π[r] + λ·KL(π‖π_ref)].

  E_π[r] = Σ_m π(m|p)·r_pm and KL = Σ_m π(m|p)·(log π − log π_ref), both summed
  over all M candidates (no sampling). Its minimiser is π_ref·exp(r/λ)/Z.

  Args:
    reward: ``[P, M]`` reward the policy maximises (e.g. a standardised proxy).
    lam: KL coefficient λ ≥ 0 (β = 1/λ on the closed-form path).
    ref_logits: ``[P, M]`` π_ref; default: the batch's ``ref_log_probs``, which
      :func:`train_policy` provides.

  Returns:
    ``loss_fn(log_pi [P, M], batch) -> scalar``.
  """
  if not lam >= 0:
    raise ValueError(f"kl_regularized_loss: lam={lam} must be >= 0")
  reward = np.asarray(reward, np.float32)
  fixed_ref = None
  if ref_logits is not None:
    ref_logits = np.asarray(ref_logits, np.float64)
    fixed_ref = (ref_logits - special.logsumexp(ref_logits, axis=-1, keepdims=True)
                 ).astype(np.float32)

  def loss_fn(log_pi: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    log_ref = batch[REF_LOG_PROBS] if fixed_ref is None else fixed_ref
    if log_pi.shape != reward.shape:
      raise ValueError(f"log_pi {log_pi.shape} vs reward {reward.shape}")
    pi = jnp.exp(log_pi)
    per_prompt = -jnp.sum(pi * reward, -1) + lam * jnp.sum(pi * (log_pi - log_ref), -1)
    return jnp.mean(per_prompt)
  return loss_fn


def exact_kl(log_pi: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
  """KL(π‖π_ref) per prompt in nats, ``[P, M] → [P]`` float64 (tiny negatives → 0)."""
  log_pi = np.asarray(log_pi, np.float64)
  ref_logits = np.asarray(ref_logits, np.float64)
  log_ref = ref_logits - special.logsumexp(ref_logits, axis=-1, keepdims=True)
  return np.maximum(np.sum(np.exp(log_pi) * (log_pi - log_ref), axis=-1), 0.0)


def _as_mapping(batch: Any) -> Mapping[str, Any]:
  batch = batch._asdict() if hasattr(batch, "_asdict") else batch   # e.g. bandit.Pairs
  if not isinstance(batch, Mapping):
    raise TypeError(f"a policy batch must be a mapping of arrays; got {type(batch).__name__}")
  clash = {"features", REF_LOG_PROBS} & set(batch)
  if clash:
    raise ValueError(f"batch keys {sorted(clash)} are reserved by train_policy")
  return dict(batch)


def _stack_batches(batches: Any, steps: int) -> Mapping[str, Any] | None:
  """Per-step batches as one mapping with a leading ``[steps]`` axis (or None)."""
  if batches is None:
    return None
  if callable(batches):
    items = [_as_mapping(batches(s)) for s in range(steps)]
    return jax.tree.map(lambda *xs: np.stack(xs), *items)
  batches = _as_mapping(batches)
  for leaf in jax.tree.leaves(batches):
    if np.shape(leaf)[:1] != (steps,):
      raise ValueError(f"batches leaves must have a leading [steps={steps}] axis; got "
                       f"shape {np.shape(leaf)}")
  return batches


def train_policy(world: "World", loss_fn: PolicyLoss, config: PolicyConfig = PolicyConfig(), *,
                 eval_fn: EvalFn | None = None, eval_every: int = 0,
                 batches: Any = None, log_every: int = 0) -> tuple[np.ndarray, list[dict]]:
  """Trains the MLP policy on ``loss_fn`` through ``make_train_step`` (Adam, jitted scans).

  Args:
    world: the bandit world (features and π_ref).
    loss_fn: ``loss_fn(log_pi [P, M], batch) -> scalar`` (jax). ``batch`` is a
      dict holding ``ref_log_probs`` ``[P, M]`` (log π_ref) plus, when
      ``batches`` is given, that step's fields (e.g. ``prompt``, ``chosen``,
      ``rejected`` indices for a DPO loss to gather from ``log_pi``).
    config: policy size, steps, learning rate, seed.
    eval_fn: ``eval_fn(step, log_pi)`` with float64 NumPy ``[P, M]`` log-probs
      → dict of numbers; called at step 0, every ``eval_every`` steps and at the end.
    eval_every: evaluation period in steps (0: only at 0 and at the end).
    batches: optional per-step data: a mapping (or NamedTuple) of arrays with a
      leading ``[steps]`` axis, or a host function ``step -> mapping`` (fixed shapes).
    log_every: log step, loss and steps/s this often (0: silent).

  Returns:
    ``(log_pi, records)``: the final float64 ``[P, M]`` log-probs and one
    record per evaluation, ``{"step", "kl", **eval_fn(...)}`` with ``kl`` the
    exact prompt-mean KL(π‖π_ref) in nats.
  """
  if eval_every < 0 or log_every < 0:
    raise ValueError(f"eval_every={eval_every} and log_every={log_every} must be >= 0")
  d = world.features.shape[-1]
  ref_log_probs = world.ref_logits - special.logsumexp(world.ref_logits, axis=-1, keepdims=True)
  model = PolicyMLP(d, config.hidden, rngs=nnx.Rngs(config.seed))
  tx, schedule = schedules.make_optimizer(schedules.OptimizerConfig(
      name="adam", learning_rate=config.learning_rate, schedule="constant"))
  graphdef, state = state_lib.create_train_state(model, tx, config.seed)

  def step_loss(model, batch, rng):
    del rng
    user = {k: v for k, v in batch.items() if k != "features"}
    log_pi = policy_log_probs(model, batch["features"], batch[REF_LOG_PROBS])
    return loss_fn(log_pi, user), {}

  train_step = step_lib.make_train_step(graphdef, step_loss, tx, schedule=schedule)

  @jax.jit
  def log_probs(params, extra, features, ref):
    return policy_log_probs(state_lib.merge_model(graphdef, params, extra), features, ref)

  def run_chunk(state, fixed, xs, length):
    def body(state, x):
      state, metrics = train_step(state, dict(fixed, **(x or {})))
      return state, metrics["loss"]
    return jax.lax.scan(body, state, xs, length=length)

  run_chunk = jax.jit(run_chunk, static_argnums=(3,), donate_argnums=(0,))

  data = _stack_batches(batches, config.steps)
  fixed = {"features": jnp.asarray(world.features, jnp.float32),
           REF_LOG_PROBS: jnp.asarray(ref_log_probs, jnp.float32)}
  boundaries = sorted(set(range(0, config.steps, eval_every or config.steps))
                      | set(range(0, config.steps, log_every or config.steps)) | {config.steps})
  records = []

  def evaluate(step: int):
    log_pi = np.asarray(log_probs(state.params, state.extra, fixed["features"],
                                  fixed[REF_LOG_PROBS]), np.float64)
    log_pi -= special.logsumexp(log_pi, axis=-1, keepdims=True)
    record = {"step": step, "kl": float(exact_kl(log_pi, world.ref_logits).mean())}
    if eval_fn is not None:
      record.update(eval_fn(step, log_pi))
    records.append(record)
    return log_pi

  log_pi = evaluate(0)
  last, last_step = time.perf_counter(), 0
  for begin, end in zip(boundaries[:-1], boundaries[1:]):
    xs = None if data is None else jax.tree.map(lambda x: x[begin:end], data)
    state, losses = run_chunk(state, fixed, xs, end - begin)
    if log_every and (end % log_every == 0 or end == config.steps):
      loss = float(losses[-1])          # blocks until the chunk has run
      now = time.perf_counter()
      logging.info("policy step %d/%d loss %.4f (%.1f steps/s)", end, config.steps, loss,
                   (end - last_step) / (now - last))
      last, last_step = now, end
    if (eval_every and end % eval_every == 0) or end == config.steps:
      log_pi = evaluate(end)
  return log_pi, records
