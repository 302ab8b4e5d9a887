"""The text world of the overoptimization study: evaluating trained policies on it.

The text world is the tiny text world (``prefjax.data.tiny_world``) with a gold
reward that saturates: ``repeat_penalty`` makes responses that repeat one
character past ``repeat_threshold`` of their length worse, although every
character's own score is unchanged. A byte-level decoder SFT'd on the world is
the reference policy π_ref; proxies are decoder reward models trained by
``train_rm`` on gold-labelled pairs of π_ref samples; policies are optimised
against them (best-of-n, RLOO/PPO) or on the pairs directly (DPO / IPO / SLiC).
``experiments/text_study.py`` runs those binaries; this module holds what
turns their outputs into curves:

* :func:`evaluate_policy` samples the SAME evaluation prompts from a policy with a
  fixed key (common random numbers across checkpoints and methods) and returns
  per-prompt gold, proxy scores and the exact sequence KL to the reference,
  Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) along each sample (full vocabulary: bytes);
* :class:`GoldScale` standardises gold (and proxies) under π_ref: mean 0 and
  standard deviation 1 over reference samples, as in the bandit world;
* :func:`checkpoint_trajectory` evaluates every checkpoint of a run, giving the
  ``[T, P]`` arrays the RL and DPO criteria bootstrap over prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from prefjax import configlib
from prefjax import files
from prefjax import train
from prefjax.data import tokenize as tokenize_lib
from prefjax.data.tfds_builders import synthetic
from prefjax.losses import registry
from prefjax.rl import algorithms
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.train import checkpoint as checkpoint_lib
from prefjax.train import summary as summary_lib

DONE_FILE = "done.json"
STARTED_FILE = "started.json"  # the key of a stage that started; done.json's once finished
TRAJECTORY_FILE = "trajectory.npz"
# experiments/preemption.py's PREEMPTED_EXIT_CODE (a test checks they agree): this library
# does not import the binaries' package.
PREEMPTED_EXIT_CODE = 75


def digest(*parts: Any) -> str:
  """A short content hash (names of datasets written by the study)."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StaleStageError(ValueError):
  """A stage's folder holds outputs of a different configuration."""


