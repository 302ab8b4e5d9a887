"""Using a safety classifier: its data, scoring texts, a best-of-n filter, a label source
and a harmlessness objective beside helpfulness.

* ``load_split``: ``config.data`` of ``train_safety``; ``name="tiny_world_harm"``
  writes (harmless, harmful) tiny-world pairs once (``TinyWorld.harm_pairs``).
  ``load_harm_pairs`` reads it as ``HarmPairs``: the rejected side always the harmful
  one, whatever the row's outcome.
* ``SafetyClassifier``: a trained ``train_safety`` workdir (``from_workdir``)
  scoring (prompt, response) texts with the training tokenization and threshold.
* ``make_harm_scorer``: ``config.safety`` of ``best_of_n`` (a classifier workdir or
  the tiny world's programmatic harm) -> ``(scorer, threshold)``.
* ``label_pairs``: preference rows where the less harmful response wins, in the
  ``load_preferences`` format (``jsonl:PATH`` after ``write_jsonl``), labelled
  ``meta.objective="harmless"`` so that ``train_rm`` with head
  ``multi:helpful,harmless`` trains its harmless head on them.
* ``MultiObjectiveReward``: named per-objective scores (e.g. a helpfulness RM and
  ``harmless_score`` of the classifier), combined by weights for best-of-n or RL.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from prefjax import experiment
from prefjax import files
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import sources
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.data.tfds_builders import synthetic
from prefjax.feedback import safety
from prefjax.train import summary as summary_lib

THRESHOLD_FILE = "threshold.json"
HarmScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def ensure_tiny_world_harm(tw: Mapping[str, Any]) -> str:
  """Writes the tiny-world harm pairs described by ``tw`` once; returns the ``synthetic:`` name."""
  name = "tiny_world_harm-" + experiment.tiny_world_dataset_name(tw).split("-", 1)[1]
  if not synthetic.dataset_exists(name):
    world = tiny_world_lib.TinyWorld(seed=tw.get("world_seed", 0))
    rows = list(world.harm_pairs(tw["num_pairs"], seed=tw.get("seed", 0)))
    synthetic.write_synthetic_dataset(name, rows, label_noise=0.0,
                                      gold_name=f"tiny_world_harm({world.harm_char!r})",
                                      meta=dict(tw))
  return f"synthetic:{name}"


def load_split(data_cfg: Any, split: str) -> sources.PreferenceSource:
  """``experiment.load_split``, plus ``name="tiny_world_harm"``."""
  if data_cfg["name"] != "tiny_world_harm":
    return experiment.load_split(data_cfg, split)
  cfg = dict(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg)
  tw = cfg["tiny_world"]
  cfg["name"] = ensure_tiny_world_harm(tw.to_dict() if hasattr(tw, "to_dict") else tw)
  return experiment.load_split(cfg, split)


class HarmPairs(collections.abc.Sequence):
  """A preference source read as harm pairs: ``rejected`` is always the side its labels
  rejected (``safety.harm_targets`` calls it harmful).

  A row with outcome < ½ has its sides swapped (and outcome 1 − o); a tie (outcome ½)
  names no harmful side and is skipped. ``counts`` holds ``pairs``, ``kept``,
  ``swapped``, ``skipped_ties`` and ``soft`` (kept rows with 0 < o < 1, read as their
  majority side). Other attributes (``name``, ``split``, ``summary``, ...) are the
  source's; ``fingerprint`` changes when any row was swapped or skipped.
  """

  def __init__(self, source: Sequence[dict[str, Any]]):
    self._source = source
    rows = pipeline_lib.read_rows(source, range(len(source)))
    outcomes = np.asarray([row["outcome"] for row in rows], np.float64)
    self._kept = np.flatnonzero(outcomes != 0.5)
    self._swap = outcomes < 0.5
    self.counts = {"pairs": int(outcomes.size), "kept": int(self._kept.size),
                   "swapped": int(self._swap.sum()),
                   "skipped_ties": int((outcomes == 0.5).sum()),
                   "soft": int(((outcomes > 0) & (outcomes < 1) & (outcomes != 0.5)).sum())}
    fingerprint = getattr(source, "fingerprint", "")
    changed = self.counts["swapped"] or self.counts["skipped_ties"]
    self.fingerprint = f"{fingerprint}+harm_pairs" if changed else fingerprint

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._source, name)

  def __len__(self) -> int:
    return int(self._kept.size)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    return self._oriented(int(self._kept[index]), self._source[int(self._kept[index])])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    rows = [int(self._kept[i]) for i in indices]
    return [self._oriented(i, row)
            for i, row in zip(rows, pipeline_lib.read_rows(self._source, rows))]

  def _oriented(self, i: int, row: dict[str, Any]) -> dict[str, Any]:
    if not self._swap[i]:
      return row
    return dict(row, chosen=row["rejected"], rejected=row["chosen"],
                outcome=1.0 - row["outcome"])

  def __repr__(self) -> str:
    return f"HarmPairs({self._source!r}, {self.counts})"


def load_harm_pairs(data_cfg: Any, split: str) -> HarmPairs:
  """``load_split`` as ``HarmPairs``; logs the swapped and skipped rows."""
  pairs = HarmPairs(load_split(data_cfg, split))
  if pairs.counts["swapped"] or pairs.counts["skipped_ties"] or pairs.counts["soft"]:
    logging.warning("safety data %s: %s (outcome < 1/2 swapped, ties skipped, soft outcomes "
                    "read as their majority side)", split, pairs.counts)
  return pairs


class SafetyClassifier:
  """Harm probabilities of (prompt, response) texts; ``flags`` = probability ≥ threshold."""

  def __init__(self, model: Any, tokenizer: Any, pipeline: pipeline_lib.PipelineConfig,
               threshold: float):
    self.model, self.tokenizer, self.threshold = model, tokenizer, float(threshold)
    # As many sequences per batch as a pair batch holds: the same compiled shapes.
    self.pipeline = dataclasses.replace(pipeline, shuffle=False, num_epochs=1,
                                        drop_remainder=False, mode="padded",
                                        batch_size=2 * pipeline.batch_size)

  @classmethod
  def from_workdir(cls, workdir: str, *, threshold: float | None = None) -> "SafetyClassifier":
    """The latest checkpoint of a ``train_safety`` workdir and its ``threshold.json``."""
    path = os.path.join(workdir, THRESHOLD_FILE)
    if threshold is None and not os.path.exists(path):
      what = "is missing" if os.path.isdir(workdir) else "is missing: the folder does not exist"
      raise FileNotFoundError(f"{path} {what}: train_safety writes it when it finishes; "
                              "train or finish the classifier there (safety.workdir), or pass "
                              "a threshold (safety.threshold)")
    with open(os.path.join(workdir, summary_lib.CONFIG_FILE)) as f:
      config = ml_collections.ConfigDict(json.load(f))
    # As the latest checkpoint was trained (a rerun may have changed the config since).
    config = ml_collections.ConfigDict(train.checkpoint.saved_run_config(workdir) or config)
    if "safety" not in config:  # a reward model's sigmoid would pass for P(harmful)
      started = summary_lib.started_by(workdir)
      raise ValueError(f"{workdir} is not a train_safety run (its config has no safety "
                       "section" + (f"; {started} ran there" if started else "") + "): a "
                       "harm classifier is a train_safety workdir")
    if threshold is None:
      choice = files.read_json(path)
      threshold = choice["threshold"]
      if not choice.get("reached", True):
        logging.warning("safety classifier %s: its threshold %.4g missed the target it was "
                        "chosen for: %s", workdir, threshold, choice.get("notice", ""))
    tokenizer = experiment.make_tokenizer(config.tokenizer)
    model = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                  seed=int(config.seed))
    train.load_params(workdir, model)
    return cls(model, tokenizer, experiment.pipeline_config(config.data), threshold)

  def probabilities(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """P(harmful) ``[N]`` float64, tokenized and truncated exactly as in training."""
    if len(prompts) != len(responses):
      raise ValueError(f"safety classifier: {len(prompts)} prompts but "
                       f"{len(responses)} responses")
    rows = [{"prompt": p, "chosen": r} for p, r in zip(prompts, responses)]
    iterator = iter(pipeline_lib.sft_dataset(rows, self.tokenizer, self.pipeline))
    out = np.full(len(rows), np.nan)
    for batch in iterator:
      real = batch["example_mask"] > 0
      probs = safety.harm_probability(safety.sequence_logits(self.model, batch))
      out[batch["example_index"][real]] = probs[real]
    missing = np.flatnonzero(np.isnan(out))
    if missing.size:
      raise ValueError(f"safety classifier: response {int(missing[0])} was dropped by the "
                       f"pipeline ({iterator.counters}); raise data.pipeline.max_length")
    return out

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return self.probabilities(prompts, responses)

  def flags(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return self.probabilities(prompts, responses) >= self.threshold


def tiny_world_harm(world: tiny_world_lib.TinyWorld) -> HarmScorer:
  """The tiny world's programmatic harm (frequency of ``harm_char``) as a harm scorer."""
  return lambda prompts, responses: np.array(
      [world.harm_score(p, r) for p, r in zip(prompts, responses)], np.float64)


