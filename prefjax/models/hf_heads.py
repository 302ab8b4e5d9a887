"""Heads saved in Hugging Face directories: what a directory records and loading it.

A decoder ``*ForSequenceClassification`` (an HF reward model or classifier) scores with
``score.weight [num_labels, D]`` at the last token that is not its pad id; an encoder's
(BERT, RoBERTa, DistilBERT) with its ``classifier`` layer on its pooled first token
(``hf_mappings.CLASSIFIER_OUTPUTS``, "pooler" pooling); a prefjax export
(``hf_export``) also records its head's spec and pooling, the token it scores and its
training pipeline in ``config.json``, and a head with no HF form in ``HEAD_FILE``.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.models import encoder as encoder_lib
from prefjax.models import heads
from prefjax.models import hf_mappings
from prefjax.models.hf_files import (CheckpointError, PathLike, SafetensorsReader,
                                     open_safetensors, read_json)

_log = logging.getLogger(__name__)

# config.json key written by ``hf_export``: "last_real" when the reward model scores the
# last real token even where it is the pad id (HF's rule skips it; see ``load_score_head``).
SCORE_TOKEN_KEY = "prefjax_score_token"
# A head written by ``hf_export``: its spec and pooling in config.json; a head with no
# Hugging Face form (an encoder's mean/CLS pooling, a value head) in its own file.
HEAD_KEY = "prefjax_head"
POOLING_KEY = "prefjax_pooling"
HEAD_FILE = "prefjax_head.safetensors"
# config.json key written by ``hf_export``: the training pipeline's text fields
# (``prefjax.data.pipeline.TEXT_FIELDS``), which ``eval_rm``'s ``hf:`` scorer reads pairs with.
PIPELINE_KEY = "prefjax_pipeline"


def saved_head(path: PathLike) -> tuple[str | None, str | None]:
  """``(head spec, pooling)`` the model in directory ``path`` was saved with: prefjax's
  record (``HEAD_KEY``), else ``"reward"`` (one label) or ``"multi:<labels>"`` for a
  ``*ForSequenceClassification`` checkpoint (pooling "last" for a decoder's, "pooler" for
  an encoder's); ``(None, None)`` for anything else."""
  config_file = pathlib.Path(path) / "config.json"
  return _saved_head(read_json(config_file)) if config_file.is_file() else (None, None)


def saved_pipeline(path: PathLike) -> dict[str, Any] | None:
  """The training pipeline's text fields a prefjax export of directory ``path`` records
  (``PIPELINE_KEY``); None for any other directory or an export from before 2026-12-06."""
  config_file = pathlib.Path(path) / "config.json"
  if not config_file.is_file():
    return None
  saved = read_json(config_file).get(PIPELINE_KEY)
  return dict(saved) if isinstance(saved, dict) else None


def _saved_head(hf: dict[str, Any]) -> tuple[str | None, str | None]:
  """``saved_head`` of a parsed ``config.json``."""
  if hf.get(HEAD_KEY):
    return str(hf[HEAD_KEY]), hf.get(POOLING_KEY)
  labels = classifier_labels(hf)
  if labels is None:
    return None, None
  pooling = "pooler" if hf.get("model_type") in encoder_lib.MODEL_TYPES else "last"
  return ("reward" if len(labels) == 1 else "multi:" + ",".join(labels)), pooling


def _is_classifier(hf: dict[str, Any]) -> bool:
  return any(str(a).endswith("ForSequenceClassification")
             for a in hf.get("architectures") or [])


def classifier_output(hf: dict[str, Any]) -> str:
  """The output layer whose rows are a ``*ForSequenceClassification``'s label logits (parsed
  ``config.json``): an encoder classifier's ``classifier`` (RoBERTa's
  ``classifier.out_proj``), else ``score``, as decoders name it."""
  model_type = hf.get("model_type")
  if model_type in encoder_lib.MODEL_TYPES and _is_classifier(hf):
    return hf_mappings.CLASSIFIER_OUTPUTS[model_type]
  return "score"


def classifier_labels(hf: dict[str, Any]) -> list[str] | None:
  """The labels, in the output layer's row order, of a ``*ForSequenceClassification``
  (parsed ``config.json``) that is not a prefjax export; None for anything else."""
  if hf.get(HEAD_KEY) or not _is_classifier(hf):
    return None
  id2label = hf.get("id2label") or {str(i): f"LABEL_{i}"  # transformers' default
                                     for i in range(int(hf.get("num_labels", 2)))}
  return [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))]


