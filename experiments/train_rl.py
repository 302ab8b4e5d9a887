r"""PPO and RLOO against a proxy (or ensemble) reward, with gold-vs-proxy evaluation.

  python -m experiments.train_rl --config=configs/rl/tiny_ppo.py --workdir=/tmp/rl

Each step samples responses to fresh training prompts from the policy (KV-cache
``generate``), scores them with the PROXY reward, penalises the KL to the frozen
reference (per token inside the reward for PPO, per sequence for RLOO; estimator
``rl.kl_estimator``, k1 = log π/π_ref by default: a stop-gradient penalty in the reward
has the gradient of β·KL only for k1; k3 is an unbiased estimate of the KL's value and k2
a biased one, and as penalties neither gives its gradient (Tang & Munos 2025,
arXiv:2506.09477), so they warn; fixed or adaptive coefficient, Ziegler
et al. 2019), and updates the policy (PPO: GAE + clipped surrogate + value loss over
minibatch epochs; RLOO: leave-one-out baseline over ``rl.group_size`` samples
per prompt). Every ``loop.eval_every`` steps the SAME held-out prompts are sampled
once and scored with the proxy AND the gold reward, with the KL (estimators and,
for small vocabularies, the exact full-vocabulary KL along the sample), entropy
and response length: the overoptimization curve, in ``metrics.jsonl``
(``eval/*``) and TensorBoard. A rerun with the same workdir resumes from the
last checkpoint (policy, value model, optimizer, frozen reference and KL
coefficient are all checkpointed; all randomness is a function of the step).
Training runs through ``prefjax.train.train_loop`` like every trainer: one loop
step is one RL iteration, its batch a ``prefjax.rl.trainer.RolloutIterator``
rollout sampled with the current parameters, its minibatch epochs successive
updates inside the jitted step; ``config.mesh`` shards the policy, reference and
value model and the rollout rows as in ``train_dpo``.

PPO's value model (``rl.value_trunk``): ``"separate"`` (default) is a copy of
the reference trunk with a scalar head, trained only by the value loss;
``"shared"`` puts the value head on the policy's own trunk (cheaper; the value
loss then also shapes the policy's features). The gold reward is never seen by
the optimiser: it is only evaluated (and logged on training samples when
``log_train_gold``).

A reward-model ensemble proxy (``proxy.model.head="reward_ensemble:K"``) is scored by
its members' mean, or with ``proxy.aggregation="wco"`` / ``"uwo"`` (λ ``proxy.lam``) by
the worst case or the uncertainty-weighted mean of members standardized, as Coste et al.
(2023) do, by their mean and standard deviation on samples of the policy before RL
(``proxy.reference_prompts`` training prompts x ``proxy.reference_samples_per_prompt``,
default 64 x 4); the statistics are written to ``proxy_reference.json`` and reused by a
rerun. The proxy in ``eval/*`` is then that standardized aggregate. The step and file
digest of every reward-model checkpoint are kept in ``reward_checkpoints.json``: a rerun
that would load another (the RM trained on since) is refused.

Outputs: config.json, metrics.jsonl, tensorboard/, checkpoints/, summary.json,
figures/rl.png (held-out gold and proxy vs √KL); with ``export_hf=True`` also the
final policy as a Hugging Face ``*ForCausalLM`` directory, ``<workdir>/hf`` (the
reference and the value model stay in the checkpoints).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import app
from absl import logging

from experiments import common
from prefjax import experiment
from prefjax import files
from prefjax import train
from prefjax.evals import plots
from prefjax.rl import algorithms
from prefjax.rl import evaluation
from prefjax.rl import kl_control
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import setup
from prefjax.rl import trainer
from prefjax.train import loop as loop_lib
from prefjax.train import state as state_lib
from prefjax.train import summary as summary_lib

_EVAL_STREAM = 2**31 - 1  # fold_in index of the fixed eval key (train steps use 0..)


@functools.lru_cache(maxsize=None)
def _optimizer(optimizer_json: str):
  """One ``(tx, schedule)`` per optimizer config, so the loop reuses its compiled step."""
  return train.make_optimizer(json.loads(optimizer_json))


def _warm_start(config: Any, workdir: str, policy, tokenizer, world) -> loop_lib.StartHook:
  """Warm-starts a fresh run's policy; a rerun restores it, so it skips this (seconds of
  training). The returned start hook stops a rerun that finds no intact checkpoint after
  all (damaged ones are set aside): its next rerun warm-starts."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  resuming = setup.has_checkpoints(workdir)
  if not resuming:
    setup.maybe_warm_start(policy, config, tokenizer, world)

  def check(step: int, state) -> None:
    del state
    # A step-0 checkpoint (a run of 0 steps) holds the warm-started policy; none at all
    # means every checkpoint was set aside as damaged.
    restored_zero = os.path.isdir(os.path.join(ckpt_dir, "0"))
    if (resuming and step == 0 and not restored_zero and config.get("warm_start")
        and config.warm_start.steps > 0):
      raise RuntimeError(f"no intact checkpoint in {workdir} to resume from and the warm "
                         "start was skipped; rerun to start afresh")
  return check


