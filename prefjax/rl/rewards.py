"""Reward plumbing for best-of-n and RL: prompt/response pairs -> scalar scores.

The optimisers in ``prefjax.rl`` and ``experiments/`` hold prompts and sampled
responses as texts (the policy's tokenizer need not be the reward model's).
A ``PairReward`` joins each (prompt, response) into the text its underlying
``prefjax.rewards.RewardFn`` expects and returns the scalar reward
(``RewardFn.score``: the ensemble aggregate for ensembles) as float64 NumPy.

Reward specs (``config.proxy`` / ``config.gold``), by ``kind``:
  * ``tiny_world_gold`` / ``tiny_world_proxy``: ``TinyWorld.gold_reward`` and
    ``TinyWorld.proxy_reward`` (gold + the planted exploitable feature).
  * ``model``: a reward model built with ``prefjax.experiment.make_model`` from
    ``spec.model`` (``head="reward"`` or ``"reward_ensemble:K"``), tokenizer
    ``spec.tokenizer`` (either left out: the one the checkpoint's run trained with,
    ``with_run_config``), parameters from a ``train_rm`` workdir
    ``spec.checkpoint`` (``WORKDIR[@latest|@best|@STEP]``, default the latest step;
    ``@best`` as the run ranked its checkpoints) when given; K-member heads are scored
    by their mean (``spec.aggregation="mean"``: WCO and UWO need the members on one
    scale, which BT training leaves arbitrary; ``best_of_n`` standardizes them on its
    samples, see ``split_aggregation``, and ``train_rl`` on samples of π_ref,
    ``fit_members`` and ``standardized_reward``). Each (prompt, response)
    is encoded and cut as the RM's training pipeline did: BOS + prompt, response + EOS,
    the prompt cut from the left (BOS kept) to ``spec.max_prompt_length`` and the
    response from the right to ``spec.max_length``, both by default the checkpoint's own
    ``data.pipeline`` lengths.

``from_checkpoint(WORKDIR)`` builds that reward from a ``train_rm`` run alone: its model,
tokenizer and cuts read from the config its checkpoint was trained under.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from prefjax import configlib
from prefjax import experiment
from prefjax import rewards as reward_fns
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.data import tokenize as tokenize_lib
from prefjax.data import truncation
from prefjax.evals import scorers
from prefjax.models import heads as heads_lib
from prefjax.models import hf_import

# Joins a tiny-world prompt and response into one text (not in any tiny alphabet).
TINY_WORLD_SEPARATOR = "\t"
# Joins a prompt and response for a reward model's encoder, which cuts them apart.
MODEL_SEPARATOR = "\x1e"  # ASCII record separator
Join = Callable[[str, str], str]


@dataclasses.dataclass
class PairReward:
  """Scores (prompt, response) pairs with a ``RewardFn`` over joined texts."""
  fn: reward_fns.RewardFn
  join: Join

  @property
  def name(self) -> str:
    return self.fn.name

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts but "
                       f"{len(responses)} responses")
    texts = [self.join(p, r) for p, r in zip(prompts, responses)]
    return np.asarray(self.fn.score(texts=texts), np.float64)

  def ensemble(self) -> reward_fns.EnsembleReward:
    """``fn`` when it is an ensemble (an error naming the reward otherwise)."""
    if not isinstance(self.fn, reward_fns.EnsembleReward):
      raise ValueError(f"reward {self.name!r} is not an ensemble: it has no members to "
                       "aggregate (a model.head='reward_ensemble:K' with K >= 2 has)")
    return self.fn

  def members(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """An ensemble reward's raw member rewards ``[N, K]`` (float64)."""
    ensemble = self.ensemble()
    texts = [self.join(p, r) for p, r in zip(prompts, responses)]
    # Its members' RewardFn checks the shape and finiteness (``rewards.check_rewards``).
    return np.asarray(ensemble.raw_members(texts=texts), np.float64)


def split_aggregation(spec: Any) -> tuple[Any, str, float]:
  """``(spec scored by its members' mean, aggregation, λ)``: best-of-n and train_rl
  aggregate a model ensemble's members themselves, after standardizing them on reference
  samples."""
  aggregation = str(spec.get("aggregation") or "mean")
  if spec.get("kind") != "model" or aggregation == "mean":
    return spec, "mean", 0.0
  return ml_collections.ConfigDict(dict(spec, aggregation="mean")), aggregation, float(
      spec.get("lam") or 0.0)


def standardized_aggregate(members: np.ndarray, aggregation: str, lam: float) -> np.ndarray:
  """WCO / UWO of ``members [M, K]`` standardized per member over all M samples: BT training
  pins neither a member's offset nor its scale, and the minimum and variance depend on both
  (Coste et al. 2023's released best-of-n code aggregates raw scores)."""
  standardized = reward_fns.RewardNormalizer.fit(members, standardize=True)(members)
  return np.asarray(reward_fns.aggregate(standardized, aggregation, lam), np.float64)


