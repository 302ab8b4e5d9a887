r"""PPO and RLOO against a proxy (or ensemble) reward, with gold-vs-proxy evaluation.

  python -m experiments.train_rl --config=configs/rl/tiny_ppo.py --workdir=/tmp/rl

Each step samples responses to fresh training prompts from the policy (KV-cache
``generate``), scores them with the PROXY reward, penalises the KL to the frozen
reference (per token inside the reward for PPO, per sequence for RLOO; k1/k2/k3
estimator ``rl.kl_estimator``; fixed or adaptive coefficient, Ziegler et al.
2019), and updates the policy (PPO: GAE + clipped surrogate + value loss over
minibatch epochs; RLOO: leave-one-out baseline over ``rl.group_size`` samples
per prompt). Every ``loop.eval_every`` steps the SAME held-out prompts are sampled
once and scored with the proxy AND the gold reward, with the KL (estimators and,
for small vocabularies, the exact full-vocabulary KL along the sample), entropy
and response length: the overoptimization curve, in ``metrics.jsonl``
(``eval/*``) and TensorBoard. A rerun with the same workdir resumes from the
last checkpoint (policy, value model, optimizer, frozen reference and KL
coefficient are all checkpointed; all randomness is a function of the step).

PPO's value model (``rl.value_trunk``): ``"separate"`` (default) is a copy of
the reference trunk with a scalar head, trained only by the value loss;
``"shared"`` puts the value head on the policy's own trunk (cheaper; the value
loss then also shapes the policy's features). The gold reward is never seen by
the optimiser: it is only evaluated (and logged on training samples when
``log_train_gold``). Not yet supported: ``config.mesh`` sharding (runs on one
device).

Outputs: config.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json,
figures/rl.png (held-out gold and proxy vs √KL).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import logging

from experiments import common
from prefjax import configlib
from prefjax import experiment
from prefjax import train
from prefjax.evals import plots
from prefjax.rl import algorithms
from prefjax.rl import evaluation
from prefjax.rl import kl_control
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import setup
from prefjax.train import summary as summary_lib

_EVAL_STREAM = 2**31 - 1  # fold_in index of the fixed eval key (train steps use 0..)


def _config_dict(config: Any) -> dict[str, Any]:
  return summary_lib.config_to_dict(config)


@functools.lru_cache(maxsize=None)
def _optimizer(optimizer_json: str):
  """One optax object per optimizer config, so jitted updates are reused across runs."""
  return train.make_optimizer(json.loads(optimizer_json))[0]


class _Run:
  """Everything one RL run needs, built from the config."""

  def __init__(self, config: Any, workdir: str):
    self.config, self.workdir = config, workdir
    rl = config.rl
    self.hp = algorithms.HParams.from_config(rl)
    self.group_size = int(rl.group_size) if self.hp.algorithm == "rloo" else 1
    if self.hp.algorithm == "rloo" and self.group_size < 2:
      raise ValueError(f"RLOO needs rl.group_size >= 2 samples per prompt, got {self.group_size}")
    self.tokenizer = experiment.make_tokenizer(config.tokenizer)
    self.world = setup.make_world(config)
    self.train_prompts, self.eval_prompts = setup.make_prompts(config, self.tokenizer,
                                                               self.world, workdir=workdir)
    self.proxy = rl_rewards.make_reward(config.proxy, world=self.world, seed=int(config.seed))
    self.gold = rl_rewards.make_reward(config.gold, world=self.world, seed=int(config.seed))
    self.sampling = dict(config.sampling.to_dict())
    self.key = jax.random.key(int(config.seed))
    self.tx = _optimizer(json.dumps(config.optimizer.to_dict(), sort_keys=True))
    self.loop = train.LoopConfig.from_mapping(config.loop)
    self.ckpt = train.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   keep_last=self.loop.keep_checkpoints)
    self.kl_ctl = kl_control.make_kl_controller(rl)

  def init_state(self) -> int:
    """Fresh (warm-started) or restored state; returns the step to continue from."""
    policy = setup.make_policy(self.config, self.tokenizer)
    latest = self.ckpt.latest_step()
    self.warm_started = False
    if latest is None:
      self.warm_started = bool(setup.maybe_warm_start(policy, self.config, self.tokenizer,
                                                      self.world))
    bundle = rollout_lib.build_bundle(
        policy, with_value=self.hp.algorithm == "ppo",
        value_trunk=self.config.rl.get("value_trunk", "separate"), seed=int(self.config.seed))
    self.graphdef, self.state = train.create_train_state(
        bundle, self.tx, int(self.config.seed), trainable=rollout_lib.TRAINABLE)
    if latest is None:
      return 0
    restored = self.ckpt.restore_newest_intact(self.state, allow_restart=self.loop.allow_restart)
    if restored is None:  # Every checkpoint was damaged and set aside: start afresh.
      return self.init_state()
    latest, self.state, data_state, _ = restored
    self.kl_ctl.value = float(data_state["kl_coef"])
    logging.info("resuming RL from step %d (kl_coef %.4g)", latest, self.kl_ctl.value)
    return latest

  def policy(self):
    return train.merge_model(self.graphdef, self.state.params, self.state.extra).policy

  def evaluate(self) -> dict[str, float]:
    return evaluation.evaluate(
        self.graphdef, self.state.params, self.state.extra, self.eval_prompts,
        jax.random.fold_in(self.key, _EVAL_STREAM), tokenizer=self.tokenizer,
        proxy=self.proxy, gold=self.gold, sampling_cfg=self.sampling,
        kl_estimator=self.hp.kl_estimator,
        exact_kl_max_vocab=int(self.config.eval.get("exact_kl_max_vocab",
                                                    experiment.EXACT_KL_MAX_VOCAB)),
        exploit_char=self.world.exploit_char if self.world else None)

  def step(self, step: int) -> dict[str, float]:
    """One RL iteration: sample, score with the proxy, update; returns train metrics."""
    key = jax.random.fold_in(self.key, step)
    prompts = self.train_prompts(step, int(self.config.rl.prompts_per_step))
    prompts = prompts.repeat(self.group_size)
    rollout = rollout_lib.sample(self.policy(), prompts, jax.random.fold_in(key, 0),
                                 tokenizer=self.tokenizer, **self.sampling)
    scores = self.proxy(rollout.prompts, rollout.responses)
    kl_coef = self.kl_ctl.value
    batch = algorithms.prepare(
        self.graphdef, self.state.params, self.state.extra, rollout.tokens,
        rollout.attention_mask, rollout.loss_mask, jnp.asarray(scores, jnp.float32),
        jnp.float32(kl_coef), hp=self.hp, group_size=self.group_size)
    self.state, metrics = algorithms.minibatch_epochs(
        self.graphdef, self.state, batch, jax.random.fold_in(key, 1), tx=self.tx, hp=self.hp,
        epochs=int(self.config.rl.epochs), num_minibatches=int(self.config.rl.num_minibatches))
    self.state = self.state.replace(step=jnp.asarray(step + 1, jnp.int32))
    sequence_kl = float(np.mean(np.asarray(batch["kl"]).sum(axis=1)))
    self.kl_ctl.update(sequence_kl, len(rollout.responses))
    metrics.update(proxy_score=float(np.mean(scores)), kl=sequence_kl, kl_coef=kl_coef,
                   response_length=float(np.mean(rollout.lengths)))
    if self.config.get("log_train_gold", False):
      metrics["gold_score"] = float(np.mean(self.gold(rollout.prompts, rollout.responses)))
    return metrics

  def save(self) -> None:
    self.ckpt.save(self.state, data_state={"kl_coef": self.kl_ctl.value},
                   config=_config_dict(self.config))


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the RL run of ``config`` in ``workdir``; returns the summary
  (``{"preempted": True, "step": n}`` when a signal stopped it after saving)."""
  os.makedirs(workdir, exist_ok=True)
  configlib.check_fields("config.eval", config.eval, ("exact_kl_max_vocab",))
  summary_lib.write_or_check_config(
      workdir, config,
      on_mismatch=train.LoopConfig.from_mapping(config.loop).on_config_mismatch)
  r = _Run(config, workdir)
  start = r.init_state()
  total, loop = r.loop.num_steps, r.loop
  writer = train.MetricWriter(workdir, resume_step=start, total_steps=total)
  done = start
  with train.StopOnSignal() as stop:
    try:
      if start == 0:
        writer.log(0, eval_metrics=r.evaluate())
        if r.warm_started:  # a resumed run must not redo (or re-randomise) the warm start
          r.save()
      for step in range(start, total):
        metrics = r.step(step)
        done = step + 1
        # Save at once (the eval waits for the rerun), unless this was the last step.
        stopping = stop.signum is not None and done < total
        evals = (r.evaluate() if not stopping and (_every(done, loop.eval_every) or done == total)
                 else None)
        writer.log(done, train=metrics, eval_metrics=evals)
        if _every(done, loop.checkpoint_every) or done == total or stopping:
          r.save()
        if stopping:
          break
      r.ckpt.wait()
    finally:
      writer.close()
      r.ckpt.close()
  if done < total:
    logging.warning("stopped at step %d after a signal; rerun with the same workdir to resume",
                    done)
    return {"preempted": True, "step": done}
  return _write_summary(workdir, total)


