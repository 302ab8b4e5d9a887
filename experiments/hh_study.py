"""The SmolLM2 / HH-RLHF world of the overoptimization study: Gao et al.'s real-model setting
at small scale (``configs/reproduce/smollm2_hh.py``).

``experiments.text_study.run_text_study`` runs it with :class:`HHWorld` in place of the
tiny text world; the stages and the checkpoint evaluation are the text world's:

1. ``gold``: ``train_rm`` of the gold reward model on HH-RLHF harmless-base human pairs
   (``resplit_train``; by default MiniLM, as ``configs/rm/hh_minilm.py``).
2. ``pairs``: two samples of the policy (SmolLM2-135M-Instruct, no SFT: it is π_ref) for
   each of N HH training prompts in the chat template, labelled by the gold RM.
3. ``proxies/w{W}``: ``train_rm`` of a randomly initialised encoder reward model of
   width W (MiniLM's tokenizer) on those pairs: the smaller proxies.
4. ``bon/w{W}``, ``rl/w{W}`` (RLOO), ``dpo/{loss}_b{β}`` through ``best_of_n``,
   ``train_rl`` and ``train_dpo``; every RL / DPO checkpoint is sampled on the same held-out
   HH prompts (``resplit_validation``) with the same key: gold, proxy, exact sequence KL.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from configs.bon import smollm2 as bon_smollm2
from configs.dpo import smollm2_hh as dpo_smollm2
from configs.rl import smollm2_rloo as rl_smollm2
from configs.rm import hh_minilm as rm_hh
from experiments import text_study
from experiments import train_rm
from prefjax import configlib
from prefjax import experiment
from prefjax.overopt import text_report
from prefjax.overopt import text_world
from prefjax.rl import algorithms
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import setup as rl_setup

# Keyword arguments of ``text_report.text_criteria`` for this world.
REPORT_LABELS = dict(world="hh", title="SmolLM2 on HH", policy="SmolLM2-135M-Instruct")


class HHWorld(text_study.TextWorld):
  """Policy, prompts, gold and proxies of the HH world, built from ``config.text``."""
  progress_label = "HH world"

  def __init__(self, cfg: Any, workdir: str):  # pylint: disable=super-init-not-called
    self.cfg, self.workdir = cfg, workdir
    self.world_fields = {"kind": "hh", "data": str(cfg.data.name),
                         "policy": (configlib.plain(cfg.policy.model).get("path")
                                    or "a random decoder")}
    self.world = None
    self.tokenizer = experiment.make_tokenizer(configlib.plain(cfg.policy.tokenizer))
    self.max_new_tokens = int(cfg.sampling.max_new_tokens)
    self.sft_dir = self.gold_dir = os.path.join(workdir, "gold")
    self._gold = None

  @property
  def gold(self) -> rl_rewards.PairReward:
    """The trained gold RM (built on first use: it exists after the first stage)."""
    if self._gold is None:
      self._gold = rl_rewards.make_reward(self.gold_reward_spec())
    return self._gold

  # ------------------------------------------------------------------ model specs
  def policy_model(self, path: str = "") -> dict[str, Any]:
    del path  # never SFT'd: the configured model is π_ref
    return configlib.plain(self.cfg.policy.model)

  def reference_path(self) -> str:
    return str(self.cfg.policy.model.path)

  def proxy_model(self, width: int) -> dict[str, Any]:
    p = self.cfg.proxy
    return dict(arch="encoder", preset="tiny", path="", head="reward", ensemble="heads",
                pooling="mean", dtype="float32",
                overrides=dict(hidden_size=width, num_layers=int(p.num_layers),
                               num_heads=max(1, min(4, width // 8)), intermediate_size=4 * width,
                               max_position_embeddings=max(128, int(p.max_length))))

  def _reward_spec(self, name: str, section: Any, model: dict[str, Any],
                   checkpoint: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        kind="model", name=name, model=model, tokenizer=configlib.plain(section.tokenizer),
        max_length=int(section.max_length), batch_size=64, checkpoint=checkpoint))

  def proxy_reward_spec(self, width: int) -> ml_collections.ConfigDict:
    return self._reward_spec(f"proxy_w{width}", self.cfg.proxy, self.proxy_model(width),
                             os.path.join(self.workdir, "proxies", f"w{width}"))

  def gold_reward_spec(self) -> ml_collections.ConfigDict:
    return self._reward_spec("gold", self.cfg.gold, configlib.plain(self.cfg.gold.model),
                             self.gold_dir)

  # ------------------------------------------------------------------ prompts and pairs
  def _prompt_sources(self, num_eval: int, eval_split: str = "resplit_validation"):
    """``(train sampler, eval prompts)`` exactly as ``train_rl`` / ``best_of_n`` build them."""
    config = ml_collections.ConfigDict(dict(seed=0, data=self._data(), prompts=dict(
        source="dataset", split="resplit_train", eval_split=eval_split,
        num_eval=num_eval, eval_seed=1, max_length=int(self.cfg.policy.prompt_length),
        style=str(self.cfg.policy.style))))
    return rl_setup.make_prompts(config, self.tokenizer, None)

  def _data(self) -> ml_collections.ConfigDict:
    return experiment.data_section(name=str(self.cfg.data.name))

  def eval_prompts(self) -> rollout_lib.Prompts:
    return self._prompt_sources(int(self.cfg.eval.num_prompts))[1]

  def policy_pairs(self) -> dict[str, Any]:
    """Two π_ref samples for each of ``pairs.num_pairs`` HH training prompts (a permutation,
    repeated when longer than the split) and of the first ``pairs.num_test`` ``resplit_test``
    prompts (the proxies' held-out pairs: the synthetic dataset splits by the same prompt
    hash), labelled by the gold RM; see ``sample_gold_pairs``."""
    cfg = self.cfg.pairs
    train, test = self._prompt_sources(int(cfg.num_test), eval_split="resplit_test")
    train = train(int(cfg.seed), int(cfg.num_pairs))
    prompts = rollout_lib.Prompts(train.texts + test.texts,  # both padded to prompt_length
                                  np.concatenate([train.tokens, test.tokens]),
                                  np.concatenate([train.mask, test.mask]))
    return text_world.gold_pairs_dataset(
        self.make_policy(), prompts, self.gold, self.tokenizer, name="hh-policy-pairs",
        meta=dict(world=self.world_fields, gold=self.gold_dir), seed=int(cfg.seed),
        max_new_tokens=self.max_new_tokens, gold_name="gold_rm", chunk=int(cfg.chunk))

  # ------------------------------------------------------------------ binary configs
  def reference_stage(self):
    return self.gold_dir, train_rm.run, self.gold_config, "gold reward model (train_rm on HH)"

  def _rm_config(self, section: Any, model: dict[str, Any], dataset: str, eval_split: str):
    c = rm_hh.get_config()
    c.tokenizer.update(configlib.plain(section.tokenizer))
    c.model.update(model)
    c.data.name = dataset
    c.data.eval_split = eval_split
    c.data.pipeline.batch_size = int(section.batch_size)
    c.data.pipeline.max_length = int(section.max_length)
    c.optimizer.learning_rate = float(section.learning_rate)
    c.optimizer.warmup_steps = min(15, int(section.steps) // 10)
    c.loop.num_steps = c.optimizer.total_steps = int(section.steps)
    c.loop.eval_every = c.loop.checkpoint_every = int(section.steps)
    c.seed = c.loop.seed = int(section.seed)
    return c

  def gold_config(self):
    return self._rm_config(self.cfg.gold, configlib.plain(self.cfg.gold.model),
                           str(self.cfg.data.name), "resplit_validation")

  def rm_config(self, width: int, dataset: str):
    return self._rm_config(self.cfg.proxy, self.proxy_model(width), dataset, "resplit_test")

  def _policy_side(self, c) -> None:
    c.tokenizer.update(configlib.plain(self.cfg.policy.tokenizer))
    c.model.update(self.policy_model())
    c.data.name = str(self.cfg.data.name)
    c.prompts.max_length = int(self.cfg.policy.prompt_length)
    c.prompts.style = str(self.cfg.policy.style)
    c.sampling.max_new_tokens = self.max_new_tokens
    c.gold = self.gold_reward_spec()

  def bon_config(self, width: int):
    cfg = self.cfg.bon
    c = self.against_proxy(bon_smollm2, width)
    c.prompts.num_eval = int(cfg.num_prompts)
    # Not num_points or num_bootstrap: curve-only settings, which the report redraws from
    # the samples; in the stage's key they refused a finished stage (GPU hours of samples).
    c.bon.update(num_samples=int(cfg.num_samples), prompts_per_batch=int(cfg.prompts_per_batch))
    return c

  def rl_config(self, width: int, algorithm: str | None = None):
    cfg = self.cfg.rl
    c = self.against_proxy(rl_smollm2, width)
    algorithm = str(algorithm or cfg.algorithm)
    c.rl.update(algorithm=algorithm, kl_coef=float(cfg.kl_coef),
                prompts_per_step=int(cfg.prompts_per_step),
                group_size=1 if algorithms.get_algorithm(algorithm).one_per_prompt
                else int(cfg.group_size))
    c.optimizer.learning_rate = float(cfg.learning_rate)
    text_world.stage_loop(c.loop, steps=int(cfg.steps), checkpoint_every=int(cfg.eval_every))
    c.prompts.num_eval = 2
    return c

  def dpo_config(self, loss: str, beta: float, dataset: str):
    cfg = self.cfg.dpo
    c = dpo_smollm2.get_config()
    c.tokenizer.update(configlib.plain(self.cfg.policy.tokenizer))
    c.model.update(self.policy_model())
    c.data.name, c.data.eval_split = dataset, "resplit_test"  # see policy_pairs
    prompt_length = int(self.cfg.policy.prompt_length)
    c.data.pipeline.update(batch_size=int(cfg.batch_size), max_prompt_length=prompt_length,
                           max_length=prompt_length + self.max_new_tokens + 2,
                           bucket_boundaries=())
    c.loss.name, c.loss.beta = loss, float(beta)
    text_world.cached_reference(c, self.workdir)
    c.optimizer.update(learning_rate=float(cfg.learning_rate), total_steps=int(cfg.steps),
                       warmup_steps=min(20, int(cfg.steps) // 10))
    text_world.stage_loop(c.loop, steps=int(cfg.steps), checkpoint_every=int(cfg.eval_every))
    c.loop.update(async_checkpointing=False, tensorboard=False)
    return c


def describe(results: dict[str, Any]) -> str:
  """The report's paragraph on what this world ran."""
  pairs, world = results["pairs"], results["world"]
  return (f"π_ref is {world['policy']} (no SFT) sampling HH-RLHF harmless-base training "
          "prompts in the chat template. Gold: a reward model trained by `train_rm` on the "
          "human HH pairs (`gold/`). Proxies: smaller encoder reward models trained from "
          f"scratch by `train_rm` on {text_report.pairs_text(pairs)}. Best-of-n by "
          "`best_of_n`, RLOO by "
          "`train_rl`, the DPO family (when configured) by `train_dpo` on the same pairs; "
          "every RL and DPO checkpoint sampled on the same held-out HH prompts with the "
          "same key; gold and proxies in SDs under π_ref.")