def load_prefjax_head(model: nnx.Module, path: PathLike,
                      saved: tuple[str | None, str | None] = (None, None)) -> None:
  """Copies ``HEAD_FILE`` (``kernel``, ``bias``) into ``model``'s reward or value head.

  ``saved``: the head spec and pooling the directory records (``saved_head``); a model
  whose head or pooling differs is refused, even where the shapes would fit (a value
  head loaded as a reward head, two members read as two objectives).
  """
  linear = heads.output_layer(model)
  file = pathlib.Path(path) / HEAD_FILE
  if linear is None:
    raise CheckpointError(f"{file}: {type(model).__name__} has no head to load it into")
  wanted = (heads.head_spec(model), getattr(model, "pooling", None))
  if saved[0] is not None and (heads.parse_head(saved[0]), saved[1]) != (
      heads.parse_head(wanted[0]), wanted[1]):
    raise CheckpointError(f"{file} holds a {saved[0]!r} head with pooling {saved[1]!r}; the "
                          f"requested model has {wanted[0]!r} with pooling {wanted[1]!r}")
  with open_safetensors(file) as fh:
    tensors = {name: fh.get_tensor(name) for name in fh.keys()}
  for name in ("kernel", "bias"):
    target = getattr(linear, name)
    array = tensors.get(name)
    if array is None or array.shape != tuple(target.shape):
      raise CheckpointError(f"{file}: tensor {name!r} has shape "
                            f"{None if array is None else array.shape} but the requested "
                            f"{type(model).__name__} head needs {tuple(target.shape)}")
    target[...] = jnp.asarray(array, target.dtype)
  _log.info("%s: loaded the %s head", file, type(model).__name__)


def load_score_head(model, reader: SafetensorsReader, *, output: str = "score",
                    skips_pad: bool = True, saved: str | None = None,
                    label: str | None = None, labels: list[str] | None = None,
                    independent: bool = False) -> None:
  """Copies a HF ``*ForSequenceClassification``'s output layer (``output``:
  ``classifier_output``) into a reward head.

  HF decoder reward models (``LlamaForSequenceClassification``,
  ``GPT2ForSequenceClassification``) score the last token whose id is not the
  config's ``pad_token_id`` with ``score.weight [num_labels, D]`` (no bias): a
  "last"-pooled ``RewardModel`` (num_labels 1) or ``MultiHeadEnsemble`` /
  multi-objective head (num_labels K) that skips that id (``last_skips_id``; this
  matters when pad = EOS, as the pipeline ends every response with EOS).
  ``skips_pad=False`` (a prefjax export whose model read the last real token, see
  ``SCORE_TOKEN_KEY``) reads the last real token instead, as the model was trained.
  A ``score.bias`` (prefjax exports write one when the head's bias is not zero;
  transformers ignores it) is loaded too. ``saved``: the head the directory records
  (``saved_head``); another kind is refused even where the shapes fit (a 3-label
  classifier's class logits read as 3 ensemble members).

  An encoder classifier (BERT, RoBERTa, DistilBERT) applies its ``classifier`` layer, with
  a bias, to its pooled first token: a "pooler"-pooled head.

  ``label`` (one of ``labels``, the classifier's ``classifier_labels``): the classifier
  read as a one-output reward model, the label's log-odds (``label_log_odds``;
  ``independent``: its labels are sigmoids, ``problem_type`` multi-label).
  """
  name = f"'{output}.weight'"
  weight = reader.get(f"{output}.weight")
  bias = (reader.get(f"{output}.bias") if f"{output}.bias" in reader.files
          else np.zeros(weight.shape[0]))
  if label is not None:
    weight, bias = label_log_odds(weight, bias, label, labels, where=reader.directory,
                                  independent=independent)
    saved = "reward"
  kernel = model.head.kernel
  if labels and len(labels) > 1 and label is None and heads.head_spec(model) == "reward":
    raise CheckpointError(f"{reader.directory}: {name} scores the labels {labels}; a "
                          "one-output reward reads one label's log-odds: set score_label "
                          "(model.score_label, eval_rm's hf_score_label) to one of them")
  if weight.T.shape != tuple(kernel.shape):
    raise CheckpointError(
        f"{reader.directory}: tensor {name} has shape {weight.shape} but the "
        f"requested head needs {tuple(kernel.shape[::-1])} ([num_labels, hidden])")
  wanted = heads.head_spec(model)
  if saved is not None and heads.parse_head(saved)[0] != heads.parse_head(wanted)[0]:
    raise CheckpointError(f"{reader.directory}: {name} is a {saved!r} head; the "
                          f"requested model has {wanted!r}, which would read it as another "
                          "kind of output")
  if (saved is not None and wanted.startswith("multi:")
      and heads.parse_head(saved) != heads.parse_head(wanted)):
    raise CheckpointError(f"{reader.directory}: {name}'s rows are the outputs {saved!r}, in "
                          f"that order; the requested head {wanted!r} would read them under "
                          "other names: name them as the directory does")
  encoder = isinstance(model.trunk, encoder_lib.Encoder)
  pooling = "pooler" if encoder else "last"
  if model.pooling != pooling:
    raise CheckpointError(f"{reader.directory}: {name} reads the "
                          f"{'pooled first' if encoder else 'last'} token (pooling="
                          f"{pooling!r}); pooling={model.pooling!r} would not reproduce it")
  kernel[...] = jnp.asarray(weight.T, kernel.dtype)
  model.head.bias[...] = jnp.asarray(bias, model.head.bias.dtype)
  if not encoder:
    model.last_skips_id = model.trunk.config.pad_id if skips_pad else None
  _log.info("%s: loaded reward head from %s %s", reader.directory, name, weight.shape)


