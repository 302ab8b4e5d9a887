"""``eval_rm``'s ``hf:PATH`` scorer: a reward model saved as a Hugging Face directory.

What it scores must be a reward model as trained: a prefjax export (``hf_export``; its
``config.json`` records the head, its pooling and the training pipeline's text fields,
which the scorer reads pairs with) or a ``*ForSequenceClassification`` (a decoder's, or a
BERT, RoBERTa or DistilBERT classifier's). A
directory without a reward head, or whose head does not load, is refused: its scores
would come from a randomly initialised head. A deep ensemble's export (``member_<k>/``)
scores as the ensemble: its mean, WCO, UWO and each member, as ``rm:`` of its run does.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from prefjax import experiment
from prefjax.data import pipeline as pipeline_lib
from prefjax.evals import scorers
from prefjax.evals.scorers import EvalInputError, ScorerSpec
from prefjax.models import heads as heads_lib
from prefjax.models import hf_import


def hf_scorer(spec: ScorerSpec, eval_cfg: Any, mesh) -> scorers.ModelScorer:
  path = experiment.resolve_path(spec.path)
  if not os.path.exists(path):
    raise EvalInputError(f"scorer {spec.name!r}: {path} does not exist")
  members = _ensemble_members(spec, path)
  head, pooling = _hf_head(spec, members[0])  # the members': _ensemble_members checked
  label = score_labels(eval_cfg.get("hf_score_label"), [spec], check=False).get(spec.name)
  if label is not None:  # a classifier label's log-odds, one column (from_pretrained)
    head = "reward"
  try:
    tokenizer = experiment.make_tokenizer({"path": eval_cfg.hf_tokenizer or members[0]})
  except FileNotFoundError as e:  # a byte-level model's export carries none
    if eval_cfg.hf_tokenizer:
      raise
    raise EvalInputError(f"scorer {spec.name!r}: {e}; name its tokenizer with "
                         "--config.hf_tokenizer=PATH (byte for a byte-level model such as "
                         "the tiny world's)") from e
  kind, arg = heads_lib.parse_head(head)
  if kind == "multi" and len(members) > 1:  # one column per member is what an ensemble reads
    raise EvalInputError(
        f"scorer {spec.name!r}: the members of {path} are classifiers with the labels "
        f"{list(arg)}; an ensemble scores one reward per member, so name the label to score "
        f"(its log-odds): config.hf_score_label={spec.name}={arg[-1]}")
  models = []
  for member in members:
    model_cfg = {"path": member, "head": head, "pooling": eval_cfg.hf_pooling or pooling,
                 "dtype": "float32", "score_head": "require", "score_label": label}
    try:
      model = scorers.build_model(model_cfg, tokenizer.vocab_size, 0, mesh)
    except (hf_import.CheckpointError, FileNotFoundError) as e:
      raise EvalInputError(f"scorer {spec.name!r}: {str(e).splitlines()[0]}") from e
    models.append(model)
  pcfg = hf_pipeline(eval_cfg, tokenizer, members[0], spec.name,
                     experiment.position_limit(models[0]))
  _check_export_special_ids(spec, members[0], tokenizer, pcfg)
  try:
    experiment.check_max_length(models[0], pcfg.max_length, "config.pipeline.max_length")
  except ValueError as e:
    raise EvalInputError(f"scorer {spec.name!r}: {e}") from e
  forwards = [scorers.reward_forward(model) for model in models]
  vocab = scorers.model_vocab(models[0])
  columns = scorers.reward_columns(spec.name, arg if kind == "multi" else (),
                                   float(eval_cfg.uwo_lambda),
                                   str(eval_cfg.get("ensemble_normalization", "standardize")))
  return scorers.ModelScorer(spec.name, tokenizer, pcfg, _side_by_side(forwards), vocab, mesh,
                             float(eval_cfg.max_unk_fraction), columns)


def score_labels(value: str | None, specs: list[ScorerSpec], *, check: bool = True
                 ) -> dict[str, str]:
  """``config.hf_score_label`` as ``{hf: scorer name: label}``: ``LABEL`` for every ``hf:``
  scorer, or ``NAME=LABEL,...`` for some; with ``check`` (``specs`` all the run's scorers),
  a name that is no ``hf:`` scorer is refused."""
  value = str(value or "").strip()
  hf_names = [s.name for s in specs if s.kind == "hf"]
  if not value:
    return {}
  if "=" not in value:
    return dict.fromkeys(hf_names, value)
  labels = {}
  for part in value.split(","):
    name, _, label = (x.strip() for x in part.partition("="))
    if check and name not in hf_names or not label:
      raise EvalInputError(f"config.hf_score_label={value!r}: {part.strip()!r} must be "
                           f"NAME=LABEL with NAME one of the hf: scorers {hf_names}")
    if name in labels:
      raise EvalInputError(f"config.hf_score_label={value!r} names scorer {name!r} twice")
    labels[name] = label
  return labels


def _side_by_side(forwards: list) -> Any:
  """One forward whose reward columns are each member's: ``[B, 1]`` each -> ``[B, K]``."""
  if len(forwards) == 1:
    return forwards[0]

  def forward(batch):
    outputs = [jax.device_get(f(batch)) for f in forwards]
    return tuple(np.concatenate([np.reshape(o[side], (len(o[side]), -1)) for o in outputs],
                                axis=1) for side in (0, 1))

  return forward


def _ensemble_members(spec: ScorerSpec, path: str) -> list[str]:
  """``[path]``, or a deep ensemble export's ``member_<k>`` folders in member order, which
  must share one head, pooling and training pipeline."""
  if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
    return [path]
  names = {os.path.basename(os.path.dirname(f))
           for f in glob.glob(os.path.join(path, "member_*", "config.json"))}
  if not names:
    return [path]
  expected = [f"member_{k}" for k in range(len(names))]
  if names != set(expected):
    raise EvalInputError(f"scorer {spec.name!r}: {path} holds {sorted(names)}, not "
                         f"member_0 ... member_{len(names) - 1}")
  members = [os.path.join(path, name) for name in expected]
  records = {json.dumps([_hf_head(spec, m), hf_import.saved_pipeline(m)], sort_keys=True)
             for m in members}
  if len(records) > 1:
    raise EvalInputError(f"scorer {spec.name!r}: the members of {path} differ in head, "
                         "pooling or training pipeline; score each as its own hf: scorer")
  logging.info("scorer %r: %s holds a deep ensemble of %d members", spec.name, path,
               len(members))
  return members


def _check_export_special_ids(spec: ScorerSpec, path: str, tokenizer: Any,
                              pcfg: pipeline_lib.PipelineConfig) -> None:
  """A prefjax export scores the EOS (and reads the BOS) of the tokenizer it was trained
  with, whose ids its ``config.json`` records; another tokenizer's are refused."""
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    return
  with open(config_file, encoding="utf-8") as f:
    recorded = json.load(f)
  if not isinstance(recorded.get(hf_import.PIPELINE_KEY), dict):  # not a prefjax export
    return
  wanted = [("eos", "eos_token_id")] + ([("bos", "bos_token_id")] if pcfg.add_bos else [])
  for name, key in wanted:
    ours = getattr(tokenizer, f"{name}_id", None)
    if key in recorded and ours != recorded[key]:
      raise EvalInputError(f"scorer {spec.name!r}: the tokenizer's {name.upper()} id is {ours}, "
                           f"but {path} was trained with {recorded[key]} ({key} in its "
                           "config.json): use the tokenizer it was trained with "
                           "(config.hf_tokenizer)")


def _hf_head(spec: ScorerSpec, path: str) -> tuple[str, str | None]:
  """The reward head (spec, pooling) directory ``path`` was saved with; anything else
  would be scored by a randomly initialised head, so it is refused."""
  head, pooling = hf_import.saved_head(path) if os.path.isdir(path) else (None, None)
  if head is None:
    raise EvalInputError(f"scorer {spec.name!r}: {path} holds no reward head (a base model, a "
                         "policy or a GGUF file), so its scores would come from a randomly "
                         "initialised head; score a reward model's directory (a prefjax "
                         "export of train_rm, or a *ForSequenceClassification)")
  if heads_lib.parse_head(head)[0] not in scorers.REWARD_HEADS:
    raise EvalInputError(f"scorer {spec.name!r}: {path} holds a {head!r} head, not a reward "
                         "model")
  return head, pooling


def hf_pipeline(eval_cfg: Any, tokenizer: Any, path: str | None = None,
                scorer: str = "hf", max_positions: int | None = None
                ) -> pipeline_lib.PipelineConfig:
  """The pipeline of an ``hf:`` scorer: the text fields a prefjax export of ``path``
  records from its training pipeline, then ``eval_cfg.pipeline``. ``add_bos``, where
  neither sets it, is what the directory's own tokenizer does (GPT-2's adds none); where
  neither sets ``max_length``, a model of fewer ``max_positions`` is cut to those. Batches
  are padded: packing saves nothing where no gradient is taken."""
  trained = hf_import.saved_pipeline(path) if path else None
  overrides = dict(eval_cfg.get("pipeline") or {})
  if overrides.get("mode", "padded") != "padded":
    logging.warning("scorer %r: config.pipeline.mode=%r is not used: eval_rm scores padded "
                    "batches", scorer, overrides["mode"])
  overrides["mode"] = "padded"
  chosen_by_user = {"prompt_style", "max_length"} & set(overrides)
  fields = {**(trained or {}), **overrides}
  max_length = pipeline_lib.PipelineConfig.max_length
  if "max_length" not in fields and max_positions is not None and max_positions < max_length:
    fields["max_length"] = max_length = max_positions
  if trained is None and path is not None and not chosen_by_user:
    logging.warning("scorer %r: %s records no training pipeline (not a prefjax export, or one "
                    "from before 2026-12-06), so pairs are read raw-style and cut to "
                    "max_length=%d; set config.pipeline as the model was trained", scorer, path,
                    max_length)
  if "add_bos" not in fields and hasattr(tokenizer, "adds_bos"):
    fields["add_bos"] = tokenizer.adds_bos()
  pcfg = pipeline_lib.PipelineConfig.from_mapping(
      {"batch_size": int(eval_cfg.batch_size or 32), "shuffle": False, "num_epochs": 1,
       **fields})
  if trained:
    scorers.warn_on_changed_text(scorer, trained, pcfg, "its export's training pipeline")
  return pcfg
