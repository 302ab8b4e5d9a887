"""The bandit-world overoptimization study: proxies of several sizes, data sizes and noise
levels, best-of-n and the RL path, ensembles, scored against gold.

``run_bandit_study(config, workdir)`` runs, for every world seed:

1. the world (``bandit.make_world``);
2. proxies trained through the project's Bradley–Terry loss and train step
   (``bandit.train_proxies``) for each width of the size sweep, each pair count
   of the data sweep, and each label-noise level of the ensemble study, K seeds
   each; scores are cached in ``workdir/proxies`` so a rerun skips them;
3. exact best-of-n and closed-form RL-path curves per seed, averaged over
   seeds (``curves.setting_curves``), ensembles (mean / WCO / UWO) and the
   disagreement under each aggregation, the estimator check;
4. optionally the learned-policy RL variant against the closed form.

Worlds are pooled by concatenating their prompts (each world's prompts are
i.i.d. draws of the same generator), so pooled curves average over worlds and
the bootstrap over prompts covers them all. Returns everything the criteria,
figures and report need as a ``BanditResults``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, NamedTuple, Sequence

import numpy as np
from absl import logging

from prefjax import files
from prefjax.losses import preference
from prefjax.overopt import bandit
from prefjax.overopt import bon
from prefjax.overopt import criteria
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import direct_criteria
from prefjax.overopt import direct_study
from prefjax.overopt import exact
from prefjax.overopt import policy_net
from prefjax.overopt import world_seeds
from prefjax.train import schedules
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from prefjax.train.metrics import Progress


class WorldCurves(NamedTuple):
  """One world's own curves; ``BanditResults`` pools these over worlds."""
  sizes: list[curves_lib.SettingCurves]
  data: list[curves_lib.SettingCurves]
  ensembles: dict[float, dict[str, curves_lib.SettingCurves]]
  disagreement: dict[float, dict[str, np.ndarray]]
  estimator_check: dict


class BanditResults(NamedTuple):
  sizes: list[curves_lib.SettingCurves]        # one per width, pooled over worlds
  widths: list[int]
  data: list[curves_lib.SettingCurves]         # one per pair count
  data_sizes: list[int]
  ensembles: dict[float, dict[str, curves_lib.SettingCurves]]  # noise -> single/mean/wco/uwo
  disagreement: dict[float, dict[str, np.ndarray]]             # noise -> aggregation -> [P, S]
  estimator_checks: list[dict]
  proxy_stats: list[dict]                      # per world and setting: accuracies, wall time
  learned_policy: list[dict]
  direct: dict[str, Any] | None                # DPO-family sweeps and the RL reference
  per_world: dict[int, dict[str, Any]]         # world seed -> that world's own key numbers
  ns: np.ndarray
  betas: np.ndarray
  worlds: dict[int, WorldCurves] | None = None  # world seed -> its unpooled curves


def world_config(config: Any, seed: int) -> bandit.WorldConfig:
  return bandit.WorldConfig(**{**dict(config.world), "seed": int(seed)})


def proxy_config(config: Any, **overrides: Any) -> bandit.ProxyConfig:
  return bandit.ProxyConfig(**{**dict(config.proxy), **overrides})


# The code that draws a world and trains and scores its proxies: an edit of any of them
# retrains (the key hashed bandit.py alone, so a change to the proxies' network, loss or
# train step served the old proxies).
PROXY_SOURCES = (bandit, world_seeds, policy_net, preference, step_lib, state_lib, schedules)