def _every(step: int, n: int) -> bool:
  return n > 0 and step % n == 0


def _write_summary(workdir: str, total: int) -> dict[str, Any]:
  evals = [{k[5:]: v for k, v in rec.items() if k.startswith("eval/")} | {"step": rec["step"]}
           for rec in train.read_metrics(workdir) if "eval/gold" in rec]
  if not evals:
    raise RuntimeError(f"no eval records in {workdir}/metrics.jsonl")
  peak = max(evals, key=lambda e: e["gold"])
  summary = {
      "steps": total, "initial": evals[0], "final": evals[-1], "peak_gold": peak,
      "gold_gain_at_peak": peak["gold"] - evals[0]["gold"],
      "gold_drop_after_peak": peak["gold"] - evals[-1]["gold"],
      "proxy_gain": evals[-1]["proxy"] - evals[0]["proxy"],
  }
  data = experiment.read_data_report(workdir)
  if data is not None:
    summary["data"] = data
  summary_lib.write_summary(workdir, summary)
  _plot(evals, os.path.join(workdir, "figures", "rl.png"))
  logging.info("RL done: proxy %+.3f, gold peak %+.3f at step %d, final gold drop %.3f",
               summary["proxy_gain"], summary["gold_gain_at_peak"], peak["step"],
               summary["gold_drop_after_peak"])
  return summary


def _plot(evals: list[dict[str, Any]], path: str) -> None:
  """Held-out gold and proxy (minus their step-0 values) vs √KL, as in Gao et al. 2022."""
  kl_name = "kl/exact" if "kl/exact" in evals[0] else "kl"
  scores = {name: ([e[name] - evals[0][name] for e in evals], [e[f"{name}_se"] for e in evals])
            for name in ("proxy", "gold")}
  plots.plot_scores_vs_sqrt_kl(
      np.sqrt(np.maximum([e[kl_name] for e in evals], 0.0)), scores, path,
      xlabel=f"√KL ({kl_name}, nats½) on held-out samples", ylabel="score − initial score",
      title=f"RL: held-out proxy and gold over {evals[-1]['step']} steps")


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