def check_sampling(config: Any) -> None:
  """The policy gradient, its KL penalty and the eval KL all score the samples with the
  policy's own log-probs, so they must be drawn from that distribution: temperature 1,
  no top-k or top-p (another sampler would bias all three, silently)."""
  s = config.sampling
  if float(s.temperature) != 1.0 or s.get("top_k") is not None or s.get("top_p") is not None:
    raise ValueError(
        f"sampling.temperature={s.temperature}, top_k={s.get('top_k')}, "
        f"top_p={s.get('top_p')}: train_rl samples from the policy itself (temperature 1, "
        "no top_k/top_p), because the policy gradient and the KL score each sample with "
        "the policy's own log-probs")
  if float(config.rl.kl_coef) < 0:
    raise ValueError(f"rl.kl_coef={config.rl.kl_coef} must be >= 0 (a negative coefficient "
                     "rewards moving away from the reference)")
  adaptive = config.rl.get("adaptive_kl") or {}
  if adaptive.get("enabled", False) and not float(config.rl.kl_coef) > 0:
    raise ValueError(f"rl.kl_coef={config.rl.kl_coef} with adaptive_kl: the controller scales "
                     "the coefficient, so from 0 it never moves; start it above 0")
  if not 0 <= float(config.rl.get("missing_eos_penalty") or 0.0) < math.inf:
    raise ValueError(f"rl.missing_eos_penalty={config.rl.missing_eos_penalty} must be >= 0 "
                     "and finite (it is subtracted from a response cut at max_new_tokens: "
                     "a negative one rewards never finishing, a NaN makes every reward NaN)")
  if int(config.rl.prompts_per_step) < 1:
    raise ValueError(f"rl.prompts_per_step={config.rl.prompts_per_step} must be >= 1")
  if adaptive.get("enabled", False) and not 0 < float(adaptive["target"]) < math.inf:
    raise ValueError(f"rl.adaptive_kl.target={adaptive['target']} must be > 0 and finite (the "
                     "KL in nats the controller steers the coefficient towards)")
  if int(config.rl.get("epochs", 1)) < 1:
    raise ValueError(f"rl.epochs={config.rl.epochs} must be >= 1 (passes over each rollout "
                     "batch)")
  sequences = int(config.rl.prompts_per_step) * int(config.rl.get("group_size", 1))
  trainer.check_minibatches(sequences, int(config.rl.get("num_minibatches", 1)))
  if adaptive.get("enabled", False):
    kl_control.check_horizon(float(adaptive["horizon"]), sequences)


EVAL_FIELDS = ("exact_kl_max_vocab",)


