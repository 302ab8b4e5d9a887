"""Direct alignment (DPO / IPO / SLiC) in the bandit world: β sweeps.

A policy log π_θ = log_softmax(log π_ref + f_θ(φ)) (``prefjax.overopt.policy_net``)
is trained on gold-labelled pairs drawn from π_ref with a loss from the
project's registry ``prefjax.losses.direct.DIRECT_LOSSES``. A candidate is one
"token", so every ``PairLogps`` token count is 1 and length-normalised losses
(IPO) see the plain log-ratios. Every ``eval_every`` steps the sweep records,
exactly over the candidates (float64):

  KL(π‖π_ref) = Σ_m π(m)·(log π(m) − log π_ref(m)),     d = √KL,
  gold        = Σ_m π(m)·g(m) − Σ_m π_ref(m)·g(m),
  h           = mean over training pairs of (log π/π_ref)(chosen) − (log π/π_ref)(rejected),

h being the log-ratio margin (the implicit-reward margin is β·h). Papers:

* Rafailov, Chittepu, Park, et al. 2024, "Scaling Laws for Reward Model
  Overoptimization in Direct Alignment Algorithms", arXiv:2406.02900 (D1, D2:
  gold vs KL across β is a hump fitted by d(α − β·log d); at small β gold peaks
  early in training while KL keeps growing).
* Azar, Rowland, Piot, et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences", arXiv:2310.12036 (D3: with
  deterministic preferences DPO's margin is unbounded; IPO regresses it onto
  1/(2β)).
* Rafailov, Sharma, Mitchell, et al. 2023, "Direct Preference Optimization",
  arXiv:2305.18290 (P1: DPO's reward–KL frontier against the KL-regularised
  RL optimum, here the exact path π ∝ π_ref·exp(r_proxy/λ) of a proxy trained
  on the same pairs, ``prefjax.overopt.exact.rl_path_scores``).

The criteria on these sweeps are in ``prefjax.overopt.direct_criteria``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import special

from prefjax.losses import direct
from prefjax.overopt import bandit
from prefjax.overopt import exact
from prefjax.overopt import policy_net
from prefjax.train import schedules
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

LOSSES = ("dpo", "ipo", "hinge")      # hinge is SLiC
BATCH_SIZE = 256                      # pairs per step of daa_sweep's minibatch trainer


class DaaSweep(NamedTuple):
  """Training trajectories of one direct-alignment loss at K values of β.

  ``[K, T]`` arrays are indexed by β and evaluation step; the final point of β_k
  is ``[k, -1]``. ``per_prompt_*`` keep the ``[K, T, P]`` values (for bootstrap
  errors over prompts); ``kl``/``gold`` are their means over prompts.
  """
  loss: str
  betas: np.ndarray            # [K]
  steps: np.ndarray            # [T] evaluation steps, 0 … total steps
  kl: np.ndarray               # [K, T] exact KL(π‖π_ref), nats, mean over prompts
  gold: np.ndarray             # [K, T] E_π[gold] − E_ref[gold], mean over prompts
  margin: np.ndarray           # [K, T] mean log-ratio margin h on the training pairs
  per_prompt_kl: np.ndarray    # [K, T, P]
  per_prompt_gold: np.ndarray  # [K, T, P]
  wall_s: np.ndarray           # [K] seconds to train and evaluate each β
  heldout_accuracy: np.ndarray | None = None   # [K, T] implicit reward vs gold, held-out pairs


# ----------------------------------------------------------------------------- losses


def pair_logps(log_pi: jax.Array, ref_log_probs: jax.Array, prompt: jax.Array,
               chosen: jax.Array, rejected: jax.Array) -> direct.PairLogps:
  """Gathers a batch of pairs from ``[P, M]`` policy and reference log-probs.

  ``log_pi``, ``ref_log_probs``: ``[P, M]``; ``prompt``, ``chosen``, ``rejected``:
  ``[B]`` indices (a ``bandit.Pairs``). Returns ``[B]`` fields, token counts 1.
  """
  if log_pi.ndim != 2 or log_pi.shape != ref_log_probs.shape:
    raise ValueError(f"log_pi {log_pi.shape} and ref_log_probs {ref_log_probs.shape} must be "
                     "equal [P, M] shapes")
  ones = jnp.ones(jnp.shape(prompt), log_pi.dtype)
  return direct.PairLogps(log_pi[prompt, chosen], log_pi[prompt, rejected],
                          ref_log_probs[prompt, chosen], ref_log_probs[prompt, rejected],
                          ones, ones)


def daa_loss_fn(loss_name: str, beta: float, pairs: bandit.Pairs | None = None,
                **hparams: Any) -> policy_net.PolicyLoss:
  """``loss_fn(log_pi [P, M], batch) -> scalar`` for ``policy_net.train_policy``.

  The mean over pairs of ``DIRECT_LOSSES[loss_name](PairLogps, beta=β, **hparams)``.
  With ``pairs`` the whole set is every step's batch (full-batch training);
  without, the batch must carry ``prompt``, ``chosen``, ``rejected`` ``[B]``.
  The reference log-probs come from the batch's ``ref_log_probs``.
  """
  fn = direct.get_direct_loss(loss_name)
  if not beta > 0:
    raise ValueError(f"daa_loss_fn: beta={beta} must be > 0")
  fixed = None if pairs is None else tuple(np.asarray(x, np.int32) for x in pairs)

  def loss_fn(log_pi, batch):
    prompt, chosen, rejected = fixed or (batch["prompt"], batch["chosen"], batch["rejected"])
    x = pair_logps(log_pi, batch[policy_net.REF_LOG_PROBS], prompt, chosen, rejected)
    return jnp.mean(fn(x, beta=beta, **hparams))
  return loss_fn


def stationary_margin(loss_name: str, *, fraction: float = 0.1, h_max: float = 20.0,
                      **hparams: Any) -> float:
  """The margin h at which a loss stops pushing: |∂L/∂h| ≤ ``fraction``·|∂L/∂h|(h = 0), β = 1.

  DPO, IPO and SLiC are functions of β·h (up to a constant factor), so their
  stationary margin at β is this value / β: 1 for SLiC (its gradient vanishes
  at β·h = 1), 0.45 for IPO (at the default ``fraction``; its minimum is at
  1/(2β), where the gradient is exactly zero), log 19 ≈ 2.94 for DPO (whose
  gradient σ(−β·h)·β only decays; it is never exactly zero). Read from the
  registered loss itself, on a grid of h in [0, h_max].
  """
  fn = direct.get_direct_loss(loss_name)
  h = jnp.linspace(0.0, h_max, 4_001)

  def loss(h):
    zeros = jnp.zeros_like(h)
    return jnp.sum(fn(direct.PairLogps(h, zeros, zeros, zeros, zeros + 1, zeros + 1),
                      beta=1.0, **hparams))
  grad = np.abs(np.asarray(jax.jit(jax.grad(loss))(h)))
  below = np.flatnonzero(grad <= fraction * grad[0])
  if grad[0] == 0 or below.size == 0:
    raise ValueError(f"stationary_margin: {loss_name!r} has no decaying gradient in h")
  return float(h[below[0]])


def theory_betas(world: bandit.World, loss_name: str, *, kl_range=(0.1, 8.0),
                 num: int = 6, **hparams: Any) -> np.ndarray:
  """β grid whose predicted KL spans ``kl_range`` (nats), log-spaced, descending β.

  Prediction: the loss drives the training-pair margin to h* = c/β
  (:func:`stationary_margin`); the policy that does so with least change is
  the exponential tilt towards gold, π_t ∝ π_ref·exp(t·g), whose margin on a
  pair is t·|g_c − g_r|. So t = c/(β·E|Δg|) with E|Δg| over π_ref × π_ref pairs
  of the world, and KL(π_t‖π_ref) is exact (``exact.rl_path_scores``). The grid
  targets KL values log-spaced over ``kl_range`` and inverts KL(t) numerically.
  A learned policy only approximates the tilt, so the realised KL is measured.
  The default top of the range, 8 nats, stays below the default world's ceiling
  (KL of the gold argmax, ≈ 9.4 nats at M = 8,192).
  """
  c = stationary_margin(loss_name, **hparams)
  gap = _mean_abs_gold_gap(world)
  ts = np.geomspace(1e-3, 1e2, 80)
  kl = exact.rl_path_scores(world.ref_logits, world.gold, world.gold, ts).kl.mean(axis=0)
  targets = np.geomspace(kl_range[0], kl_range[1], num)
  if targets.max() > kl.max():
    raise ValueError(f"theory_betas: the world's KL saturates at {kl.max():.2f} nats < "
                     f"{targets.max():g}")
  t = np.exp(np.interp(np.log(targets), np.log(np.maximum(kl, 1e-300)), np.log(ts)))
  return c / (t * gap)


def _mean_abs_gold_gap(world: bandit.World) -> float:
  """E|g_a − g_b| for a, b ~ π_ref i.i.d. (per prompt, averaged): 2·Σ Δg_k·F_k(1 − F_k)."""
  order = np.argsort(world.gold, axis=1)
  g = np.take_along_axis(world.gold, order, axis=1)
  q = np.exp(np.take_along_axis(world.ref_logits, order, axis=1))
  f = np.cumsum(q / q.sum(axis=1, keepdims=True), axis=1)[:, :-1]
  return float(np.mean(2.0 * np.sum(np.diff(g, axis=1) * f * (1.0 - f), axis=1)))


# ----------------------------------------------------------------------------- sweep


def evaluate_policy(log_pi: np.ndarray, world: bandit.World, pairs: bandit.Pairs,
                    heldout: bandit.Pairs | None = None) -> dict[str, Any]:
  """Exact per-prompt KL and gold gain, the mean training-pair margin h (float64), and
  with ``heldout`` the gold accuracy of the implicit reward log π/π_ref on those pairs."""
  log_pi = np.asarray(log_pi, np.float64)
  log_pi = log_pi - special.logsumexp(log_pi, axis=-1, keepdims=True)
  log_ref = world.ref_logits - special.logsumexp(world.ref_logits, axis=-1, keepdims=True)
  pi, ref = np.exp(log_pi), np.exp(log_ref)
  ratio = log_pi - log_ref
  margin = ratio[pairs.prompt, pairs.chosen] - ratio[pairs.prompt, pairs.rejected]
  out = {"kl": np.maximum(np.sum(pi * ratio, axis=-1), 0.0),
         "gold": np.sum((pi - ref) * world.gold, axis=-1), "margin": float(margin.mean())}
  if heldout is not None:
    out["accuracy"] = float(bandit.pair_accuracy(ratio, heldout))
  return out


def shift_invariant(loss_name: str, **hparams: Any) -> bool:
  """Whether the loss sees the policy only through h: adding one constant per pair to
  both policy log-probs leaves it unchanged (checked numerically on random inputs).

  Such a loss never needs log π's normaliser log Z_p (it cancels within a prompt),
  so training can run f_θ on the pair candidates alone (DPO, IPO, SLiC, and
  SimPO at one token per response; not ORPO, whose log-odds read log π itself).
  """
  fn = direct.get_direct_loss(loss_name)
  rng = np.random.default_rng(0)
  x = [jnp.asarray(rng.normal(0, 2, 32), jnp.float32) for _ in range(4)]
  ones = jnp.ones(32, jnp.float32)
  shift = jnp.asarray(rng.normal(0, 5, 32), jnp.float32)
  a = fn(direct.PairLogps(x[0], x[1], x[2], x[3], ones, ones), beta=0.5, **hparams)
  b = fn(direct.PairLogps(x[0] + shift, x[1] + shift, x[2], x[3], ones, ones), beta=0.5,
         **hparams)
  return bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))


def _pair_trainer(world: bandit.World, pairs: bandit.Pairs, loss_name: str,
                  config: policy_net.PolicyConfig, hparams: Mapping[str, Any]):
  """``run(beta, eval_every, eval_fn, batches) -> eval steps`` for a shift-invariant loss.

  The same policy, initialisation, optimizer and ``make_train_step`` as
  ``policy_net.train_policy``, but the loss gathers f_θ on the 2·B pair candidates
  instead of normalising over all P·M (log Z_p cancels in h): the same
  trajectory up to float32 round-off, ≈ 20× cheaper per step at the default
  world. β is a traced input, so the program compiles once per loss.
  """
  fn = direct.get_direct_loss(loss_name)
  p, m, d = world.features.shape
  log_ref = world.ref_logits - special.logsumexp(world.ref_logits, axis=-1, keepdims=True)
  fixed = {"features": jnp.asarray(world.features.reshape(p * m, d), jnp.float32),
           "ref": jnp.asarray(log_ref.reshape(-1), jnp.float32)}
  all_pairs = {"chosen": jnp.asarray(pairs.prompt.astype(np.int64) * m + pairs.chosen,
                                     jnp.int32),
               "rejected": jnp.asarray(pairs.prompt.astype(np.int64) * m + pairs.rejected,
                                       jnp.int32)}
  tx, schedule = schedules.make_optimizer(schedules.OptimizerConfig(
      name="adam", learning_rate=config.learning_rate, schedule="constant"))

  def init():
    model = policy_net.PolicyMLP(d, config.hidden, rngs=nnx.Rngs(config.seed))
    return state_lib.create_train_state(model, tx, config.seed)
  graphdef, _ = init()

  def loss_fn(model, batch, rng):
    del rng
    c, r = batch["chosen"], batch["rejected"]
    ref_c, ref_r = batch["ref"][c], batch["ref"][r]
    ones = jnp.ones(c.shape, jnp.float32)
    x = direct.PairLogps(ref_c + model(batch["features"][c]), ref_r + model(batch["features"][r]),
                         ref_c, ref_r, ones, ones)
    return jnp.mean(fn(x, beta=batch["beta"], **hparams)), {}
  train_step = step_lib.make_train_step(graphdef, loss_fn, tx, schedule=schedule)

  features = jnp.asarray(world.features, jnp.float32)
  log_ref32 = jnp.asarray(log_ref, jnp.float32)

  @jax.jit
  def full_log_probs(params, extra, features, log_ref):
    return policy_net.policy_log_probs(state_lib.merge_model(graphdef, params, extra),
                                       features, log_ref)
  log_probs = lambda state: np.asarray(full_log_probs(state.params, state.extra, features,
                                                      log_ref32))

  def run_chunk(state, fixed, xs, beta, length):
    def body(state, x):
      batch = dict(fixed, beta=beta, **(all_pairs if x is None else x))
      return train_step(state, batch)[0], None
    return jax.lax.scan(body, state, xs, length=length)[0]
  run_chunk = jax.jit(run_chunk, static_argnums=(4,), donate_argnums=(0,))

  def run(beta, eval_every, eval_fn, batches):
    _, state = init()
    eval_steps = [0]
    eval_fn(0, log_probs(state))
    for begin in range(0, config.steps, eval_every):
      end = min(begin + eval_every, config.steps)
      xs = None if batches is None else jax.tree.map(lambda v: v[begin:end], batches)
      state = run_chunk(state, fixed, xs, jnp.float32(beta), end - begin)
      eval_fn(end, log_probs(state))
      eval_steps.append(end)
    return eval_steps
  return run


def daa_sweep(world: bandit.World, loss_name: str, betas: Sequence[float], *,
              num_pairs: int = 10_000, steps: int = 500, eval_every: int = 25, seed: int = 0,
              policy: policy_net.PolicyConfig | None = None,
              batch_size: int | None = BATCH_SIZE,
              pairs: bandit.Pairs | None = None, trainer: str = "auto",
              **hparams: Any) -> DaaSweep:
  """Trains one policy per β with ``loss_name`` on gold-labelled π_ref pairs.

  Args:
    world: the bandit world.
    loss_name: a key of ``DIRECT_LOSSES`` ("dpo", "ipo", "hinge", ...).
    betas: ``[K]`` values of β > 0.
    num_pairs: N pairs, ``bandit.sample_pairs(world, N, seed=seed)`` (deterministic
      labels; the same pairs a proxy with member seed ``seed`` is trained on).
    steps: Adam updates per β (overrides ``policy.steps``).
    eval_every: evaluation period in steps (> 0).
    seed: pair sample and policy initialisation seed.
    policy: MLP size and learning rate (default ``PolicyConfig()``).
    batch_size: pairs per update (epochs of shuffled pairs); None: full batch.
      Minibatches are the default: Adam ignores the gradient's scale, so with
      exact gradients DPO keeps moving after σ(−β·h)·β has decayed and β stops
      controlling the KL (default world: final KL 8.1–10.1 nats for β 5.8…0.36
      full-batch, 0.1–9.8 with batches of 256). Use full batch to reach a loss's
      optimum on fixed data (D3).
    pairs: use these pairs instead of sampling.
    trainer: "full": ``policy_net.train_policy`` (log π over all P·M candidates
      every step); "pairs": f_θ on the pair candidates only (:func:`_pair_trainer`,
      for :func:`shift_invariant` losses); "auto": "pairs" when allowed.
    **hparams: extra loss hyperparameters.

  Returns:
    A ``DaaSweep``.
  """
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size == 0 or not (np.isfinite(betas).all() and (betas > 0).all()):
    raise ValueError(f"daa_sweep: betas must be a non-empty 1-D array of finite values > 0, "
                     f"got {betas}")
  if eval_every < 1 or steps < 1:
    raise ValueError(f"daa_sweep: steps={steps} and eval_every={eval_every} must be >= 1")
  if trainer not in ("auto", "full", "pairs"):
    raise ValueError(f"daa_sweep: trainer={trainer!r} must be 'auto', 'full' or 'pairs'")
  direct.get_direct_loss(loss_name)                   # unknown names fail before training
  if trainer != "full" and not shift_invariant(loss_name, **hparams):
    if trainer == "pairs":
      raise ValueError(f"daa_sweep: {loss_name!r} reads absolute log-probs; use trainer='full'")
    trainer = "full"
  pairs = bandit.sample_pairs(world, num_pairs, seed=seed) if pairs is None else pairs
  base = policy or policy_net.PolicyConfig(seed=seed)
  config = policy_net.PolicyConfig(base.hidden, steps, base.learning_rate, base.seed)
  batches = None if batch_size is None else _minibatches(pairs, batch_size, steps, seed)
  run = None if trainer == "full" else _pair_trainer(world, pairs, loss_name, config, hparams)
  heldout = bandit.heldout_pairs(world, 10_000)
  records, wall = [], []
  for beta in betas:
    start = time.perf_counter()
    per_eval: list[dict] = []

    def eval_fn(step, log_pi):
      per_eval.append(evaluate_policy(log_pi, world, pairs, heldout))
      return {"margin": per_eval[-1]["margin"]}
    if run is None:
      loss_fn = daa_loss_fn(loss_name, float(beta), pairs if batches is None else None,
                            **hparams)
      _, history = policy_net.train_policy(world, loss_fn, config, eval_fn=eval_fn,
                                           eval_every=eval_every, batches=batches)
      eval_steps = [r["step"] for r in history]
    else:
      flat = None if batches is None else _flat_batches(batches, world.features.shape[1])
      eval_steps = run(float(beta), eval_every, eval_fn, flat)
    records.append((np.array(eval_steps), per_eval))
    wall.append(time.perf_counter() - start)
  eval_steps = records[0][0]
  stack = lambda key: np.array([[e[key] for e in per_eval] for _, per_eval in records])
  per_prompt_kl, per_prompt_gold = stack("kl"), stack("gold")
  return DaaSweep(loss_name, betas, eval_steps, per_prompt_kl.mean(-1), per_prompt_gold.mean(-1),
                  stack("margin"), per_prompt_kl, per_prompt_gold, np.array(wall),
                  stack("accuracy"))


def average_sweeps(sweeps: Sequence[DaaSweep]) -> DaaSweep:
  """Seed average of sweeps of one loss on one world (same β grid and steps): per-prompt
  KL and gold, margins and accuracies are averaged over seeds; prompts stay the
  bootstrap unit."""
  first = sweeps[0]
  for s in sweeps[1:]:
    if not (np.array_equal(s.betas, first.betas) and np.array_equal(s.steps, first.steps)
            and s.per_prompt_kl.shape == first.per_prompt_kl.shape):
      raise ValueError("average_sweeps: sweeps differ in betas, steps or world shape")
  mean = lambda field: (None if getattr(first, field) is None else
                        np.mean([getattr(s, field) for s in sweeps], axis=0))
  per_kl, per_gold = mean("per_prompt_kl"), mean("per_prompt_gold")
  return DaaSweep(first.loss, first.betas, first.steps, per_kl.mean(-1), per_gold.mean(-1),
                  mean("margin"), per_kl, per_gold, np.sum([s.wall_s for s in sweeps], axis=0),
                  mean("heldout_accuracy"))


def _flat_batches(batches: dict, num_candidates: int) -> dict:
  base = batches["prompt"].astype(np.int64) * num_candidates
  return {"chosen": jnp.asarray(base + batches["chosen"], jnp.int32),
          "rejected": jnp.asarray(base + batches["rejected"], jnp.int32)}


def _minibatches(pairs: bandit.Pairs, batch_size: int, steps: int, seed: int) -> dict:
  n = len(pairs.prompt)
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must be in [1, num_pairs={n}]")
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  order = np.concatenate([rng.permutation(n)[:per_epoch * batch_size]
                          for _ in range(-(-steps // per_epoch))])[:steps * batch_size]
  order = order.reshape(steps, batch_size)
  return {k: np.asarray(v, np.int32)[order] for k, v in pairs._asdict().items()}
