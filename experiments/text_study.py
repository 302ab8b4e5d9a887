"""The text world of the overoptimization study, run through the project's binaries.

``run_text_study(config.text, workdir)`` runs, each stage in its own folder under
``workdir`` (a finished stage writes ``done.json`` with its config; a rerun skips it, and
stops if that config changed):

1. ``sft``: ``train_sft`` on the chosen responses of gold-labelled world pairs;
   its HF export is the reference policy π_ref of everything below.
2. ``pairs``: two π_ref samples for each of N fresh prompts, labelled by the gold
   reward (deterministically) and written as a ``synthetic:`` dataset: the
   proxies' training data and the DPO family's.
3. ``proxies/w{W}``: ``train_rm`` of a byte-level decoder reward model of hidden
   width W on those pairs (the proxy sizes of Gao et al.).
4. ``bon/w{W}``: ``best_of_n`` of π_ref against proxy W, scored by the gold.
5. ``rl/w{W}``: ``train_rl`` (RLOO, sequence-level KL penalty) against proxy W; and
   ``rl/{algo}_w{W}`` for each of ``rl.frontier_algorithms`` (e.g. PPO) against the
   widest RL proxy: more references for DPO's reward–KL frontier (P1).
6. ``dpo/{loss}_b{β}``: ``train_dpo`` on the gold-labelled pairs at each β.
7. Every RL and DPO checkpoint is sampled on the same evaluation prompts (a draw of
   their own, not de-duplicated against the pairs') with the same key
   (``prefjax.overopt.text_world``): gold, proxy and exact KL per prompt.

Gold and proxies are standardised under π_ref (mean 0, SD 1 over its samples).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from configs.bon import tiny as bon_config
from configs.dpo import tiny as dpo_config
from configs.rl import tiny_ppo as ppo_config
from configs.rl import tiny_rloo as rl_config
from configs.rm import tiny as rm_config
from configs.sft import tiny as sft_config
from experiments import best_of_n
from experiments import train_dpo
from experiments import train_rl
from experiments import train_rm
from experiments import train_sft
from prefjax import configlib
from prefjax import experiment
from prefjax import files
from prefjax.overopt import text_world
from prefjax.overopt import world_seeds
from prefjax.rl import algorithms
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib


class TextWorld:
  """The study's world, reference policy and rewards, built from ``config.text``."""
  max_new_tokens = 14  # of every sampled response
  progress_label = "text world"

  def __init__(self, cfg: Any, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.world_fields = configlib.plain(cfg.world)
    self.world = rl_rewards.world_from_config(self.world_fields)
    self.tokenizer = experiment.make_tokenizer({"path": "byte"})
    self.sft_dir = os.path.join(workdir, "sft")
    self.gold = rl_rewards.make_reward({"kind": "tiny_world_gold"}, world=self.world)

  # ------------------------------------------------------------------ model specs
  def policy_model(self, path: str = "") -> dict[str, Any]:
    return dict(arch="decoder", preset="tiny_llama", path=path, dtype="float32",
                overrides=configlib.plain(self.cfg.policy))

  def reference_path(self) -> str:
    return os.path.join(self.sft_dir, experiment.HF_EXPORT_DIR)

  def proxy_model(self, width: int) -> dict[str, Any]:
    return text_world.proxy_model(width, int(self.cfg.proxy.num_layers))

  def proxy_reward_spec(self, width: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        text_world.proxy_reward_spec(width, int(self.cfg.proxy.num_layers), self.workdir))

  def make_policy(self, path: str = ""):
    return experiment.make_model(self.policy_model(path), vocab_size=self.tokenizer.vocab_size,
                                 seed=0)

  def stream_seed(self, seed: int) -> int:
    """``seed`` for this world's own draws (``prefjax.overopt.world_seeds``)."""
    return world_seeds.stream_seed(seed, world_seeds.world_seed(self.cfg))

  def _stream_key(self, seed: int) -> dict[str, int]:
    return world_seeds.stream_key(seed, world_seeds.world_seed(self.cfg))

  def world_prompts(self, count: int, seed: int, tag: int) -> rollout_lib.Prompts:
    """``count`` encoded prompts of the world, from this world's stream ``(seed, tag)``."""
    rng = np.random.default_rng((self.stream_seed(seed), tag))
    return text_world.world_prompts(self.world, self.tokenizer, int(count), rng)

  def eval_prompts(self) -> rollout_lib.Prompts:
    return self.world_prompts(self.cfg.eval.num_prompts, self.cfg.eval.seed, 7)

  # ------------------------------------------------------------------ datasets
  def world_pairs_dataset(self) -> str:
    """Gold-labelled uniform world pairs (the SFT data: their chosen responses)."""
    num, seed = int(self.cfg.sft.num_pairs), int(self.cfg.sft.data_seed)
    return text_world.pairs_dataset(
        f"textworld-sft-{text_world.digest(self.world_fields, num, seed)}",
        lambda: self.world.preference_pairs(num, seed=seed),
        dict(world=self.world_fields, seed=seed))

  def pairs_key(self) -> dict[str, Any]:
    """What :meth:`policy_pairs` depends on besides π_ref (whose stage is keyed itself)."""
    return dict(world=self.world_fields, policy=configlib.plain(self.cfg.policy),
                pairs=configlib.plain(self.cfg.pairs), max_new_tokens=self.max_new_tokens,
                **self._stream_key(self.cfg.pairs.seed))

  def policy_pairs(self) -> dict[str, Any]:
    """Two π_ref samples per prompt, gold-labelled; pairs with an empty response, two
    identical responses or equal gold are counted and dropped. Written as a ``synthetic:`` dataset; returns its name and counts."""
    cfg = self.cfg.pairs
    policy = self.make_policy(self.reference_path())
    return text_world.gold_pairs_dataset(
        policy, self.world_prompts(cfg.num_pairs, cfg.seed, 11), self.gold, self.tokenizer,
        name="textworld-pairs", meta=dict(world=self.world_fields, policy="sft"),
        seed=self.stream_seed(cfg.seed), max_new_tokens=self.max_new_tokens)

  # ------------------------------------------------------------------ binary configs
  def reference_stage(self):
    """(folder, binary, config maker, label) of the stage before the pairs."""
    return self.sft_dir, train_sft.run, self.sft_config, "SFT reference policy"

  def sft_config(self):
    c = sft_config.get_config()
    c.model.update(self.policy_model())
    c.data.name = self.world_pairs_dataset()
    c.data.pipeline.max_length = 32
    c.loop.num_steps = c.optimizer.total_steps = int(self.cfg.sft.steps)
    c.loop.eval_every = c.loop.checkpoint_every = int(self.cfg.sft.steps)
    world_seeds.own_seeds(c, self.stream_seed(c.seed))
    return c

  def rm_config(self, width: int, dataset: str):
    c = rm_config.get_config()
    c.model.update(self.proxy_model(width))
    c.data.name = dataset
    c.data.pipeline.batch_size = int(self.cfg.proxy.batch_size)
    c.loop.num_steps = int(self.cfg.proxy.steps)
    c.loop.eval_every = c.loop.checkpoint_every = int(self.cfg.proxy.steps)
    world_seeds.own_seeds(c, self.stream_seed(self.cfg.proxy.seed))
    return c

  def _policy_side(self, c) -> None:
    c.model.update(self.policy_model(self.reference_path()))
    c.world.update(self.world_fields)
    world_seeds.own_seeds(c, self.stream_seed(c.seed))  # best-of-n's, RL's prompts, samples
    c.warm_start.steps = 0

  def against_proxy(self, base: Any, width: int) -> ml_collections.ConfigDict:
    """``base``'s config (a ``best_of_n`` or ``train_rl`` one) for π_ref and proxy ``width``."""
    c = base.get_config()
    self._policy_side(c)
    c.proxy = self.proxy_reward_spec(width)
    return c

  def bon_config(self, width: int):
    c = self.against_proxy(bon_config, width)
    c.prompts.num_eval = int(self.cfg.bon.num_prompts)
    c.bon.num_samples = int(self.cfg.bon.num_samples)
    # Not bon.num_points: a curve-only setting (text_report draws the study's curve from
    # the samples), which in the stage key would force the samples to be drawn again.
    c.bon.prompts_per_batch = max(1, 4096 // int(self.cfg.bon.num_samples))
    return c

  def rl_config(self, width: int, algorithm: str | None = None):
    """``train_rl``'s config against proxy ``width``: RLOO (any method sampling groups) as
    ``configs/rl/tiny_rloo.py`` (16 prompts × 4 samples a step), PPO (any method sampling
    one response a prompt) as ``tiny_ppo.py`` (64 prompts)."""
    cfg = self.cfg.rl
    algorithm = str(algorithm or cfg.algorithm)
    one_per_prompt = algorithms.get_algorithm(algorithm).one_per_prompt
    c = self.against_proxy(ppo_config if one_per_prompt else rl_config, width)
    c.rl.algorithm = algorithm
    c.rl.kl_coef = float(cfg.kl_coef)
    text_world.stage_loop(c.loop, steps=int(cfg.steps), checkpoint_every=int(cfg.eval_every))
    c.prompts.num_eval = 16
    c.log_train_gold = False
    return c

  def dpo_config(self, loss: str, beta: float, dataset: str):
    cfg = self.cfg.dpo
    c = dpo_config.get_config()
    c.model.update(self.policy_model(self.reference_path()))
    c.data.name = dataset
    c.loss.name, c.loss.beta = loss, float(beta)
    text_world.cached_reference(c, self.workdir)
    text_world.stage_loop(c.loop, steps=int(cfg.steps), checkpoint_every=int(cfg.eval_every))
    c.optimizer.learning_rate = float(cfg.learning_rate)
    c.data.pipeline.batch_size = int(cfg.get("batch_size", c.data.pipeline.batch_size))
    world_seeds.own_seeds(c, self.stream_seed(c.seed))
    return c

  # ------------------------------------------------------------------ evaluation
  def evaluator(self, proxies: dict[str, rl_rewards.PairReward]):
    prompts, cfg = self.eval_prompts(), self.cfg.eval
    reference = self.make_policy(self.reference_path())
    evaluate = functools.partial(  # evaluate(policy): every policy sees the same samples' key
        text_world.evaluate_policy, reference=reference, prompts=prompts,
        key=jax.random.key(self.stream_seed(cfg.seed)), tokenizer=self.tokenizer,
        rewards={"gold": self.gold, **proxies}, max_new_tokens=self.max_new_tokens,
        samples_per_prompt=int(cfg.samples_per_prompt))
    return evaluate, reference

  def evaluation_key(self, proxy_widths: list[int]) -> dict[str, Any]:
    """``text_world.evaluation_key`` of this world's evaluator and stages."""
    key = text_world.evaluation_key(
        self.cfg.eval, self.max_new_tokens, reference=self.reference_stage()[0],
        proxies={f"proxy_w{w}": self.proxy_reward_spec(w).checkpoint for w in proxy_widths})
    return dict(key, **self._stream_key(self.cfg.eval.seed))


# ---------------------------------------------------------------------------- stages


def run_text_study(cfg: Any, workdir: str, progress_cls, world_cls=None) -> dict[str, Any]:
  """Runs every stage (skipping finished ones) and returns the raw results:
  ``scales``, ``bon`` (width -> samples), ``rl`` (width -> Trajectory), ``dpo``
  ((loss, β) -> Trajectory), ``proxy_stats`` and ``pairs``."""
  tw = (world_cls or TextWorld)(cfg, workdir)
  widths = [int(w) for w in cfg.proxy.widths]
  rl_widths = [int(w) for w in cfg.rl.widths]
  dpo_runs = text_world.dpo_runs(cfg.dpo)
  frontier_algorithms = tuple(cfg.rl.get("frontier_algorithms", ()))
  seed = world_seeds.world_seed(cfg)
  stage = tw.progress_label if seed is None else f"{tw.progress_label} seed {seed}"
  progress = progress_cls(stage, 2 + 2 * len(widths) + 2 * len(rl_widths)
                          + 2 * len(frontier_algorithms) + 2 * len(dpo_runs))
  reference_dir, binary, make_config, label = tw.reference_stage()
  info = text_world.binary_stage(reference_dir, binary, make_config, workdir=workdir)
  progress.step(f"{label} ({info['wall_s']:.0f} s)")
  pairs_dir = os.path.join(workdir, "pairs")
  pairs = text_world.run_stage(pairs_dir, tw.policy_pairs,
                               key=text_world.config_key(tw.pairs_key(), workdir),
                               upstream={"reference": reference_dir})
  progress.step(f"{pairs['num_pairs']} gold-labelled π_ref pairs")
  proxy_dir = lambda w: os.path.join(workdir, "proxies", f"w{w}")
  proxy_stats = []
  for w in widths:
    info = text_world.binary_stage(proxy_dir(w), train_rm.run,
                                   lambda: tw.rm_config(w, pairs["dataset"]), workdir=workdir,
                                   upstream={"pairs": pairs_dir})
    proxy_stats.append(dict(width=w, **info))
    progress.step(f"proxy width {w}: held-out accuracy {info.get('accuracy', float('nan')):.3f}")
  bon = {}
  for w in widths:
    path = os.path.join(workdir, "bon", f"w{w}")
    text_world.binary_stage(path, best_of_n.run, lambda: tw.bon_config(w), workdir=workdir,
                            upstream={"reference": reference_dir, "proxy": proxy_dir(w)})
    bon[w] = files.read_npz(os.path.join(path, best_of_n.SAMPLES_FILE))
    progress.step(f"best-of-n against proxy width {w}")
  scales = text_world.reference_scales(bon)
  scored = sorted(set(rl_widths) | {max(widths)})
  proxies = {f"proxy_w{w}": rl_rewards.make_reward(tw.proxy_reward_spec(w)) for w in scored}
  evaluate, reference = tw.evaluator(proxies)
  eval_key = tw.evaluation_key(scored)

  def trained(path, run, make_config, upstream, label, make_policy, **policy_kw):
    """A training stage, then its checkpoints evaluated and standardised under π_ref."""
    text_world.binary_stage(path, run, make_config, workdir=workdir, upstream=upstream)
    progress.step(label)
    traj = text_world.cached_trajectory(path, make_policy, reference, evaluate, key=eval_key,
                                        **policy_kw)
    progress.step(f"{label}: {len(traj.steps)} checkpoints evaluated")
    return text_world.standardized(traj, scales)

  def rl_stage(name: str, width: int, algorithm: str | None = None) -> text_world.Trajectory:
    config = tw.rl_config(width, algorithm)
    bundle = text_world.rl_bundle_maker(lambda: tw.make_policy(tw.reference_path()), config.rl)
    return trained(os.path.join(workdir, "rl", name), train_rl.run, lambda: config,
                   {"reference": reference_dir, "proxy": proxy_dir(width)},
                   f"RL {name} ({config.rl.algorithm} against proxy width {width})", bundle,
                   trainable=rollout_lib.TRAINABLE, policy_of=lambda bundle: bundle.policy)

  rl = {w: rl_stage(f"w{w}", w) for w in rl_widths}
  # More RL algorithms against the widest RL proxy: references for DPO's frontier (P1).
  rl_frontier = {algo: rl_stage(f"{algo}_w{max(rl_widths)}", max(rl_widths), algo)
                 for algo in frontier_algorithms}
  dpo = {(loss, beta): trained(os.path.join(workdir, "dpo", f"{loss}_b{beta:g}"), train_dpo.run,
                               functools.partial(tw.dpo_config, loss, beta, pairs["dataset"]),
                               {"reference": reference_dir, "pairs": pairs_dir},
                               f"{loss} β={beta:g}", lambda: tw.make_policy(tw.reference_path()))
         for loss, beta in dpo_runs}
  return {"scales": scales, "bon": bon, "rl": rl, "rl_frontier": rl_frontier, "dpo": dpo,
          "proxy_stats": proxy_stats,
          "pairs": pairs, "widths": widths, "world": tw.world_fields}

