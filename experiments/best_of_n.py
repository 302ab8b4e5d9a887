r"""Best-of-n against a proxy reward, scored by the gold reward: the BoN overoptimization curve.

  python -m experiments.best_of_n --config=configs/bon/tiny.py --workdir=/tmp/bon

Samples N responses per held-out prompt from the policy (KV-cache ``generate``;
the policy IS the reference of best-of-n), scores every sample with the proxy
(a reward model, an ensemble under its mean, or WCO / UWO of its members standardized
over all the samples, or a programmatic proxy such as the tiny
world's planted one) and with the gold
reward (a reward model's ``checkpoint``: a ``train_rm`` workdir, ``WORKDIR@best`` or
``WORKDIR@STEP``; ``prefjax.rl.rewards``), and normalises both so that the reference
policy scores 0 (each prompt's mean over its own samples is subtracted). For every n
in a log-spaced grid up to N
it reports the unbiased best-of-n estimate of the proxy and gold scores
(Nakano et al., arXiv:2112.09332; Gao et al., arXiv:2210.10760) with bootstrap
standard errors over prompts, against KL_bon(n) = log n − (n−1)/n (an upper
bound on the true KL, Beirami et al., arXiv:2401.01879).

With ``config.safety`` (``prefjax.feedback.safety_runtime.make_harm_scorer``: a
``train_safety`` workdir or the tiny world's programmatic harm), every sample also
gets a harm score; candidates with harm ≥ the threshold are rejected before the
proxy picks (all rejected: an explicit, counted fallback to the least harmful),
and ``report.json`` / ``report.md`` add ``safety_filter``: harm, proxy and gold
of best-of-n with and without the filter for every n (``prefjax.overopt.filtered``).

Outputs in the workdir: ``samples.npz`` (raw scores; a rerun reuses them when
every setting that shapes the samples is unchanged, and samples again otherwise;
while sampling, ``samples.partial.npz`` holds the batches of prompts scored so far,
saved at most every 30 s, and a run stopped halfway resumes after them),
``report.json`` (the curves), ``report.md`` and ``figures/bon.png`` (gold and
proxy vs √KL).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from absl import app
from absl import logging

from experiments import common
from prefjax import experiment
from prefjax import files
from prefjax import overopt
from prefjax import train
from prefjax.feedback import safety_runtime
from prefjax.overopt import bon_report
from prefjax.overopt import filtered
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import setup
from prefjax.train import summary as summary_lib

SAMPLES_FILE = "samples.npz"
PARTIAL_FILE = "samples.partial.npz"  # the prompts scored so far, while sampling
# Settings that only redraw the curves from the same samples.
_CURVE_ONLY = ("num_points", "num_bootstrap")


def check_config(config: Any, *, warn: bool = True) -> None:
  """One-line errors, before any sampling, for settings best-of-n cannot measure
  (``warn``: also log what it measures against another reference)."""
  for field, low in (("num_samples", 2), ("prompts_per_batch", 1), ("num_points", 2),
                     ("num_bootstrap", 2)):
    if int(config.bon[field]) < low:
      raise ValueError(f"bon.{field}={config.bon[field]} must be >= {low}")
  setup.check_sections(config)
  s = config.sampling
  if not float(s.temperature) > 0 or s.get("top_k") == 1:
    raise ValueError(f"sampling.temperature={s.temperature}, top_k={s.get('top_k')} draws the "
                     "same response every time, and best-of-n needs distinct samples of the "
                     "reference policy (temperature 1)")
  if warn and sampler_differs(config):
    logging.warning("best_of_n: sampling.temperature=%s, top_k=%s, top_p=%s: the reference of "
                    "KL_bon is this sampler, not the policy at temperature 1 (train_rl "
                    "refuses such settings)", s.temperature, s.get("top_k"), s.get("top_p"))


def sampler_differs(config: Any) -> bool:
  s = config.sampling
  return float(s.temperature) != 1.0 or s.get("top_k") is not None or s.get("top_p") is not None


def scorer_checkpoints(config: Any) -> dict[str, dict[str, Any]]:
  """The checkpoint each trained scorer loads (proxy, gold, safety classifier): its step
  and file digests (``train.checkpoint_identity``)."""
  paths = {name: (config.get(name) or {}).get("checkpoint") for name in ("proxy", "gold")}
  paths["safety"] = (config.get("safety") or {}).get("workdir")
  out = {name: train.checkpoint_identity(path) for name, path in paths.items() if path}
  if "safety" in out:  # a train_safety rerun re-chooses the threshold, weights unchanged
    threshold = os.path.join(paths["safety"], safety_runtime.THRESHOLD_FILE)
    if os.path.exists(threshold):
      with open(threshold, "rb") as f:
        out["safety"]["threshold_sha256"] = hashlib.sha256(f.read()).hexdigest()
  return out


def samples_fingerprint(config: Any, checkpoints: dict[str, Any] | None = None) -> str:
  """SHA-256 of the config without the curve-only ``bon`` settings, and of the scorers'
  checkpoints (``scorer_checkpoints``, computed if not given): samples drawn under another
  fingerprint (or scored by a reward model that has trained on since) are not reused."""
  cfg = summary_lib.config_to_dict(config)
  cfg["bon"] = {k: v for k, v in cfg.get("bon", {}).items() if k not in _CURVE_ONLY}
  cfg["_scorer_checkpoints"] = (scorer_checkpoints(config) if checkpoints is None
                                else checkpoints)
  return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def sample_and_score(config: Any, workdir: str | None = None,
                     fingerprint: str | None = None) -> dict[str, np.ndarray]:
  """``proxy``/``gold`` ``[P, N]`` raw scores of N reference samples per eval prompt.

  Dataset prompts are reported in ``workdir/data_report.json`` when ``workdir`` is given.
  With ``fingerprint`` (``samples_fingerprint``) too, the scores of the batches of prompts
  done are saved (``samples.partial.npz``, at most every 30 s): a run killed halfway
  resumes after them, and draws the same samples as one never stopped (each batch's key
  is its own).
  """
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  world = setup.make_world(config)
  _, prompts = setup.make_prompts(config, tokenizer, world, workdir=workdir)
  proxy_spec, aggregation, lam = rl_rewards.split_aggregation(config.proxy)
  proxy = rl_rewards.make_reward(proxy_spec, world=world, seed=int(config.seed))
  score_proxy = proxy if aggregation == "mean" else proxy.members
  gold = rl_rewards.make_reward(config.gold, world=world, seed=int(config.seed))
  harm, threshold = None, None
  if config.get("safety"):
    harm, threshold = safety_runtime.make_harm_scorer(config.safety, world=world)
  policy = setup.make_policy(config, tokenizer)
  setup.maybe_warm_start(policy, config, tokenizer, world)
  num_prompts, n = len(prompts.texts), int(config.bon.num_samples)
  chunk = int(config.bon.prompts_per_batch)
  key = jax.random.key(int(config.seed))
  partial = files.PartialArrays(
      os.path.join(workdir, PARTIAL_FILE) if workdir and fingerprint else None, fingerprint or "")
  resumed = partial.done
  progress = train.metrics.Progress("best_of_n prompts", num_prompts - resumed)
  for start in range(resumed, num_prompts, chunk):
    idx = np.resize(np.arange(start, min(start + chunk, num_prompts)), chunk)  # fixed shape
    part = rollout_lib.Prompts([prompts.texts[i] for i in idx], prompts.tokens[idx],
                               prompts.mask[idx]).repeat(n)
    rollout = rollout_lib.sample(policy, part, jax.random.fold_in(key, start),
                                 tokenizer=tokenizer, **config.sampling.to_dict())
    real = min(chunk, num_prompts - start) * n
    texts, responses = rollout.prompts[:real], rollout.responses[:real]
    scores = {"proxy": score_proxy(texts, responses), "gold": gold(texts, responses),
              "lengths": rollout.lengths[:real]}
    if harm is not None:
      scores["harm"] = harm(texts, responses)
      if world is not None:  # the programmatic harm, beside a learned filter's scores
        scores["world_harm"] = safety_runtime.tiny_world_harm(world)(texts, responses)
    done = min(start + chunk, num_prompts)
    partial.add(done, **scores)
    progress.step(f"{n} samples each scored" if not resumed else
                  f"{done}/{num_prompts} with the {resumed} resumed", units=done - start)
  scores, shape = partial.arrays(), (num_prompts, n)
  if aggregation != "mean":  # members standardized on all the reference samples first
    scores["proxy"] = rl_rewards.standardized_aggregate(scores["proxy"], aggregation, lam)
  out = {name: array.reshape(shape) for name, array in scores.items()}
  if harm is not None:
    out["harm_threshold"] = np.float64(threshold)
  return out


def proxy_name(spec: Any) -> str:
  """The proxy's name in reports, with its ensemble aggregation as train_rl names it:
  ``wco(rm_ens)``, ``uwo[λ=0.5](rm_ens)`` (mean, WCO and UWO curves otherwise shared a label)."""
  _, aggregation, lam = rl_rewards.split_aggregation(spec)
  return rl_rewards.aggregated_name(aggregation, lam, rl_rewards.reward_name(spec))


def curves(samples: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
  """Reference-normalised best-of-n curves with bootstrap SEs (JSON-ready)."""
  # Each prompt's own reference mean over its N samples, subtracted in float64 (so n = 1 is
  # 0 for every prompt, and the prompt bootstrap's SEs measure the gains, not how prompts'
  # levels differ). ``reference_mean`` reports their mean.
  means = {name: float(np.mean(np.asarray(samples[name], np.float64)))
           for name in ("proxy", "gold")}
  proxy, gold = (np.asarray(samples[name], np.float64) for name in ("proxy", "gold"))
  proxy = proxy - proxy.mean(axis=1, keepdims=True)
  gold = gold - gold.mean(axis=1, keepdims=True)
  n_max = proxy.shape[1]
  ns = overopt.log_spaced_ns(n_max, int(config.bon.num_points))
  num_bootstrap, seed = int(config.bon.num_bootstrap), int(config.seed)
  curve = overopt.unbiased_best_of_n(proxy, gold, ns, num_bootstrap=num_bootstrap, seed=seed)
  return {
      "n": curve.knob.tolist(), "kl": curve.kl.tolist(),
      "sqrt_kl": np.sqrt(curve.kl).tolist(),
      "proxy": curve.proxy.tolist(), "proxy_se": curve.proxy_se.tolist(),
      "gold": curve.gold.tolist(), "gold_se": curve.gold_se.tolist(),
      "kl_note": "analytic log n - (n-1)/n, an upper bound on the true KL"
                 + (", against the sampler (temperature/top-k/top-p), not the policy"
                    if sampler_differs(config) else ""),
      "reference_mean": means,
      "num_prompts": int(proxy.shape[0]), "num_samples": int(n_max),
      "sampling": summary_lib.config_to_dict(config.sampling),
      "proxy_name": proxy_name(config.proxy),
      "gold_name": rl_rewards.reward_name(config.gold),
      "mean_response_length": float(samples["lengths"].mean()),
      "gold_decline": bon_report.gold_decline(curve, num_bootstrap, seed),
  }


def _prompts_with_one_score(proxy: np.ndarray) -> int:
  """Prompts whose N samples all got one proxy score ([P, N] or [P, N, K]), warned of when
  they are most: best-of-n has nothing to choose from there, while the analytic KL_bon
  still grows with n (a near-greedy sampler: temperature or top_p near 0)."""
  flat = np.reshape(proxy, (proxy.shape[0], proxy.shape[1], -1))
  count = int(np.sum(np.all(flat == flat[:, :1], axis=(1, 2))))
  if count > proxy.shape[0] / 2:
    logging.warning("best_of_n: %d of %d prompts got one proxy score for all %d samples: "
                    "best-of-n has nothing to choose there, and the curves show a KL it "
                    "does not spend (a near-greedy sampler?)", count, proxy.shape[0],
                    proxy.shape[1])
  return count


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Samples (or reuses ``samples.npz``), writes curves, report and figure; returns the curves."""
  experiment.require_one_process("best_of_n")
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SAMPLES_FILE)
  checkpoints = scorer_checkpoints(config)
  fingerprint = samples_fingerprint(config, checkpoints)
  samples = None
  if os.path.exists(path):
    samples = files.read_npz(path)
    if str(samples.pop("config_sha256", "")) == fingerprint:
      logging.info("best_of_n: reusing %s", path)
    else:
      logging.warning("best_of_n: %s was drawn under another config: sampling again", path)
      samples = None
  if samples is None:
    samples = sample_and_score(config, workdir, fingerprint)
    files.write_atomically(path, lambda f: np.savez(f, config_sha256=fingerprint, **samples))
    if os.path.exists(partial := os.path.join(workdir, PARTIAL_FILE)):
      os.remove(partial)  # its scores are in samples.npz now
  result = curves(samples, config)
  result["prompts_with_one_proxy_score"] = _prompts_with_one_score(samples["proxy"])
  result["scorer_checkpoints"] = checkpoints
  if "harm" in samples:
    result["safety_filter"] = filtered.filter_report(
        samples["proxy"], samples["gold"], samples["harm"], float(samples["harm_threshold"]),
        result["n"], {k: samples[k] for k in ("world_harm",) if k in samples})
  # Only a run whose prompts come from a dataset scanned one (a data_report.json left in
  # the workdir by another binary's run describes other data).
  data = (experiment.read_data_report(workdir)
          if config.prompts.get("source") == "dataset" else None)
  if data is not None:
    result["data"] = data
  summary_lib.write_json(os.path.join(workdir, "report.json"), result)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(bon_report.report_markdown(result))
  bon_report.plot(result, os.path.join(workdir, "figures", "bon.png"))
  # Last, so that a failed rerun leaves the previous config beside the previous report.
  summary_lib.replace_config(workdir, config)
  logging.info("best_of_n: %d prompts x %d samples; report in %s",
               *np.shape(samples["proxy"])[:2], workdir)
  return result


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run, check=functools.partial(check_config, warn=False)))