class StagePreempted(SystemExit):
  """A stage's binary stopped on SIGTERM or Ctrl-C after saving. The stage is not
  finished (no ``done.json``): the study exits with the binaries' preemption code, and a
  rerun with the same workdir resumes the stage."""

  def __init__(self, path: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.path = path


def run_stage(path: str, fn: Callable[[], dict[str, Any] | None], *,
              key: Mapping[str, Any] | None = None,
              upstream: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Runs ``fn`` unless ``path/done.json`` exists; returns what it recorded (+ ``wall_s``).

  ``key`` is what the stage's outputs depend on (its config, with paths made relative
  to the study's workdir). ``upstream`` names the finished stages (name -> folder)
  whose outputs it reads: their run ids (:func:`stage_run`, new each time a stage
  runs) join the key, so a stage run again upstream makes this one stale too. The key
  is recorded in ``done.json`` but not returned; a finished stage whose key differs
  raises :class:`StaleStageError` naming the fields that changed, since its
  checkpoints would otherwise be resumed or reused under the new config or inputs.
  """
  if upstream:
    key = {**(key or {}), "upstream": {name: stage_run(p) for name, p in upstream.items()}}
  if key is not None:  # as done.json holds it, to compare with what a finished stage saved
    key = json.loads(files.dumps(key, sort_keys=True, default=str))
  info = _finished(path)
  if info is not None:
    _check_stage_key(path, info.pop("key", None), key)
    info.pop("run", None)
    return files.from_standard_json(info)
  started = _read(os.path.join(path, STARTED_FILE))
  if started is not None:  # its checkpoints would be resumed under the new config
    _check_stage_key(path, started.get("key"), key, what="an unfinished stage started")
  os.makedirs(path, exist_ok=True)
  summary_lib.write_json(os.path.join(path, STARTED_FILE), {"key": key})
  start = time.time()
  info = dict(fn() or {})
  info["wall_s"] = time.time() - start
  record = {**info, "run": uuid.uuid4().hex}
  summary_lib.write_json(os.path.join(path, DONE_FILE),
                         record if key is None else {**record, "key": key})
  return info


def _finished(path: str) -> dict[str, Any] | None:
  """What a finished stage in ``path`` recorded in its ``done.json`` (None: unfinished)."""
  return _read(os.path.join(path, DONE_FILE))


def _read(file: str) -> dict[str, Any] | None:
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f)


def recorded_key(path: str) -> Any:
  """The config key a finished stage in ``path`` recorded (None: unfinished or unkeyed)."""
  return (_finished(path) or {}).get("key")


def stage_run(path: str) -> str | None:
  """The id of the run that finished the stage in ``path``: new each time it runs (None:
  unfinished, or finished before stages recorded one)."""
  return (_finished(path) or {}).get("run")


def stage_identity(path: str) -> str:
  """The run id of the stage finished in ``path``; for a stage finished before stages
  recorded one, a digest of its config key."""
  return stage_run(path) or digest(recorded_key(path))


def evaluation_key(eval_cfg: Any, max_new_tokens: int, *, proxies: Mapping[str, str],
                   reference: str) -> dict[str, Any]:
  """What checkpoint evaluations (:func:`cached_trajectory`) depend on besides the
  policy: the settings, and the runs of the proxies' stages (reward name -> folder) and
  of the reference stage, so a policy is scored again after either was retrained
  (caches keyed before the reference joined the key are evaluated again once)."""
  runs = {name: stage_identity(path) for name, path in proxies.items()}
  return dict(eval=configlib.plain(eval_cfg), rewards=sorted(["gold", *runs]),
              max_new_tokens=max_new_tokens, proxies=runs, reference=stage_identity(reference))


# Settings that only redraw a best-of-n stage's curve from its samples: a change of them
# reuses the stage (a study's report draws its own curves; the HH world recorded them).
CURVE_ONLY_FIELDS = frozenset({"config.bon.num_points", "config.bon.num_bootstrap"})


def _check_stage_key(path: str, recorded: Any, wanted: Any,
                     what: str = "a finished stage made") -> None:
  if wanted is None or recorded == wanted:
    return
  if recorded is None:
    logging.warning("%s finished before stages recorded their config; reusing it unchecked",
                    path)
    return
  if "upstream" not in recorded and isinstance(wanted, dict) and "upstream" in wanted:
    if recorded == {k: v for k, v in wanted.items() if k != "upstream"}:
      logging.warning("%s finished before stages recorded the stages they read; reusing it "
                      "without checking those", path)
      return
  old, new = dict(configlib.flat_items(recorded)), dict(configlib.flat_items(wanted))
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k) != new.get(k) and k not in CURVE_ONLY_FIELDS)
  if not changed:
    return
  shown = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                    for k in changed[:6])
  more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
  raise StaleStageError(
      f"{path} holds {what} with a different config ({shown}{more}); "
      "delete that folder and the stages after it, or use a new workdir")


def config_key(config: Any, workdir: str) -> Any:
  """``config`` as plain JSON (``summary.config_to_dict``), paths inside the study's
  ``workdir`` written relative to ``$WORKDIR`` (so a moved workdir still matches)."""
  roots = {os.path.normpath(workdir), os.path.abspath(workdir)}

  def relative(x: Any) -> Any:
    if isinstance(x, dict):
      return {k: relative(v) for k, v in x.items()}
    if isinstance(x, list):
      return [relative(v) for v in x]
    for root in roots if isinstance(x, str) else ():
      if x == root or x.startswith(root + os.sep):
        return "$WORKDIR" + x[len(root):]
    return x
  return relative(summary_lib.config_to_dict(config))


def pairs_dataset(name: str, rows: Callable[[], Sequence[Mapping[str, Any]]],
                  meta: Mapping[str, Any], *, gold_name: str = "text_world") -> str:
  """``synthetic:NAME``, the ``rows()`` labelled by ``gold_name`` (no label noise) written
  as that synthetic dataset unless it exists: name it by what determines the rows."""
  if not synthetic.dataset_exists(name):
    synthetic.write_synthetic_dataset(name, list(rows()), label_noise=0.0,
                                      gold_name=gold_name, meta=dict(meta))
  return f"synthetic:{name}"


def gold_pairs_dataset(policy: nnx.Module, prompts: rollout_lib.Prompts,
                       gold: rl_rewards.PairReward, tokenizer: Any, *, name: str,
                       meta: Mapping[str, Any], seed: int, max_new_tokens: int,
                       gold_name: str = "text_world", **sample_kw: Any) -> dict[str, Any]:
  """A study's pairs stage: :func:`sample_gold_pairs` written as the ``synthetic:``
  dataset ``{name}-{digest of the rows}`` (``meta`` and the skipped counts beside it).
  Returns ``{"dataset", "num_pairs", "skipped"}``."""
  rows, skipped = sample_gold_pairs(policy, prompts, gold, tokenizer, seed=seed,
                                    max_new_tokens=max_new_tokens, **sample_kw)
  dataset = pairs_dataset(f"{name}-{digest(rows)}", lambda: rows,
                          dict(meta, skipped=skipped), gold_name=gold_name)
  logging.info("%s: %d pairs, skipped %s", name, len(rows), skipped)
  return {"dataset": dataset, "num_pairs": len(rows), "skipped": skipped}


def proxy_model(width: int, num_layers: int) -> dict[str, Any]:
  """A byte-level decoder reward model of hidden width ``width`` (the study's proxy sizes)."""
  heads = max(1, min(4, width // 4))
  return dict(arch="decoder", preset="tiny_llama", path="", head="reward", ensemble="heads",
              pooling="last", dtype="float32",
              overrides=dict(hidden_size=width, num_layers=num_layers, num_heads=heads,
                             num_kv_heads=heads, intermediate_size=2 * width,
                             max_position_embeddings=64))


def proxy_reward_spec(width: int, num_layers: int, workdir: str) -> dict[str, Any]:
  """The reward spec (``rl.rewards.make_reward``) of proxy ``width``, trained by the
  study into ``workdir/proxies/w{width}``."""
  return dict(kind="model", name=f"proxy_w{width}", model=proxy_model(width, num_layers),
              tokenizer={"path": "byte"}, max_length=32, batch_size=512,
              checkpoint=os.path.join(workdir, "proxies", f"w{width}"))


def world_prompts(world: Any, tokenizer: Any, count: int,
                  rng: np.random.Generator) -> rollout_lib.Prompts:
  """``count`` prompts of a tiny world, encoded as ``train_sft``'s pipeline and
  ``train_rl`` encode them (BOS + raw prompt, at most 10 tokens)."""
  texts = [world.sample_prompt(rng) for _ in range(count)]
  ids = [tokenize_lib.encode_prompt(t, tokenizer, style="raw") for t in texts]
  return rollout_lib.encode_prompts(texts, ids, pad_id=tokenizer.pad_id, max_length=10)


def sample_gold_pairs(policy: nnx.Module, prompts: rollout_lib.Prompts,
                      gold: rl_rewards.PairReward, tokenizer: Any, *, seed: int,
                      max_new_tokens: int, chunk: int = 1024
                      ) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Two policy samples per prompt, labelled by ``gold`` (deterministically).

  Returns preference rows and the counts of dropped pairs: an empty (or all-whitespace)
  response, two identical responses, or equal gold.
  """
  rows, skipped = [], {"empty": 0, "identical": 0, "gold_tie": 0}
  num_prompts = len(prompts.texts)
  for start in range(0, num_prompts, chunk):
    part = rollout_lib.Prompts(prompts.texts[start:start + chunk],
                               prompts.tokens[start:start + chunk],
                               prompts.mask[start:start + chunk]).repeat(2)
    out = rollout_lib.sample(policy, part, jax.random.key(seed * 7919 + start),
                             tokenizer=tokenizer, max_new_tokens=max_new_tokens)
    scores = gold(out.prompts, out.responses)
    for i in range(0, len(out.responses), 2):
      a, b, ga, gb = out.responses[i], out.responses[i + 1], scores[i], scores[i + 1]
      if not a.strip() or not b.strip():  # as the preference-row check counts empty
        skipped["empty"] += 1
      elif a == b:
        skipped["identical"] += 1
      elif ga == gb:
        skipped["gold_tie"] += 1
      else:
        (c, gc), (r, gr) = sorted([(a, ga), (b, gb)], key=lambda x: -x[1])
        rows.append({"prompt": out.prompts[i], "chosen": c, "rejected": r,
                     "meta": {"gold_chosen": gc, "gold_rejected": gr}})
    logging.info("text world pairs: %d/%d prompts sampled", min(start + chunk, num_prompts),
                 num_prompts)
  return rows, skipped


class GoldScale(NamedTuple):
  """Affine standardisation of one reward under π_ref: (raw − mean) / sd."""
  mean: float
  sd: float

  @classmethod
  def fit(cls, reference_scores: np.ndarray) -> "GoldScale":
    scores = np.asarray(reference_scores, np.float64).ravel()
    sd = float(scores.std())
    if not np.isfinite(sd) or sd <= 0:
      raise ValueError(f"reference scores have standard deviation {sd}: cannot standardise")
    return cls(float(scores.mean()), sd)

  def __call__(self, raw: np.ndarray) -> np.ndarray:
    return (np.asarray(raw, np.float64) - self.mean) / self.sd


def reference_scales(samples: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, GoldScale]:
  """Gold's and each proxy's standardisation under π_ref, from best-of-n's π_ref samples
  (width -> ``{"gold", "proxy"}`` scores): gold from the first width's, ``proxy_w{W}``
  from width W's."""
  scales = {"gold": GoldScale.fit(next(iter(samples.values()))["gold"])}
  scales.update({f"proxy_w{w}": GoldScale.fit(s["proxy"]) for w, s in samples.items()})
  return scales


# One model's float32 logits per forward of the exact KL: SmolLM2's 49,152-token
# vocabulary over 256 rows of 176 tokens would be 8.9 GB per model at once.
KL_LOGITS_BYTES = 1 << 30


def exact_sequence_kl(policy: nnx.Module, reference: nnx.Module, rollout: rollout_lib.Rollout,
                      *, logits_bytes: int = KL_LOGITS_BYTES) -> np.ndarray:
  """Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) over each row's response, ``[B]`` float64.

  The rows go through the two models in chunks whose ``[rows, T, V]`` float32 logits
  stay within ``logits_bytes`` (at least one row a chunk); the last chunk is filled
  with copies of its last row, so every chunk runs the same compiled program.
  """
  tokens, attention_mask, loss_mask = rollout.tokens, rollout.attention_mask, rollout.loss_mask
  rows, length = tokens.shape
  vocab = int(policy.config.vocab_size)
  chunk = int(np.clip(logits_bytes // (4 * length * vocab), 1, rows))
  graphdef, state = nnx.split(rollout_lib.PolicyBundle(policy, reference, None))
  out = []
  for start in range(0, rows, chunk):
    take = np.minimum(np.arange(start, start + chunk), rows - 1)
    kl = _sequence_kl(graphdef, state, tokens[take], attention_mask[take], loss_mask[take])
    out.append(np.asarray(kl, np.float64)[:min(chunk, rows - start)])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sequence_kl(graphdef, state, tokens, attention_mask, loss_mask) -> jax.Array:
  bundle = nnx.merge(graphdef, state)
  stats = rollout_lib.token_stats(bundle, tokens, attention_mask, loss_mask, full_vocab=True)
  return jnp.sum(stats.exact_kl, axis=-1)


def evaluate_policy(policy: nnx.Module, reference: nnx.Module, prompts: rollout_lib.Prompts,
                    key: jax.Array, *, tokenizer: Any,
                    rewards: Mapping[str, rl_rewards.PairReward], max_new_tokens: int,
                    samples_per_prompt: int,
                    kl_logits_bytes: int = KL_LOGITS_BYTES) -> dict[str, np.ndarray]:
  """Per-prompt means ``[P]`` of every reward in ``rewards`` and of the exact sequence KL.

  ``samples_per_prompt`` responses per prompt are drawn with ``key`` (pass the
  same key to every policy compared), from the policy itself: the KL sums the policy's
  own per-position KL along them, which samples at another temperature would bias. Also
  returns ``response_length``. ``kl_logits_bytes`` bounds one model's float32 logits in
  the KL's forward (:func:`exact_sequence_kl`).
  """
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  rollout = rollout_lib.sample(policy, prompts.repeat(samples_per_prompt), key,
                               tokenizer=tokenizer, max_new_tokens=max_new_tokens)
  kl = exact_sequence_kl(policy, reference, rollout, logits_bytes=kl_logits_bytes)
  per_sample = {"kl": np.maximum(kl, 0.0), "response_length": rollout.lengths}
  for name, reward in rewards.items():
    per_sample[name] = reward(rollout.prompts, rollout.responses)
  shape = (len(prompts.texts), samples_per_prompt)
  return {name: np.asarray(v, np.float64).reshape(shape).mean(axis=1)
          for name, v in per_sample.items()}


class Trajectory(NamedTuple):
  """A run's checkpoints evaluated on the evaluation prompts: ``[T, P]`` per reward."""
  steps: np.ndarray                   # [T], 0 = the reference policy
  per_prompt: dict[str, np.ndarray]   # name -> [T, P]

  def mean(self, name: str) -> np.ndarray:
    return self.per_prompt[name].mean(axis=1)


def checkpoint_steps(workdir: str) -> list[int]:
  """The run's checkpoints on its ``loop.checkpoint_every`` grid, and its last. A run
  stopped by a signal saves the step it reached (say 13 of a grid of 10); once resumed and
  finished, that step would add a point to its curve that an uninterrupted run lacks (and
  a DPO sweep's runs would disagree on their steps)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in {workdir}")
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  every = _checkpoint_every(workdir)
  kept = [s for s in steps if not every or s % every == 0 or s == steps[-1]]
  if len(kept) < len(steps):
    logging.info("%s: checkpoints %s are off the run's grid of %d steps (saved when it was "
                 "stopped): not evaluated", workdir, sorted(set(steps) - set(kept)), every)
  return kept


def _checkpoint_every(workdir: str) -> int:
  """``loop.checkpoint_every`` of the run's ``config.json`` (0 when it records none)."""
  path = os.path.join(workdir, summary_lib.CONFIG_FILE)
  loop = (files.read_json(path).get("loop") or {}) if os.path.isfile(path) else {}
  return int(loop.get("checkpoint_every") or 0)


def checkpoint_trajectory(workdir: str, load: Callable[[int], nnx.Module],
                          reference: nnx.Module, evaluate: Callable[..., dict[str, np.ndarray]],
                          *, include_reference: bool = True) -> Trajectory:
  """Evaluates the reference (step 0) and the policy ``load(step)`` of every checkpoint."""
  steps = [0] * include_reference + checkpoint_steps(workdir)
  rows, run = [], os.path.basename(workdir)
  progress = train.metrics.Progress(f"evaluating {run}", len(steps))
  for step in steps:  # checkpoints start at step 1: step 0 is the reference
    rows.append(evaluate(reference if step == 0 else load(step)))
    gold = rows[-1].get("gold", np.zeros(1)).mean()
    progress.step(f"step {step}{' (the reference)' if step == 0 else ''}: "
                  f"KL {rows[-1]['kl'].mean():.2f}, gold {gold:.3f}")
  names = rows[0].keys()
  return Trajectory(np.asarray(steps), {n: np.stack([r[n] for r in rows]) for n in names})


def cached_trajectory(run_dir: str, make_policy: Callable[[], nnx.Module],
                      reference: nnx.Module, evaluate: Callable[..., dict[str, np.ndarray]],
                      *, key: Any, trainable: Any = None,
                      policy_of: Callable[[nnx.Module], nnx.Module] = lambda model: model
                      ) -> Trajectory:
  """:func:`checkpoint_trajectory` of every checkpoint a ``train_loop`` run saved in
  ``run_dir`` (``policy_of`` the model ``make_policy`` builds, with that step's
  parameters; see :func:`policy_loader`), computed once: cached in
  ``run_dir/trajectory.npz`` with ``key`` (what the evaluation depends on); a cache of
  another key is recomputed."""
  cache = os.path.join(run_dir, TRAJECTORY_FILE)
  # The run's own id joins the key: a run trained again (its stage rerun) is evaluated again.
  key_json = json.dumps({"eval": key, "run": stage_run(run_dir)}, sort_keys=True, default=str)
  if os.path.exists(cache):
    with np.load(cache) as f:
      cached_key = str(f["key"]) if "key" in f.files else None
      if cached_key in (None, key_json):
        return _on_grid(run_dir, Trajectory(
            f["steps"], {k[3:]: f[k] for k in f.files if k.startswith("pp_")}))
    logging.info("%s was evaluated with other settings: evaluating again", cache)
  load = policy_loader(make_policy, run_dir, trainable=trainable)
  traj = checkpoint_trajectory(run_dir, lambda step: policy_of(load(step)), reference, evaluate)
  files.write_atomically(cache, lambda f: np.savez(
      f, steps=traj.steps, key=key_json, **{f"pp_{k}": v for k, v in traj.per_prompt.items()}))
  return traj


def _on_grid(run_dir: str, traj: Trajectory) -> Trajectory:
  """``traj`` without the steps ``checkpoint_steps`` leaves out (a cache evaluated before
  it did may hold a step a stopped run saved off its grid)."""
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return traj
  keep = np.isin(traj.steps, [0, *checkpoint_steps(run_dir)])
  if keep.all():
    return traj
  return Trajectory(traj.steps[keep], {k: v[keep] for k, v in traj.per_prompt.items()})


def policy_loader(make_policy: Callable[[], nnx.Module], workdir: str, *,
                  trainable: Any = None) -> Callable[[int], nnx.Module]:
  """``step -> policy`` with the parameters a ``train_loop`` run saved at that step."""
  def load(step: int) -> nnx.Module:
    model = make_policy()
    kwargs = {} if trainable is None else {"trainable": trainable}
    return train.load_params(workdir, model, step=int(step), **kwargs)
  return load


def rl_bundle_maker(make_policy: Callable[[], nnx.Module], rl_cfg: Any) -> Callable[[], Any]:
  """Makes the bundle a ``train_rl`` checkpoint holds (policy + frozen reference [+ value],
  from ``make_policy()``), to load the policy of each checkpoint."""
  return lambda: rollout_lib.build_bundle(make_policy(), with_value=algorithms.get_algorithm(rl_cfg.algorithm).value_model,
                                          value_trunk=rl_cfg.value_trunk, seed=0)


def standardized(traj: Trajectory, scales: Mapping[str, GoldScale]) -> Trajectory:
  """Rewards in reference-SD units, shifted so the reference policy (step 0) scores 0
  on each prompt's own samples (the common-random-number baseline)."""
  out = dict(traj.per_prompt)
  for name, scale in scales.items():
    if name not in out:
      continue
    values = scale(traj.per_prompt[name])
    out[name] = values - values[:1] if traj.steps[0] == 0 else values
  return Trajectory(traj.steps, out)


def sweep_arrays(trajectories: Sequence[Trajectory], field: str) -> np.ndarray:
  """``[K, T, P]`` from K trajectories evaluated at the same steps."""
  _check_same_steps(trajectories)
  return np.stack([t.per_prompt[field] for t in trajectories])


def _check_same_steps(trajectories: Sequence[Trajectory]) -> None:
  steps = [tuple(t.steps) for t in trajectories]
  if len(set(steps)) != 1:
    raise ValueError(f"trajectories were evaluated at different steps: {steps}")


def pool_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Several world seeds' ``run_text_study`` results as one, as the bandit world pools
  its worlds: every per-prompt array, each in its own π_ref's SD units, is concatenated
  over seeds, so curves average over worlds and bootstraps run over all their prompts.

  Best-of-n samples are standardised per seed (the pooled ``scales`` are then the
  identity); trajectories must already be (``standardized``). Proxy accuracies and
  training times are averaged, pair counts summed (``num_pairs_per_world``: each world's,
  on which its own proxies trained).
  """
  if len(runs) == 1:
    return dict(runs[0])
  first = runs[0]
  unit = GoldScale(0.0, 1.0)
  bon = {w: {"gold": np.concatenate([r["scales"]["gold"](r["bon"][w]["gold"]) for r in runs]),
             "proxy": np.concatenate([r["scales"][f"proxy_w{w}"](r["bon"][w]["proxy"])
                                      for r in runs]),
             "lengths": np.concatenate([r["bon"][w]["lengths"] for r in runs])}
         for w in first["bon"]}

  def trajectories(key: str) -> dict[Any, Trajectory]:
    out = {}
    for name, traj in first.get(key, {}).items():
      parts = [r[key][name] for r in runs]
      _check_same_steps(parts)
      out[name] = Trajectory(traj.steps, {f: np.concatenate([p.per_prompt[f] for p in parts],
                                                            axis=1) for f in traj.per_prompt})
    return out

  stats = [{k: v if k == "width" else float(np.mean([r["proxy_stats"][i][k] for r in runs]))
            for k, v in first_stats.items()} for i, first_stats in enumerate(first["proxy_stats"])]
  pairs = {**first["pairs"], "num_pairs": sum(r["pairs"]["num_pairs"] for r in runs),
           "num_pairs_per_world": [r["pairs"]["num_pairs"] for r in runs],
           "skipped": {k: sum(r["pairs"]["skipped"][k] for r in runs)
                       for k in first["pairs"]["skipped"]}}
  return {**first, "scales": {name: unit for name in first["scales"]}, "bon": bon,
          "rl": trajectories("rl"), "rl_frontier": trajectories("rl_frontier"),
          "dpo": trajectories("dpo"), "proxy_stats": stats,
          "pairs": pairs, "seeds": [r["world"]["seed"] for r in runs]}


def dpo_runs(dpo_cfg: Any) -> list[tuple[str, float]]:
  """``(loss, β)`` of every run in a study's ``dpo`` section: each loss over
  ``loss_betas[loss]`` where given, else over the shared ``betas``."""
  grids = dpo_cfg.get("loss_betas", {})
  return [(str(loss), float(b)) for loss in dpo_cfg.losses
          for b in grids.get(loss, dpo_cfg.betas)]


def stage_loop(loop: Any, *, steps: int, checkpoint_every: int) -> None:
  """A trainer stage's loop: ``steps`` steps with every ``checkpoint_every``-th checkpoint
  kept (the study samples each one) and the binary's own eval only once, at the end."""
  loop.update(num_steps=steps, eval_every=steps, eval_at_start=False,
              checkpoint_every=checkpoint_every, keep_checkpoints=10_000)


def cached_reference(config: Any, workdir: str) -> None:
  """A ``train_dpo`` stage of ``config.loss.name``: reference log-probs cached once for
  every run of the study (none for a reference-free loss: SimPO, ORPO), and no sampled KL
  eval (the study evaluates every checkpoint with the exact KL)."""
  reference_free = registry.direct_loss_spec(config.loss.name).reference_free
  config.ref.mode = "none" if reference_free else "cached"
  config.ref.cache_dir = os.path.join(workdir, "dpo", "ref_cache")
  config.eval.kl_max_new_tokens = 0


def binary_stage(path: str, run: Callable[[Any, str], Any],
                 make_config: Callable[[], Any], *, workdir: str,
                 upstream: Mapping[str, str] | None = None) -> dict[str, Any]:
  """A binary's ``run(make_config(), path)`` in-process, as a ``run_stage`` keyed by that
  config and its ``upstream`` stages (skipped once finished); records its held-out
  accuracy when it reports one (``train_rm``)."""
  config = make_config()
  return run_stage(path, lambda: _run_binary(run, config, path),
                   key=config_key(config, workdir), upstream=upstream)


def _run_binary(run: Callable[[Any, str], Any], config: Any, workdir: str) -> dict[str, Any]:
  logging.info("overoptimization study: %s -> %s", run.__module__, workdir)
  out = run(config, workdir)
  preempted = out.get("preempted") if isinstance(out, dict) else getattr(out, "preempted", False)
  if preempted:
    logging.warning("overoptimization study: %s stopped on a signal after saving; rerun with "
                    "the same --workdir to resume it", workdir)
    raise StagePreempted(workdir)
  metrics = out.get("eval") if isinstance(out, dict) else None
  for name, value in (metrics or {}).items():
    if name.endswith("accuracy"):
      return {"accuracy": float(value)}
  return {}
