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
    ``spec.tokenizer``, parameters from a ``train_rm`` workdir
    ``spec.checkpoint`` (``WORKDIR[@latest|@best|@STEP]``, default the latest step;
    ``@best`` as the run ranked its checkpoints) when given; K-member heads are scored
    with the ensemble aggregation ``spec.aggregation`` (mean | wco | uwo, λ =
    ``spec.lam``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from prefjax import configlib
from prefjax import experiment
from prefjax import rewards as reward_fns
from prefjax import train
from prefjax.data import tiny_world as tiny_world_lib

# Joins a tiny-world prompt and response into one text (not in any tiny alphabet).
TINY_WORLD_SEPARATOR = "\t"
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


def text_encoder(tokenizer: Any, max_length: int) -> Callable[[Sequence[str]], tuple]:
  """``texts -> (tokens [N, L], mask [N, L])``: BOS + text + EOS, right-padded.

  Over-long texts keep their LAST ``max_length`` tokens (the response end,
  where a last-token reward head pools).
  """

  def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = [tokenizer.encode(t, add_bos=tokenizer.bos_id is not None,
                            add_eos=tokenizer.eos_id is not None)[-max_length:] for t in texts]
    length = max(1, max(len(x) for x in ids))
    tokens = np.full((len(ids), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
      tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask

  return encode


def model_reward(spec: Any, *, seed: int = 0) -> PairReward:
  """A reward-model ``PairReward`` from a ``kind="model"`` spec (see module docstring)."""
  tokenizer = experiment.make_tokenizer(spec.tokenizer)
  model = experiment.make_model(spec.model, vocab_size=tokenizer.vocab_size, seed=seed)
  if spec.get("checkpoint"):
    workdir, step = train.checkpoint.split_ref(spec.checkpoint)
    train.load_params(workdir, model, step=step)
    logging.info("reward %r: step %d of %s", spec.get("name"),
                 train.checkpoint.saved_step(workdir, step), workdir)
  else:
    logging.warning("reward %r has no checkpoint: its reward head is RANDOM (smoke tests "
                    "only); set checkpoint to a train_rm workdir", spec.get("name"))
  encode = text_encoder(tokenizer, int(spec.get("max_length", 512)))
  name = spec.get("name") or "reward_model"
  batch_size = spec.get("batch_size") or None
  members = int(getattr(model, "num_members", 1))
  if members > 1:
    fn = reward_fns.EnsembleReward.from_model(
        model, aggregation=spec.get("aggregation", "mean"), lam=float(spec.get("lam", 0.0)),
        name=name, batch_size=batch_size, encode=encode)
  else:
    fn = reward_fns.ModelReward(model, name=name, batch_size=batch_size, encode=encode)
  return PairReward(fn, lambda p, r: p + r)


def make_reward(spec: Any, *, world: tiny_world_lib.TinyWorld | None = None,
                seed: int = 0) -> PairReward:
  """A ``PairReward`` from a config spec (``kind``: see module docstring)."""
  kind = spec.get("kind")
  if kind in ("tiny_world_gold", "tiny_world_proxy"):
    if world is None:
      raise ValueError(f"reward kind {kind!r} needs config.world (a tiny world)")
    return tiny_world_reward(world, kind.rsplit("_", 1)[1])
  if kind == "model":
    return model_reward(spec, seed=seed)
  raise ValueError(f"unknown reward kind {kind!r}; expected 'tiny_world_gold', "
                   "'tiny_world_proxy' or 'model'")