def standardized_reward(reward: PairReward, aggregation: str, lam: float,
                        normalizer: reward_fns.RewardNormalizer) -> PairReward:
  """``reward``'s ensemble scored as WCO / UWO of its members standardized by
  ``normalizer`` (per-member statistics fitted on reference samples: ``fit_members``)."""
  members = reward.ensemble().members
  fn = reward_fns.EnsembleReward(members[0] if len(members) == 1 else members,
                                 aggregation=aggregation, lam=lam, normalizer=normalizer,
                                 name=aggregated_name(aggregation, lam, reward.name))
  return PairReward(fn, reward.join)


def aggregated_name(aggregation: str, lam: float, name: str) -> str:
  """An ensemble reward's name in reports: ``name`` (mean), ``wco(name)``, ``uwo[λ=0.5](name)``."""
  if aggregation == "mean":
    return name
  return f"uwo[λ={lam:g}]({name})" if aggregation == "uwo" else f"{aggregation}({name})"


def fit_members(reward: PairReward, prompts: Sequence[str], responses: Sequence[str]
                ) -> reward_fns.RewardNormalizer:
  """Per-member mean and standard deviation of ``reward``'s ensemble on reference samples."""
  return reward_fns.RewardNormalizer.fit(reward.members(prompts, responses), standardize=True)


def checked_scores(reward: PairReward, prompts: Sequence[str], responses: Sequence[str],
                   where: str) -> np.ndarray:
  """``reward``'s float64 scores; a non-finite one is an error naming the sample (in RL it
  made the step's loss NaN, and the loop skipped the step as a bad gradient)."""
  scores = reward(prompts, responses)
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"reward {reward.name!r} gave {bad.size} of {scores.size} responses a "
                     f"non-finite score at {where} (first: {scores[i]} for prompt "
                     f"{prompts[i][:80]!r}, response {responses[i][:80]!r})")
  return scores


def world_from_config(cfg: Any) -> tiny_world_lib.TinyWorld:
  """A ``TinyWorld`` from a mapping of its dataclass fields (tuples may come as lists)."""
  return configlib.dataclass_from_mapping(tiny_world_lib.TinyWorld, cfg or {},
                                         prompt_length=tuple, response_length=tuple)


def _split_tiny(text: str) -> tuple[str, str]:
  prompt, sep, response = text.partition(TINY_WORLD_SEPARATOR)
  if not sep:
    raise ValueError(f"tiny-world reward text {text!r} lacks the prompt/response separator")
  return prompt, response


def tiny_world_reward(world: tiny_world_lib.TinyWorld, which: str) -> PairReward:
  """``which`` = ``"gold"`` or ``"proxy"`` as a ``PairReward`` over (prompt, response)."""
  if which not in ("gold", "proxy"):
    raise ValueError(f"tiny world reward must be 'gold' or 'proxy', got {which!r}")
  score = world.gold_reward if which == "gold" else world.proxy_reward

  def fn(texts: Sequence[str]) -> np.ndarray:
    return np.array([score(*_split_tiny(t)) for t in texts], np.float32)

  fn.__name__ = f"tiny_world_{which}"
  reward = reward_fns.ProgrammaticReward(fn, inputs="texts", name=f"tiny_world_{which}")
  return PairReward(reward, lambda p, r: f"{p}{TINY_WORLD_SEPARATOR}{r}")