def label_log_odds(weight: np.ndarray, bias: np.ndarray, label: str,
                   labels: list[str] | None, *, where: PathLike,
                   independent: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """A classifier's output layer as the one-output layer of one label's log-odds.

  With class logits ``z = W h + b`` over labels ``(a, b)`` of a softmax classifier, the
  log-odds of ``a`` is ``log p(a) − log p(b) = z_a − z_b = (W_a − W_b) h + (b_a − b_b)``:
  still linear in ``h``, so a ``RewardModel`` computes it exactly (a sentiment or
  harmlessness classifier as the reward of best-of-n or RL, as TRL's sentiment examples
  use one). With ``independent`` labels (sigmoids, transformers' ``problem_type``
  ``multi_label_classification``) the log-odds of ``a`` is ``z_a`` itself, for any number of
  labels. Returns ``(weight [1, D], bias [1])``. A softmax over more than two labels has a
  log-odds that is not linear, and a prefjax export's columns are objectives, not classes:
  both are refused.
  """
  if labels is None:
    raise CheckpointError(f"{where}: score_label={label!r} reads a Hugging Face "
                          "*ForSequenceClassification's label log-odds; this directory is not "
                          "one (a prefjax export's columns are objectives or members, not "
                          "classes)")
  if label not in labels:
    raise CheckpointError(f"{where}: score_label={label!r} is not one of the classifier's "
                          f"labels {labels} (config.json's id2label)")
  index = labels.index(label)
  if len(labels) == 1:
    raise CheckpointError(f"{where}: score_label={label!r} reads one label's log-odds among "
                          "several; this classifier has one output, already one reward (a "
                          "regression or reward model): use head='reward' without "
                          "score_label")
  if independent:
    return weight[index:index + 1].astype(np.float64), bias[index:index + 1].astype(np.float64)
  if len(labels) != 2 or weight.shape[0] != 2:
    raise CheckpointError(f"{where}: score_label={label!r} reads a softmax classifier's "
                          f"log-odds, one linear head only with two labels; this one has "
                          f"{len(labels)} {labels}: score each label's logit instead "
                          "(head='multi:" + ",".join(labels) + "'; in eval_rm, without "
                          "hf_score_label); best-of-n and RL optimise one reward, which such "
                          "a classifier does not give")
  sign = np.asarray([1.0, -1.0] if index == 0 else [-1.0, 1.0], np.float64)
  return (sign @ weight.astype(np.float64))[None], np.asarray([sign @ bias.astype(np.float64)])
