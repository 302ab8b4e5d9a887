"""Builds a policy, its prompts and its warm start from a best-of-n / RL config.

Config fields used (see ``configs/bon/*.py`` and ``configs/rl/*.py``):

  seed, tokenizer.path, model (``prefjax.experiment.make_model`` schema, no head)
  world        TinyWorld fields (``None`` when the run is not on the tiny world)
  prompts      source ("tiny_world" | "dataset"), num_eval, eval_seed,
               max_length, style (dataset prompts: "raw" | "chat"),
               split / eval_split (dataset: ``config.data`` splits)
  warm_start   steps, batch_size, learning_rate (tiny world only; 0 steps = none)

and, for ``train_rl``'s workdir, the record of its reward checkpoints
(``check_reward_checkpoints``) and a WCO / UWO proxy's member statistics on samples of
the policy before RL (``standardized_proxy``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from prefjax import experiment
from prefjax import files
from prefjax import rewards as reward_fns
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.data import tokenize as tokenize_lib
from prefjax.models import sampling
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import warm_start as warm_start_lib
from prefjax.train import summary as summary_lib

PromptSampler = Callable[[int, int], rollout_lib.Prompts]  # (step, count) -> prompts


def check_sections(config: Any) -> None:
  """One-line errors for the sections ``train_rl`` and ``best_of_n`` share, before a model
  is built (each would otherwise fail deep in sampling or the warm start, naming no field,
  or train on: a negative warm-start rate makes a broken policy the frozen reference)."""
  for key in ("max_length", "num_eval"):
    if key in config.prompts and int(config.prompts[key]) < 1:
      raise ValueError(f"prompts.{key}={config.prompts[key]} must be >= 1")
  s = config.sampling
  sampling.check_settings(max_new_tokens=s.get("max_new_tokens"),
                          temperature=s.get("temperature"), top_k=s.get("top_k"),
                          top_p=s.get("top_p"), prefix="sampling.")
  warm = config.get("warm_start")
  if warm and int(warm.steps) > 0:
    if int(warm.batch_size) < 1:
      raise ValueError(f"warm_start.batch_size={warm.batch_size} must be >= 1")
    if not 0.0 < float(warm.learning_rate) < math.inf:
      raise ValueError(f"warm_start.learning_rate={warm.learning_rate} must be > 0 and finite "
                       "(the warm-started policy becomes the frozen reference)")
  for key in ("reference_prompts", "reference_samples_per_prompt"):
    _reference_count(config.get("proxy") or {}, key)


_REFERENCE_COUNTS = {"reference_prompts": 64, "reference_samples_per_prompt": 4}  # defaults


def _reference_count(proxy: Any, key: str) -> int:
  """``proxy.reference_prompts`` / ``reference_samples_per_prompt`` (default 64 / 4)."""
  value = proxy.get(key)
  value = _REFERENCE_COUNTS[key] if value is None else int(value)
  if value < 1:
    raise ValueError(f"proxy.{key}={value} must be >= 1 (samples of the policy before RL that "
                     "standardize the proxy's members)")
  return value


def make_world(config: Any) -> tiny_world_lib.TinyWorld | None:
  world = config.get("world")
  return None if world is None else rl_rewards.world_from_config(world)


def make_policy(config: Any, tokenizer: Any) -> nnx.Module:
  """The (random or pretrained) decoder policy of ``config.model``."""
  model_cfg = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  if model_cfg.get("head"):
    raise ValueError(f"config.model.head must be empty for a policy, got {model_cfg['head']!r}")
  model_cfg["head"] = None
  policy = experiment.make_model(model_cfg, vocab_size=tokenizer.vocab_size,
                                 seed=int(config.seed))
  # The train step scores whole rows; sampling alone would fit one token more.
  experiment.check_policy_length(
      policy, int(config.prompts.max_length) + int(config.sampling.max_new_tokens),
      "prompts.max_length + sampling.max_new_tokens")
  return policy


_WARNED_LIMITS: set[int] = set()  # prompts.max_length values already warned about


def _prompt_format(cfg: Any) -> dict[str, Any]:
  """``config.prompts``' ``style`` and ``add_bos``, as ``encode_prompt`` takes them."""
  return {"style": cfg.get("style", "raw"), "add_bos": bool(cfg.get("add_bos", True))}