def _cached_proxies(workdir: str, name: str, world: bandit.World, cfg: bandit.ProxyConfig,
                    seeds: Sequence[int]) -> tuple[np.ndarray, dict]:
  """Trains K proxies or reads them from ``workdir/proxies/NAME.npz`` (keyed by config and
  by the source of the code that draws the world and trains the proxies)."""
  key = repr((dataclasses.astuple(world.config), dataclasses.astuple(cfg), tuple(seeds),
              files.source_digest(*PROXY_SOURCES)))
  # Named by what was trained, so two stages asking for the same proxies share them.
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  path = os.path.join(workdir, "proxies", f"{name}_{digest}.npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as cached:
      if str(cached["key"]) == key:
        stats = {k: cached[k].tolist() for k in ("gold_accuracy", "train_accuracy",
                                                   "train_loss")}
        # wall_s: the training's wall time, None in caches written before it was stored.
        wall_s = float(cached["wall_s"]) if "wall_s" in cached.files else None
        return cached["scores"], {**stats, "wall_s": wall_s, "cached": True}
  proxies = bandit.train_proxies(world, cfg, seeds)
  stats = {"gold_accuracy": proxies.gold_accuracy.tolist(),
           "train_accuracy": proxies.train_accuracy.tolist(),
           "train_loss": proxies.train_loss.tolist(), "wall_s": float(proxies.wall_s)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_atomically(path, lambda f: np.savez(
      f, scores=proxies.scores, key=key, **{k: np.asarray(v) for k, v in stats.items()}))
  return proxies.scores, {**stats, "cached": False}


class _World:
  """Runs every stage of one world and keeps its per-setting curves."""

  def __init__(self, config: Any, workdir: str, seed: int, ns, betas, progress: Progress):
    self.config, self.workdir, self.seed = config, workdir, seed
    self.ns, self.betas, self.progress = ns, betas, progress
    self.boot = int(config.num_bootstrap)
    self.seeds = list(range(int(config.seeds)))
    start = time.time()
    self.world = bandit.make_world(world_config(config, seed))
    logging.info("world %d: %d prompts x %d candidates, built in %.1f s", seed,
                 self.world.gold.shape[0], self.world.gold.shape[1], time.time() - start)
    self.stats: list[dict] = []
    self.scores: dict[str, np.ndarray] = {}

  def proxies(self, label: str, **overrides) -> np.ndarray:
    cfg = proxy_config(self.config, **overrides)
    scores, stats = _cached_proxies(self.workdir, f"world{self.seed}_w{cfg.width}",
                                    self.world, cfg, self.seeds)
    self.stats.append({"world": self.seed, "setting": label, **overrides, **stats})
    self.scores[label] = scores
    acc = np.mean(stats["gold_accuracy"])
    self.progress.step(f"world {self.seed} {label}: gold accuracy {acc:.3f}")
    return scores

  def setting(self, label: str, with_rl: bool, **overrides) -> curves_lib.SettingCurves:
    scores = self.proxies(label, **overrides)
    return curves_lib.setting_curves(label, self.world, scores, self.ns,
                                     self.betas if with_rl else None, num_bootstrap=self.boot)

  def ensembles(self, noise: float) -> tuple[dict, dict]:
    cfg = self.config.ensembles
    label = f"w{cfg.width}_noise{noise:g}"
    # The sizes sweep's data size (the ensembles took ProxyConfig's default whatever it was).
    members = self.proxies(label, width=int(cfg.width), label_noise=float(noise),
                           num_pairs=int(self.config.sizes.num_pairs))
    single = curves_lib.setting_curves(f"single (w={cfg.width})", self.world, members, self.ns,
                                       self.betas, num_bootstrap=self.boot)
    out, growth = {"single": single}, {}
    disagreement_ns = self.ns[np.linspace(0, len(self.ns) - 1, 9).round().astype(int)]
    for method in ("mean", "wco", "uwo"):
      lam = float(cfg.uwo_lambda) if method == "uwo" else 0.0
      aggregate = curves_lib.aggregate_members(self.world, members, method, lam)
      out[method] = curves_lib.setting_curves(method, self.world, aggregate[None], self.ns,
                                              self.betas, num_bootstrap=self.boot)
      growth[method] = curves_lib.disagreement_growth(self.world, members, aggregate,
                                                      disagreement_ns)
    return out, growth


def grids(config: Any) -> tuple[np.ndarray, np.ndarray]:
  """The best-of-n ns and RL-path βs of a study config."""
  ns = bon.log_spaced_ns(int(config.bon.n_max), int(config.bon.num_ns))
  betas = np.logspace(np.log10(config.rl.beta_min), np.log10(config.rl.beta_max),
                      int(config.rl.num_betas))
  return ns, betas


def _num_units(config: Any) -> int:
  per_world = (len(config.sizes.widths) + len(config.data.num_pairs)
               + len(config.ensembles.label_noise))
  return per_world * len(config.world_seeds)


def run_bandit_study(config: Any, workdir: str) -> BanditResults:
  """Runs the bandit-world study of ``config`` (see ``configs/reproduce/quick.py``).

  The learned-policy RL check and the direct-alignment sweeps (when enabled) run
  on the first world only: they check a mechanism, not a world-dependent effect.
  """
  ns, betas = grids(config)
  progress = Progress("bandit proxies", _num_units(config))
  widths = [int(w) for w in config.sizes.widths]
  data_sizes = [int(n) for n in config.data.num_pairs]
  noises = [float(x) for x in config.ensembles.label_noise]
  sizes, data, ens, growth = [], [], {x: [] for x in noises}, {x: [] for x in noises}
  checks, stats, policy_rows, per_world, direct = [], [], [], {}, None
  for seed in config.world_seeds:
    w = _World(config, workdir, int(seed), ns, betas, progress)
    sizes.append([w.setting(f"w{width}", True, width=width,
                            num_pairs=int(config.sizes.num_pairs)) for width in widths])
    data.append([w.setting(f"w{config.data.width}_n{n}", False, width=int(config.data.width),
                           num_pairs=n) for n in data_sizes])
    for noise in noises:
      tic = time.time()
      curves, g = w.ensembles(noise)
      logging.info("world %d: ensembles at %.0f%% noise in %.1f s", seed, 100 * noise,
                   time.time() - tic)
      ens[noise].append(curves)
      growth[noise].append(g)
    smallest_scores = w.scores[f"w{widths[0]}"]
    tic = time.time()
    checks.append({"world": int(seed), **criteria.estimator_check(
        w.world, smallest_scores[0], config.estimator.ns,
        num_samples=int(config.estimator.num_samples),
        mc_repeats=int(config.estimator.mc_repeats), seed=int(seed))})
    logging.info("world %d: estimator check in %.1f s", seed, time.time() - tic)
    if seed == config.world_seeds[0]:
      policy_rows, direct = _first_world_extras(config, w, smallest_scores[0], betas)
    stats += w.stats
    per_world[int(seed)] = _world_summary(sizes[-1])
  boot = int(config.num_bootstrap)
  pooled = lambda per_world_settings: [curves_lib.pool_worlds(list(s), num_bootstrap=boot)
                                       for s in zip(*per_world_settings)]
  ensembles = {x: {k: curves_lib.pool_worlds([e[k] for e in ens[x]], num_bootstrap=boot)
                   for k in ens[x][0]}
               for x in noises}
  disagreement = {x: {k: np.concatenate([g[k] for g in growth[x]]) for k in growth[x][0]}
                  for x in noises}
  worlds = {int(seed): WorldCurves(sizes[i], data[i], {x: ens[x][i] for x in noises},
                                   {x: growth[x][i] for x in noises}, checks[i])
            for i, seed in enumerate(config.world_seeds)}
  return BanditResults(pooled(sizes), widths, pooled(data), data_sizes, ensembles,
                       disagreement, checks, stats, policy_rows, direct, per_world, ns, betas,
                       worlds)


def _first_world_extras(config: Any, w: "_World", proxy: np.ndarray,
                        betas: np.ndarray) -> tuple[list[dict], dict | None]:
  rows, direct = [], None
  cfg = config.learned_policy
  if cfg.enabled:
    tic = time.time()
    rows = learned_policy_rows(w.world, proxy, cfg.lams, cfg.policy, world_seed=w.seed,
                               num_prompts=int(cfg.num_prompts))
    logging.info("world %d: learned-policy RL in %.1f s", w.seed, time.time() - tic)
  if config.direct.enabled:
    width, num_pairs = int(config.direct.proxy_width), int(config.direct.num_pairs)
    label = f"w{width}"
    # The size sweep's proxy of this width, where it was trained on the sweeps' pair count.
    scores = w.scores.get(label) if num_pairs == int(config.sizes.num_pairs) else None
    if scores is None:
      own = label if label not in w.scores else f"{label}_pairs{num_pairs}"
      scores = w.proxies(own, width=width, num_pairs=num_pairs)
    direct = direct_study_results(w.world, scores[0], config.direct, betas)
  return rows, direct


def _world_summary(sizes: Sequence[curves_lib.SettingCurves]) -> dict[str, Any]:
  """The key numbers of one world, so the report can show the spread across worlds."""
  out = {}
  for s in sizes:
    bon = curves_lib.decline(s.bon)
    out[s.label] = {"bon_peak_n": float(s.bon.knob[bon.peak]), "bon_drop": bon.drop,
                    "bon_drop_z": bon.z, "bon_drop_critical_z": bon.critical_z,
                    "beta_bon": s.fit_bon.beta,
                    "peak_gold_bon": float(np.max(s.bon.gold)), "r2_bon": s.fit_bon.r2}
    if s.rl is not None:
      rl = curves_lib.decline(s.rl)
      out[s.label].update(rl_peak_beta=float(s.rl.knob[rl.peak]), rl_drop=rl.drop,
                          rl_drop_z=rl.z, rl_drop_critical_z=rl.critical_z)
  return out


def learned_policy_rows(world: bandit.World, proxy: np.ndarray, lams: Sequence[float],
                        policy: Any, *, world_seed: int, num_prompts: int = 0) -> list[dict]:
  """RL with a learned MLP policy vs the closed-form optimum π_ref·exp(r/λ), per λ.

  The policy (``policy_net.train_policy``) minimises −E_π[r_proxy] + λ·KL exactly
  over the candidates; the closed form is ``exact.rl_path_scores`` at β = 1/λ.
  ``num_prompts`` > 0 uses only the first prompts (each step scores all M
  candidates of every prompt, so this bounds the cost).
  """
  if num_prompts:
    world = world._replace(features=world.features[:num_prompts],
                           ref_logits=world.ref_logits[:num_prompts],
                           gold=world.gold[:num_prompts])
    proxy = proxy[:num_prompts]
  rows = []
  ref_gold = curves_lib.reference_scores(world, world.gold)
  for lam in lams:
    cfg = policy_net.PolicyConfig(**dict(policy))
    log_pi, _ = policy_net.train_policy(world, policy_net.kl_regularized_loss(proxy, lam), cfg)
    pi = np.exp(log_pi)
    closed = exact.rl_path_scores(world.ref_logits, proxy, world.gold, [1.0 / lam])
    rows.append({"world": world_seed, "lam": float(lam),
                 "learned_kl": float(policy_net.exact_kl(log_pi, world.ref_logits).mean()),
                 "closed_form_kl": float(closed.kl.mean()),
                 "learned_proxy": float(np.sum(pi * proxy, -1).mean()),
                 "closed_form_proxy": float(closed.proxy.mean()),
                 "learned_gold": float((np.sum(pi * world.gold, -1) - ref_gold).mean()),
                 "closed_form_gold": float((closed.gold[:, 0] - ref_gold).mean())})
    logging.info("learned policy λ=%g: KL %.2f (closed form %.2f), gold %.3f (closed form %.3f)",
                 lam, rows[-1]["learned_kl"], rows[-1]["closed_form_kl"],
                 rows[-1]["learned_gold"], rows[-1]["closed_form_gold"])
  return rows


def direct_study_results(world: bandit.World, proxy: np.ndarray, config: Any,
                         rl_betas: np.ndarray) -> dict[str, Any]:
  """DPO / IPO / SLiC β sweeps on gold-labelled pairs, and the RL reference for P1.

  Each loss gets the β grid ``direct_study.theory_betas`` predicts to span
  ``config.kl_range`` nats; ``proxy`` ``[P, M]`` (trained on the same pairs as the
  sweeps: member seed 0, ``config.num_pairs``) defines the RL optimum of P1.
  """
  sweeps = {}
  for loss in config.losses:
    tic = time.time()
    betas = direct_study.theory_betas(world, loss, kl_range=tuple(config.kl_range),
                                      num=int(config.num_betas))
    sweeps[loss] = direct_study.daa_sweep(world, loss, betas, num_pairs=int(config.num_pairs),
                                          steps=int(config.steps),
                                          eval_every=int(config.eval_every), seed=0)
    final_kl = np.sort(sweeps[loss].kl[:, -1])
    logging.info("direct study %s: %d β in %.1f s; final KL %s nats (asked for %s)", loss,
                 len(betas), time.time() - tic, np.round(final_kl, 2).tolist(),
                 tuple(config.kl_range))
    target = np.geomspace(*config.kl_range, num=len(final_kl))
    if np.mean(np.abs(np.log(np.maximum(final_kl, 1e-12) / target)) > np.log(3)) > 1 / 3:
      logging.warning("direct study %s: final KL %s nats is more than 3x off the log-spaced "
                      "%s asked for at more than a third of the β (theory_betas' prediction "
                      "is approximate for this loss): D1 sees fewer distinct KLs", loss,
                      np.round(final_kl, 2).tolist(), np.round(target, 2).tolist())
  # D3 is a claim about each loss's optimum on fixed data: full-batch, trained to convergence.
  d3 = {}
  for loss in ("dpo", "ipo"):
    tic = time.time()
    cfg = config.d3
    betas = direct_study.theory_betas(world, loss, kl_range=tuple(config.kl_range),
                                      num=int(config.num_betas))
    d3[loss] = direct_study.daa_sweep(world, loss, betas, num_pairs=int(cfg.num_pairs),
                                      steps=int(cfg.steps), eval_every=int(cfg.eval_every),
                                      seed=0, batch_size=None)
    logging.info("direct study %s, full batch (D3): %d β in %.1f s", loss, len(betas),
                 time.time() - tic)
  return {"sweeps": sweeps, "d3_sweeps": d3,
          "ppo": direct_criteria.ppo_reference(world, proxy, rl_betas)}
