"""On-policy RL through ``prefjax.train.train_loop``: the rollout iterator and the loss.

One loop step is one RL iteration. The loop's train iterator is a
``RolloutIterator``: each ``next`` samples responses to the step's prompts
with the CURRENT policy (the loop hands it every new train state through
``observe``, registered as a start hook and as a hook), scores them with the
proxy reward, computes the behaviour-policy statistics and advantages with
the KL coefficient of the step, updates the KL controller, and returns the
rollout cut into ``epochs x num_minibatches`` shuffled minibatches (leading
axis). The loop applies them as successive optimizer updates inside one
jitted step (``train_loop(sequential_updates=...)``), so PPO's minibatch
epochs and RLOO's single on-policy update are both one loop step.

Checkpoints: the policy and value model are the trained params, the frozen
reference is in ``state.extra``, and the iterator's ``get_state`` (next step,
KL coefficient) is the loop's data state; sampling keys and prompts are pure
functions of the step, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.rl import algorithms
from prefjax.rl import kl_control
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.train import state as state_lib

Array = jax.Array
PromptSampler = Callable[[int, int], rollout_lib.Prompts]
# Per-sequence fields the iterator adds to a prepared rollout, logged as train metrics.
ROLLOUT_METRICS = {"scores": "proxy_score", "gold_scores": "gold_score",
                   "response_length": "response_length", "truncated": "truncated_fraction"}


def check_minibatches(size: int, num_minibatches: int, data_parallel: int = 1) -> None:
  """A rollout of ``size`` sequences must cut into ``num_minibatches`` equal minibatches,
  each split over the mesh's ``data_parallel`` devices."""
  if num_minibatches < 1 or size % num_minibatches:
    raise ValueError(f"rl.num_minibatches={num_minibatches}: the {size} sequences of a step "
                     "(prompts_per_step x group_size) are not divisible into that many "
                     "minibatches")
  if (size // num_minibatches) % data_parallel:
    raise ValueError(f"the {size // num_minibatches} sequences of a minibatch (prompts_per_step"
                     f" x group_size / num_minibatches = {size} / {num_minibatches}) do not "
                     f"split over the mesh's {data_parallel} data-parallel devices: make "
                     f"rl.prompts_per_step x rl.group_size a multiple of {data_parallel} x "
                     "rl.num_minibatches, or change the mesh")


def minibatches(batch: Mapping[str, np.ndarray], rng: Array, *, epochs: int,
                num_minibatches: int) -> dict[str, np.ndarray]:
  """``[N, ...]`` rows -> ``[epochs * num_minibatches, N / num_minibatches, ...]``, each
  epoch a fresh permutation (``fold_in(rng, epoch)``) cut into consecutive minibatches."""
  size = len(batch["tokens"])
  check_minibatches(size, num_minibatches)
  for key, value in batch.items():
    if np.ndim(value) == 0 or np.shape(value)[0] != size:
      raise ValueError(f"rollout field {key!r} has shape {np.shape(value)}: every field of a "
                       f"prepared rollout is per sequence, [{size}, ...] (an algorithm's "
                       "targets must not return scalars)")
  order = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(rng, e), size))
                          for e in range(epochs)])
  index = order.reshape(epochs * num_minibatches, size // num_minibatches)
  return {k: np.asarray(v)[index] for k, v in batch.items()}


class RolloutIterator:
  """Scored, prepared rollouts of the current policy, one per loop step (see module doc)."""

  def __init__(self, graphdef: nnx.GraphDef, *, prompts: PromptSampler,
               proxy: rl_rewards.PairReward, gold: rl_rewards.PairReward | None,
               tokenizer: Any, sampling: Mapping[str, Any], hp: algorithms.HParams,
               kl_ctl: kl_control.FixedKLController | kl_control.AdaptiveKLController,
               key: Array, prompts_per_step: int, group_size: int, epochs: int,
               num_minibatches: int, missing_eos_penalty: float = 0.0):
    self.graphdef, self.prompts, self.proxy, self.gold = graphdef, prompts, proxy, gold
    self.tokenizer, self.sampling, self.hp, self.kl_ctl = tokenizer, dict(sampling), hp, kl_ctl
    self.key, self.prompts_per_step, self.group_size = key, prompts_per_step, group_size
    self.epochs, self.num_minibatches = epochs, num_minibatches
    self.missing_eos_penalty = float(missing_eos_penalty)
    self.step = 0
    self._state: state_lib.TrainState | None = None

  @property
  def updates_per_step(self) -> int:
    return self.epochs * self.num_minibatches

  def observe(self, step: int, state: state_lib.TrainState, metrics: Any = None) -> None:
    """Start hook and hook of the loop: the parameters the next rollout samples with."""
    del step, metrics
    self._state = state

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "kl_coef": self.kl_ctl.value}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.step, self.kl_ctl.value = int(state["step"]), float(state["kl_coef"])

  def __iter__(self) -> "RolloutIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._state is None:
      raise RuntimeError("RolloutIterator has no parameters: pass its observe to train_loop "
                         "as a start hook and a hook")
    params, extra = self._state.params, self._state.extra
    key = jax.random.fold_in(self.key, self.step)
    prompts = self.prompts(self.step, self.prompts_per_step).repeat(self.group_size)
    policy = state_lib.merge_model(self.graphdef, params, extra).policy
    rollout = rollout_lib.sample(policy, prompts, jax.random.fold_in(key, 0),
                                 tokenizer=self.tokenizer, **self.sampling)
    where = f"RL step {self.step}"
    scores = rl_rewards.checked_scores(self.proxy, rollout.prompts, rollout.responses, where)
    # TRL's missing_eos_penalty: a response cut at max_new_tokens is rewarded less.
    rewards = scores - self.missing_eos_penalty * (~rollout.finished)
    kl_coef = self.kl_ctl.value
    batch = jax.device_get(algorithms.prepare(
        self.graphdef, params, extra, rollout.tokens, rollout.attention_mask,
        rollout.loss_mask, jnp.asarray(rewards, jnp.float32), jnp.float32(kl_coef),
        hp=self.hp, group_size=self.group_size))
    size = len(rollout.responses)
    self.kl_ctl.update(float(np.mean(np.asarray(batch["kl"]).sum(axis=1))), size)
    batch.update(scores=np.asarray(scores, np.float32),
                 kl_coef=np.full(size, kl_coef, np.float32),
                 response_length=rollout.lengths.astype(np.float32),
                 truncated=(~rollout.finished).astype(np.float32))
    if self.gold is not None:
      batch["gold_scores"] = rl_rewards.checked_scores(
          self.gold, rollout.prompts, rollout.responses, where).astype(np.float32)
    self.step += 1
    return minibatches(batch, jax.random.fold_in(key, 1), epochs=self.epochs,
                       num_minibatches=self.num_minibatches)


@functools.lru_cache(maxsize=None)
def make_loss_fn(hp: algorithms.HParams):
  """``train_loop`` loss of one minibatch: PPO/RLOO plus the rollout's metrics (one
  function per ``hp``, so the loop reuses its compiled step across runs)."""

  def loss_fn(bundle: rollout_lib.PolicyBundle, batch: Mapping[str, Array], rng: Array):
    del rng
    loss, metrics = algorithms.loss_fn(bundle, batch, hp)
    metrics["kl"] = jnp.mean(jnp.sum(batch["kl"], axis=-1))
    metrics["kl_coef"] = batch["kl_coef"][0]  # one value per rollout
    for field, name in ROLLOUT_METRICS.items():
      if field in batch:
        metrics[name] = jnp.mean(batch[field])
    return loss, metrics

  return loss_fn