def _encode(texts: list[str], tokenizer: Any, cfg: Any) -> rollout_lib.Prompts:
  ids = [tokenize_lib.encode_prompt(t, tokenizer, **_prompt_format(cfg)) for t in texts]
  limit = int(cfg.max_length)
  cut = [i for i, x in enumerate(ids) if len(x) > limit]
  if cut:
    # Once a process at WARNING: a study's stages encode the same prompts again and again.
    log = logging.info if limit in _WARNED_LIMITS else logging.warning
    _WARNED_LIMITS.add(limit)
    log("%d of %d prompts are longer than prompts.max_length=%d tokens (first: %r, %d "
        "tokens): the policy sees their last %d (BOS kept), the reward scores the whole "
        "prompt", len(cut), len(ids), limit, texts[cut[0]][:80], len(ids[cut[0]]), limit)
  return rollout_lib.encode_prompts(texts, ids, pad_id=tokenizer.pad_id, max_length=limit,
                                    bos_id=tokenizer.bos_id)


def _tiny_prompts(world: tiny_world_lib.TinyWorld, rng: np.random.Generator,
                  count: int) -> list[str]:
  return [world.sample_prompt(rng) for _ in range(count)]


def prompt_pipeline_config(cfg: Any) -> pipeline_lib.PipelineConfig:
  """The pipeline settings whose prompt cut matches `_encode`'s (the last ``max_length``
  tokens are kept), for the data report of dataset prompts."""
  max_length, prompt = int(cfg.max_length), _prompt_format(cfg)
  return pipeline_lib.PipelineConfig(max_length=max_length + 1, max_prompt_length=max_length,
                                     prompt_style=prompt["style"], add_bos=prompt["add_bos"])


def make_prompts(config: Any, tokenizer: Any, world: tiny_world_lib.TinyWorld | None,
                 *, workdir: str | None = None, start_hooks: list | None = None
                 ) -> tuple[PromptSampler, rollout_lib.Prompts]:
  """``(train_sampler, eval_prompts)``; train prompts are a pure function of the step.

  Dataset prompts are reported in ``workdir/data_report.json`` when ``workdir`` is given:
  at once, or, given ``start_hooks`` (a training run's), once ``train_loop`` has accepted
  the workdir (``experiment.DataReport``).
  """
  cfg = config.prompts
  seed = int(config.seed)
  if cfg.source == "tiny_world":
    if world is None:
      raise ValueError("prompts.source='tiny_world' needs config.world")
    eval_texts = _tiny_prompts(world, np.random.default_rng((seed, int(cfg.eval_seed), 1)),
                               int(cfg.num_eval))

    def train(step: int, count: int) -> rollout_lib.Prompts:
      rng = np.random.default_rng((seed, int(cfg.eval_seed), 0, step))
      return _encode(_tiny_prompts(world, rng, count), tokenizer, cfg)
  elif cfg.source == "dataset":
    train_source = experiment.load_split(config.data, cfg.split)
    eval_source = experiment.load_split(config.data, cfg.eval_split)
    if workdir is not None:
      report = experiment.start_data_report(
          workdir, {"train": train_source, "eval": eval_source}, tokenizer,
          prompt_pipeline_config(cfg), ())
      if start_hooks is None:
        report.write()
      else:
        start_hooks.append(report.write)
    train_texts = [row["prompt"] for row in train_source]
    eval_texts = [eval_source[i]["prompt"] for i in range(min(int(cfg.num_eval),
                                                               len(eval_source)))]
    if not train_texts:
      raise ValueError(f"no training prompts in {config.data.name}[{cfg.split}]")

    def train(step: int, count: int) -> rollout_lib.Prompts:
      order = np.random.default_rng((seed, step)).permutation(len(train_texts))[:count]
      return _encode([train_texts[i] for i in np.resize(order, count)], tokenizer, cfg)
  else:
    raise ValueError(f"prompts.source must be 'tiny_world' or 'dataset', got {cfg.source!r}")
  return train, _encode(eval_texts, tokenizer, cfg)


def maybe_warm_start(policy: nnx.Module, config: Any, tokenizer: Any,
                     world: tiny_world_lib.TinyWorld | None) -> list[float]:
  """Tiny-world SFT warm start (responses uniform over the alphabet, EOS-terminated)."""
  cfg = config.get("warm_start")
  if not cfg or int(cfg.steps) <= 0:
    return []
  if world is None:
    raise ValueError("warm_start is only defined on the tiny world (config.world)")
  path = (config.get("model") or {}).get("path")
  if path:
    raise ValueError(f"model.path={path!r} loads a trained policy, and warm_start.steps="
                     f"{int(cfg.steps)} would train it further on uniform tiny-world "
                     "responses (and make that the reference), undoing what it learned: set "
                     "--config.warm_start.steps=0")
  prompt_format = _prompt_format(config.prompts)  # as the rollouts read prompts (`_encode`)

  def examples(rng: np.random.Generator, count: int):
    out = []
    for _ in range(count):
      prompt = tokenize_lib.encode_prompt(world.sample_prompt(rng), tokenizer, **prompt_format)
      out.append((prompt, tokenize_lib.encode_response(world.sample_response(rng), tokenizer)))
    return out

  return warm_start_lib.warm_start(policy, examples, steps=int(cfg.steps),
                                   batch_size=int(cfg.batch_size),
                                   learning_rate=float(cfg.learning_rate),
                                   pad_id=tokenizer.pad_id, seed=int(config.seed))