def make_harm_scorer(spec: Any, *, world: tiny_world_lib.TinyWorld | None = None
                     ) -> tuple[HarmScorer, float]:
  """``config.safety`` -> ``(scorer, threshold)``. ``kind``: ``"classifier"`` (``workdir``,
  threshold from its threshold.json unless ``threshold`` is set) or ``"tiny_world_harm"``."""
  kind, threshold = spec.get("kind"), spec.get("threshold")
  if kind == "classifier":
    classifier = SafetyClassifier.from_workdir(
        spec["workdir"], threshold=None if threshold is None else float(threshold))
    return classifier, classifier.threshold
  if kind == "tiny_world_harm":
    if world is None:
      raise ValueError("safety.kind='tiny_world_harm' needs config.world (a tiny world)")
    if threshold is None:
      raise ValueError("safety.kind='tiny_world_harm' needs safety.threshold")
    return tiny_world_harm(world), float(threshold)
  raise ValueError(f"unknown safety.kind {kind!r}; expected 'classifier' or 'tiny_world_harm'")


def label_pairs(prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], p_a: np.ndarray, p_b: np.ndarray, *,
                min_margin: float = 0.0, objective: str = "harmless",
                source: str = "safety_classifier") -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Preference rows in which the LESS harmful response is ``chosen`` (outcome 1).

  Pairs whose harm probabilities differ by less than ``min_margin`` (and exact ties)
  are skipped and counted. ``meta`` keeps both probabilities, the label source and
  ``objective`` (the multi-objective RM's head this pair trains).
  """
  p_a, p_b = np.asarray(p_a, np.float64), np.asarray(p_b, np.float64)
  n = len(prompts)
  if not (len(responses_a) == len(responses_b) == p_a.size == p_b.size == n):
    raise ValueError(f"label_pairs: {n} prompts, {len(responses_a)}/{len(responses_b)} "
                     f"responses and {p_a.size}/{p_b.size} probabilities must all match")
  if not (finite := np.isfinite(p_a) & np.isfinite(p_b)).all():
    raise ValueError(f"label_pairs: {int((~finite).sum())} of {n} pairs have a non-finite "
                     f"harm probability (first: pair {int(np.argmin(finite))})")
  rows, skipped = [], 0
  for i in range(n):
    margin = abs(p_a[i] - p_b[i])
    if margin == 0.0 or margin < min_margin:
      skipped += 1
      continue
    a_wins = p_a[i] < p_b[i]
    chosen, rejected = (responses_a[i], responses_b[i]) if a_wins else (responses_b[i],
                                                                        responses_a[i])
    rows.append({"id": f"safety-{i}", "prompt": prompts[i], "chosen": chosen,
                 "rejected": rejected, "outcome": 1.0, "weight": 1.0,
                 "meta": {"source": source, "objective": objective,
                          "p_harm_chosen": float(min(p_a[i], p_b[i])),
                          "p_harm_rejected": float(max(p_a[i], p_b[i]))}})
  return rows, {"pairs": n, "labelled": len(rows), "skipped_small_margin": skipped}


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  """Writes preference rows as JSON lines; load them with ``load_preferences('jsonl:PATH')``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row, allow_nan=False) + "\n")
  return path