def check_config(config: Any, *, warn: bool = False) -> tuple[algorithms.HParams, int]:
  """What ``run`` refuses, checked before the binary touches the workdir; returns the
  method's hyperparameters and group size (``warn``: log the settings it does not read)."""
  experiment.check_eval_section(config, EVAL_FIELDS, "train_rl")
  hp = algorithms.HParams.from_config(config.rl, warn=warn)
  check_sampling(config)
  setup.check_sections(config)
  return hp, algorithms.check_group_size(hp.algorithm, int(config.rl.group_size))


def run(config: Any, workdir: str) -> dict[str, Any] | train.TrainResult:
  """Trains (or resumes) the RL run of ``config`` in ``workdir``; returns the summary, or
  the loop's ``TrainResult`` (``preempted``) when a signal stopped it after saving."""
  experiment.require_one_process("train_rl (its rollouts are scored on the host)")
  os.makedirs(workdir, exist_ok=True)
  with summary_lib.naming_recorded_imports(workdir):
    hp, group_size = check_config(config, warn=True)
  mesh = experiment.make_optional_mesh(config)
  if mesh is not None:
    trainer.check_minibatches(int(config.rl.prompts_per_step) * group_size,
                              int(config.rl.get("num_minibatches", 1)),
                              train.data_parallel_size(mesh))
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  world = setup.make_world(config)
  report_hooks: list = []  # the dataset prompts' data_report.json, once the loop accepts
  train_prompts, eval_prompts = setup.make_prompts(config, tokenizer, world, workdir=workdir,
                                                   start_hooks=report_hooks)
  seed = int(config.seed)
  record_rewards = setup.check_reward_checkpoints(config, workdir)
  proxy_spec, aggregation, lam = rl_rewards.split_aggregation(config.proxy)
  proxy = rl_rewards.make_reward(proxy_spec, world=world, seed=seed)
  gold = rl_rewards.make_reward(config.gold, world=world, seed=seed)
  key = jax.random.key(seed)
  with experiment.mesh_context(mesh):
    policy = setup.make_policy(config, tokenizer)
    experiment.warn_low_precision_policy(policy, "train_rl")
    check_warm_start = _warm_start(config, workdir, policy, tokenizer, world)
    if aggregation != "mean":
      proxy = setup.standardized_proxy(config, workdir, proxy, aggregation, lam, policy,
                                       train_prompts, tokenizer, key)
    bundle = rollout_lib.build_bundle(policy, with_value=algorithms.get_algorithm(hp.algorithm).value_model,
                                      value_trunk=config.rl.get("value_trunk", "separate"),
                                      seed=seed)
  rollouts = trainer.RolloutIterator(
      state_lib.split_model(bundle, rollout_lib.TRAINABLE)[0], prompts=train_prompts,
      proxy=proxy, gold=gold if config.get("log_train_gold", False) else None,
      tokenizer=tokenizer, sampling=config.sampling.to_dict(), hp=hp,
      kl_ctl=kl_control.make_kl_controller(config.rl), key=key,
      prompts_per_step=int(config.rl.prompts_per_step), group_size=group_size,
      epochs=int(config.rl.epochs), num_minibatches=int(config.rl.num_minibatches),
      missing_eos_penalty=float(config.rl.get("missing_eos_penalty") or 0.0))
  evaluator = evaluation.make_evaluator(
      eval_prompts, jax.random.fold_in(key, _EVAL_STREAM), tokenizer=tokenizer, proxy=proxy,
      gold=gold, sampling_cfg=config.sampling.to_dict(), kl_estimator=hp.kl_estimator,
      exact_kl_max_vocab=int(config.eval.get("exact_kl_max_vocab",
                                             experiment.EXACT_KL_MAX_VOCAB)),
      exploit_char=world.exploit_char if world else None)
  with experiment.mesh_context(mesh):
    result = train.train_loop(
        workdir=workdir, config=config, model=bundle, loss_fn=trainer.make_loss_fn(hp),
        optimizer=_optimizer(json.dumps(config.optimizer.to_dict(), sort_keys=True)),
        loop=config.loop, train_iter=rollouts, evaluators=[evaluator],
        mesh=mesh, partition_rules=experiment.partition_rules(policy),
        hooks=[rollouts.observe], start_hooks=[*report_hooks, record_rewards, check_warm_start,
                                              rollouts.observe],
        trainable=rollout_lib.TRAINABLE, sequential_updates=rollouts.updates_per_step)
  if result.preempted:
    return result
  summary = _write_summary(workdir, result.summary,
                           int(result.summary.get("final_step", config.loop.num_steps)),
                           str(config.rl.kl_estimator))
  experiment.export_hf(config, workdir, result.model.policy, tokenizer, what="policy")
  return summary