# Prompts and key of the proxy's reference samples (train steps use 0.., the eval 2**31 - 1).
REFERENCE_STREAM = 2**31 - 2
REFERENCE_FILE = "proxy_reference.json"
REWARDS_FILE = "reward_checkpoints.json"


def has_checkpoints(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


def check_reward_checkpoints(config: Any, workdir: str) -> Callable[[int, Any], None]:
  """A rerun whose specs would load other proxy or gold checkpoints than the run started
  with (the RM trained on since) is refused: its rewards would change mid-run. Returns the
  start hook that records them (step and file digest, ``REWARDS_FILE``) when the loop
  starts afresh: not before, so a rerun the loop refuses leaves the record alone."""
  now = {name: train.checkpoint_identity(spec.checkpoint) for name in ("proxy", "gold")
         if (spec := config.get(name)) and spec.get("kind") == "model" and spec.get("checkpoint")}
  path = os.path.join(workdir, REWARDS_FILE)

  def record(start_step: int, state: Any) -> None:
    del state
    if start_step == 0:
      summary_lib.write_json(path, now)

  if not has_checkpoints(workdir):
    return record
  if not os.path.exists(path):
    logging.warning("%s is missing (a run from before 2026-12-06): the proxy and gold "
                    "checkpoints cannot be checked against the ones this run started with", path)
  elif (saved := files.read_json(path)) != now:
    changed = sorted(n for n in set(saved) | set(now) if saved.get(n) != now.get(n))
    describe = lambda ids: ", ".join(  # noqa: E731
        f"{n} step {ids[n].get('step')} (files {str(ids[n].get('manifest_sha256'))[:12]})"
        if ids.get(n) else f"{n} without a checkpoint" for n in changed)
    raise ValueError(
        f"{workdir} trained against {describe(saved)}, but the config now loads "
        f"{describe(now)}: a reward model trained on since the run started. Point the "
        "spec at the run's step (checkpoint=WORKDIR@STEP) or use a fresh workdir")
  return record


def standardized_proxy(config: Any, workdir: str, proxy: rl_rewards.PairReward,
                       aggregation: str, lam: float, policy: nnx.Module, prompts: PromptSampler,
                       tokenizer: Any, key: jax.Array) -> rl_rewards.PairReward:
  """WCO / UWO of the proxy's members standardized on samples of the policy before RL
  (fitted once, then read from ``REFERENCE_FILE``)."""
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.exists(path):
    saved = files.read_json(path)
    normalizer = reward_fns.RewardNormalizer(np.asarray(saved["mean"], np.float32),
                                             np.asarray(saved["scale"], np.float32))
  elif has_checkpoints(workdir):
    raise RuntimeError(f"{path} is missing but {workdir} has checkpoints: the proxy's member "
                       "statistics come from the policy before RL, which a rerun no longer "
                       "has; start a fresh workdir")
  else:
    num_prompts = _reference_count(config.proxy, "reference_prompts")
    per_prompt = _reference_count(config.proxy, "reference_samples_per_prompt")
    batch = prompts(REFERENCE_STREAM, num_prompts).repeat(per_prompt)
    rollout = rollout_lib.sample(policy, batch, jax.random.fold_in(key, REFERENCE_STREAM),
                                 tokenizer=tokenizer, **config.sampling.to_dict())
    normalizer = rl_rewards.fit_members(proxy, rollout.prompts, rollout.responses)
    summary_lib.write_json(path, {"mean": np.asarray(normalizer.mean).tolist(),
                                  "scale": np.asarray(normalizer.scale).tolist(),
                                  "num_samples": num_prompts * per_prompt,
                                  "aggregation": aggregation, "lam": lam})
  logging.info("proxy %s of %d members standardized on samples of the policy before RL: "
               "means %s, standard deviations %s", aggregation, np.size(normalizer.mean),
               np.round(np.asarray(normalizer.mean), 4), np.round(np.asarray(normalizer.scale), 4))
  return rl_rewards.standardized_reward(proxy, aggregation, lam, normalizer)