def harmless_score(scorer: HarmScorer) -> HarmScorer:
  """log(1 − P(harmful)): the harmlessness objective on a log scale (0 = surely harmless)."""
  return lambda prompts, responses: np.log1p(-np.clip(scorer(prompts, responses), 0.0,
                                                      1.0 - 1e-12))


class MultiObjectiveReward:
  """Named objectives ``fn(prompts, responses) -> [N]`` combined as Σ_o w_o·score_o.

  E.g. ``{"helpful": a reward model's PairReward, "harmless":
  harmless_score(classifier)}``: the safety classifier as the second objective beside
  helpfulness, where the multi-objective RM's own ``harmless`` head is missing or weak.
  """

  def __init__(self, objectives: Mapping[str, HarmScorer], weights: Mapping[str, float]):
    if set(objectives) != set(weights):
      raise ValueError(f"objectives {sorted(objectives)} and weights {sorted(weights)} "
                       "must name the same objectives")
    self.objectives, self.weights = dict(objectives), dict(weights)
    self.name = "+".join(f"{self.weights[k]:g}*{k}" for k in self.objectives)

  def columns(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: np.asarray(fn(prompts, responses), np.float64)
            for k, fn in self.objectives.items()}

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    cols = self.columns(prompts, responses)
    return sum(self.weights[k] * v for k, v in cols.items())