def _write_summary(workdir: str, loop_summary: dict[str, Any], total: int,
                   kl_estimator: str = "") -> dict[str, Any]:
  evals = [{k[5:]: v for k, v in rec.items() if k.startswith("eval/")} | {"step": rec["step"]}
           for rec in map(files.from_standard_json, train.read_metrics(workdir))
           if "eval/gold" in rec]
  if not evals:
    raise RuntimeError(f"no eval records in {workdir}/metrics.jsonl")
  peak = max(evals, key=lambda e: e["gold"])
  summary = {
      **loop_summary, "steps": total, "initial": evals[0], "final": evals[-1],
      "peak_gold": peak, "gold_gain_at_peak": peak["gold"] - evals[0]["gold"],
      "gold_drop_after_peak": peak["gold"] - evals[-1]["gold"],
      "proxy_gain": evals[-1]["proxy"] - evals[0]["proxy"],
  }
  data = experiment.read_data_report(workdir)
  if data is not None:
    summary["data"] = data
  summary_lib.write_summary(workdir, summary)
  _plot(evals, os.path.join(workdir, "figures", "rl.png"), kl_estimator)
  if evals[0]["step"] != 0:
    logging.warning("RL: no eval at step 0 (loop.eval_at_start=False): the gains below are "
                    "from the first eval, at step %d, not from the starting policy",
                    evals[0]["step"])
  logging.info("RL done, held-out changes from step %d: proxy %+.3f at the end; gold %+.3f "
               "at its peak (step %d), then down %.3f by the end", evals[0]["step"],
               summary["proxy_gain"], summary["gold_gain_at_peak"], peak["step"],
               summary["gold_drop_after_peak"])
  return summary


def _plot(evals: list[dict[str, Any]], path: str, kl_estimator: str = "") -> None:
  """Held-out gold and proxy (minus their first eval's, step 0 by default) vs √KL, as in
  Gao et al. 2022."""
  kl_name = "kl/exact" if "kl/exact" in evals[0] else "kl"
  scores = {name: ([e[name] - evals[0][name] for e in evals], [e[f"{name}_se"] for e in evals])
            for name in ("proxy", "gold")}
  kl = np.array([e[kl_name] for e in evals])
  sqrt_kl = np.sqrt(np.maximum(kl, 0.0))
  se = np.array([e.get(f"{kl_name}_se", np.nan) for e in evals])  # d√KL = dKL / (2√KL)
  estimator = "exact" if kl_name == "kl/exact" else (kl_estimator or "estimated")
  plots.plot_scores_vs_sqrt_kl(
      sqrt_kl, scores, path, steps=[e["step"] for e in evals],
      sqrt_kl_se=np.where(sqrt_kl > 0, se / (2 * np.maximum(sqrt_kl, 1e-12)), np.nan),
      xlabel=f"√KL ({estimator} KL of the held-out samples, nats½)",
      ylabel=f"change from step {evals[0]['step']}",
      title=f"RL: held-out proxy and gold over {evals[-1]['step']} steps" + (
          f"\n({int((kl < 0).sum())} negative KL estimates drawn at √KL = 0)"
          if (kl < 0).any() else ""))


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run, check=check_config))