def text_encoder(tokenizer: Any, pipeline: pipeline_lib.PipelineConfig
                 ) -> Callable[[Sequence[str]], tuple]:
  """``texts -> (tokens [N, L], mask [N, L])``, right-padded; each text is
  ``prompt + MODEL_SEPARATOR + response``, encoded and cut as ``pipeline`` cuts a pair's
  side in training (``prefjax.data.truncation.truncate``)."""
  # The id a cut keeps first, as the pipeline passes it whatever add_bos says: a chat
  # template may open with it (SmolLM2's <|im_start|> is its BOS).
  bos_id = tokenizer.bos_id
  warned = []

  def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, cut, short = [], 0, 0
    for text in texts:
      prompt, sep, response = text.partition(MODEL_SEPARATOR)
      if not sep:
        raise ValueError(f"reward model input {text[:60]!r} has no prompt/response separator")
      p = tokenize_lib.encode_prompt(prompt, tokenizer, style=pipeline.prompt_style,
                                     add_bos=pipeline.add_bos)
      r = tokenize_lib.encode_response(response, tokenizer, style=pipeline.prompt_style)
      whole = len(p) + len(r)
      p, (r,), _, _, reason = truncation.truncate(p, [r], pipeline, bos_id)
      if reason == "over_long":  # training drops such a pair; a score is still owed
        r, short = r[:pipeline.max_length - len(p)], short + 1
      cut += len(p) + len(r) < whole
      ids.append(p + r)
    if cut and not warned:  # once per reward: best-of-n and RL score batch after batch
      warned.append(True)
      logging.warning("reward model: %d of %d texts cut to fit (max_length %d, prompt limit "
                      "%d, as the model trained); their cut parts do not count%s", cut,
                      len(ids), pipeline.max_length, pipeline.prompt_limit,
                      f"; {short} kept under min_response_length "
                      f"{pipeline.min_response_length} tokens of response, where training "
                      "drops the pair" if short else "")
    length = max(1, max(len(x) for x in ids))
    tokens = np.full((len(ids), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
      tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask

  return encode


def _scoring_pipeline(spec: Any, workdir: str | None, step: int | None,
                      max_positions: int | None = None) -> pipeline_lib.PipelineConfig:
  """The pipeline the RM trained with (checkpoint ``step``'s ``data.pipeline``), with the
  spec's ``max_length`` / ``max_prompt_length`` where it sets them; where neither does,
  512 tokens or the model's ``max_positions`` if fewer."""
  trained = {}
  if workdir:
    saved = train.checkpoint.saved_run_config(workdir, step) or {}
    trained = dict((saved.get("data") or {}).get("pipeline") or {})
  fields = {k: trained[k] for k in pipeline_lib.TEXT_FIELDS if trained.get(k) is not None}
  for key in ("max_length", "max_prompt_length"):
    if spec.get(key):
      fields[key] = int(spec[key])
  fields.setdefault("max_length", min(512, max_positions or 512))
  if fields.get("max_prompt_length", 0) >= fields["max_length"]:
    fields.pop("max_prompt_length")
  return pipeline_lib.PipelineConfig(**fields)


def model_reward(spec: Any, *, seed: int = 0) -> PairReward:
  """A reward-model ``PairReward`` from a ``kind="model"`` spec (see module docstring)."""
  head = (spec.get("model") or {}).get("head")
  if heads_lib.parse_head(head)[0] == "multi":
    raise ValueError(f"reward {spec.get('name')!r}: model.head={head!r} gives one reward per "
                     "objective, and best-of-n and RL optimise one: train a one-head reward "
                     "model on that objective's pairs and use it")
  tokenizer = experiment.make_tokenizer(spec.tokenizer)
  model_cfg, saved = dict(spec.model), None
  if not spec.get("checkpoint") and model_cfg.get("path"):
    # A Hugging Face reward model scores with its own head, or not at all.
    saved = hf_import.saved_head(experiment.resolve_path(model_cfg["path"]))[0]
    if saved is not None:
      model_cfg["score_head"] = "require"
  model = experiment.make_model(model_cfg, vocab_size=tokenizer.vocab_size, seed=seed)
  workdir = step = None
  if spec.get("checkpoint"):
    workdir, step = train.checkpoint.split_ref(spec.checkpoint)
    train.load_params(workdir, model, step=step)
    step = train.checkpoint.saved_step(workdir, step)
    logging.info("reward %r: step %d of %s", spec.get("name"), step, workdir)
  elif saved is not None:
    label = model_cfg.get("score_label")
    logging.info("reward %r: the %s saved in %s", spec.get("name"),
                 f"log-odds of label {label!r} of the {saved!r} head" if label
                 else f"{saved!r} head", model_cfg["path"])
  else:
    logging.warning("reward %r has no checkpoint: its reward head is RANDOM (smoke tests "
                    "only); set checkpoint to a train_rm workdir", spec.get("name"))
  pipeline = _scoring_pipeline(spec, workdir, step, experiment.position_limit(model))
  experiment.check_max_length(model, pipeline.max_length,
                              f"the {spec.get('name')!r} reward's max_length")
  logging.info("reward %r: texts cut %s: max_length %d, prompt limit %d", spec.get("name"),
               "as in training" if workdir else "to", pipeline.max_length,
               pipeline.prompt_limit)
  encode = text_encoder(tokenizer, pipeline)
  name = spec.get("name") or "reward_model"
  batch_size = spec.get("batch_size") or None
  members = int(getattr(model, "num_members", 1))
  aggregation = spec.get("aggregation", "mean")
  if members > 1 and aggregation != "mean":
    raise ValueError(
        f"reward {name!r}: aggregation={aggregation!r} of a {members}-member ensemble: WCO "
        "and UWO compare members whose offsets and scales BT training leaves arbitrary, so "
        "they need per-member standardization on reference samples: build the spec's mean "
        "(split_aggregation), then standardized_reward(fit_members(...)), as best_of_n and "
        "train_rl do")
  if members > 1:
    fn = reward_fns.EnsembleReward.from_model(model, aggregation="mean", name=name,
                                              batch_size=batch_size, encode=encode)
  else:
    fn = reward_fns.ModelReward(model, name=name, batch_size=batch_size, encode=encode)
  return PairReward(fn, lambda p, r: p + MODEL_SEPARATOR + r)


def from_checkpoint(ref: str, *, name: str | None = None, batch_size: int = 64,
                    seed: int = 0) -> PairReward:
  """The reward model a ``train_rm`` run trained, scoring (prompt, response) texts.

  ``ref`` is ``WORKDIR[@latest|@best|@STEP]`` (default the latest step). The model,
  tokenizer and cuts are the ones that checkpoint was trained under (a rerun may have
  changed the run's config), so nothing about the model is repeated::

    rm = rewards.from_checkpoint("/tmp/rm_tiny@best")
    rm(["Human: Hi\\n\\nAssistant:"], [" Hello!"])   # float64 [1]

  Texts are scored ``batch_size`` at a time (None: all in one forward, whose activations
  grow with their number). An ensemble scores its members' mean (``members`` gives
  each); a run that trained no reward head (``train_dpo``, ``train_sft``) is refused.
  Same scores as ``eval_rm``'s ``rm:`` scorer on the same pairs. ``seed`` only
  initialises the model that the checkpoint's parameters then replace.
  """
  return model_reward(with_run_config(ml_collections.ConfigDict(dict(
      kind="model", name=name, checkpoint=os.fspath(ref), batch_size=batch_size))), seed=seed)


def reward_name(spec: Any) -> str:
  """A reward spec's name in reports: its own, else its checkpoint's workdir, else its kind."""
  if spec.get("name"):
    return str(spec.name)
  if spec.get("kind") == "model" and spec.get("checkpoint"):
    return os.path.basename(os.path.normpath(train.checkpoint.split_ref(spec.checkpoint)[0]))
  return str(spec.get("kind"))


def with_run_config(spec: Any) -> Any:
  """A ``kind="model"`` spec whose missing ``tokenizer`` / ``model`` are those its
  ``checkpoint`` (``WORKDIR[@...]``, a ``train_rm`` run) was trained under; the checkpoint
  is pinned to that step. A spec holding both is returned as it is."""
  if spec.get("tokenizer") and spec.get("model"):
    return spec
  if not spec.get("checkpoint"):
    raise ValueError(f"reward {spec.get('name')!r}: kind='model' needs checkpoint (a train_rm "
                     "workdir, whose run gives the tokenizer and model) or both tokenizer "
                     "and model")
  workdir, step = train.checkpoint.split_ref(spec.checkpoint)
  what = f"reward {reward_name(spec)!r} (checkpoint={spec.checkpoint!r})"
  if not os.path.isdir(workdir):
    raise ValueError(f"{what}: {workdir} does not exist: train the reward model there first "
                     "(experiments.train_rm), or point checkpoint at a train_rm workdir")
  head = (scorers.read_run_config(workdir, what).get("model") or {}).get("head")
  if heads_lib.parse_head(head or None)[0] not in scorers.REWARD_HEADS:  # train_rl saves ''
    raise ValueError(f"{what}: {workdir} trained no reward head (model.head={head!r}: a "
                     "policy's run, train_sft, train_dpo or train_rl); best-of-n and RL score "
                     "with a train_rm run, or a Hugging Face reward model or classifier in "
                     "model.path")
  scorer = scorers.ScorerSpec(name=reward_name(spec), kind="rm", path=workdir,
                              step="latest" if step is None else str(step))
  run, step, _ = scorers.trained_run(scorer)
  return ml_collections.ConfigDict(dict(
      spec.to_dict() if hasattr(spec, "to_dict") else spec, name=scorer.name,
      tokenizer=spec.get("tokenizer") or run.tokenizer.to_dict(),
      model=spec.get("model") or run.model.to_dict(), checkpoint=f"{workdir}@{step}"))


def make_reward(spec: Any, *, world: tiny_world_lib.TinyWorld | None = None,
                seed: int = 0) -> PairReward:
  """A ``PairReward`` from a config spec (``kind``: see module docstring)."""
  kind = spec.get("kind")
  if kind in ("tiny_world_gold", "tiny_world_proxy"):
    if world is None:
      raise ValueError(f"reward kind {kind!r} needs config.world (a tiny world)")
    if spec.get("checkpoint"):
      raise ValueError(f"reward kind {kind!r} is programmatic: checkpoint="
                       f"{spec.checkpoint!r} is read with kind='model' only")
    return tiny_world_reward(world, kind.rsplit("_", 1)[1])
  if kind == "model":
    return model_reward(with_run_config(spec), seed=seed)
  raise ValueError(f"unknown reward kind {kind!r}; expected 'tiny_world_gold', "
                   "'tiny_world_proxy' or 'model'")
