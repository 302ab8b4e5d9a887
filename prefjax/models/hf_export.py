"""Save prefjax models as Hugging Face directories that ``transformers`` loads.

``save_pretrained(model, path, tokenizer=None)`` writes ``model.safetensors`` and
``config.json``:

  Decoder                        ``LlamaForCausalLM`` / ``GPT2LMHeadModel``; a decoder
                                 whose untied LM head was dropped (a reward model's
                                 trunk) is written as the base ``LlamaModel``
  Encoder                        ``BertModel``
  RewardModel, MultiHeadEnsemble, ``LlamaForSequenceClassification`` /
  MultiObjectiveRewardModel       ``GPT2ForSequenceClassification`` with ``num_labels``
  on a decoder, "last" pooling   outputs (objective names as ``id2label``): the form
                                 TRL's ``RewardTrainer`` and reward benchmarks load
  DeepEnsemble                   one such directory per member, ``member_<k>/``
  other head models              the trunk only, with a warning (a value head, or an
                                 encoder's mean/CLS pooling, has no HF equivalent)

Sequence classifiers in ``transformers`` score the last token that is not
``pad_token_id``. A prefjax reward model reads the last real token, the EOS
every response ends with; when the pad id is also the EOS id, transformers
would read the token before it instead. The export then logs that, and marks
``config.json`` (``hf_import.SCORE_TOKEN_KEY``) so that prefjax's
``from_pretrained`` still scores as the model was trained. A head bias (zero under
the Bradley–Terry loss alone, not with reward centering) is written as
``score.bias``, which prefjax loads and transformers ignores: its scores are then
shifted by a constant per output, which no pairwise comparison sees.

``tokenizer``: the prefjax tokenizer the model was trained with. Its special ids
go into ``config.json`` (else the model config's); a Hugging Face tokenizer's files
are written too, so the directory is complete.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from prefjax.models import heads
from prefjax.models import hf_import
from prefjax.models import hf_mappings
from prefjax.models.decoder import Decoder
from prefjax.models.encoder import Encoder

PathLike = str | os.PathLike
_log = logging.getLogger(__name__)

SCORE_HEADS = (heads.RewardModel, heads.MultiHeadEnsemble, heads.MultiObjectiveRewardModel)


def hf_state_dict(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors, config_dict)`` of a ``Decoder`` or ``Encoder`` in Hugging Face layout."""
  params = {p: np.asarray(jax.device_get(v.get_value()))
            for p, v in hf_import.param_paths(model).items()}
  if isinstance(model, Encoder):
    hf_config = model.config.to_hf_dict()
    mapping = hf_mappings.bert_mapping(model.config.num_layers)
  else:
    hf_config = hf_import.decoder_config_to_hf(model.config)
    mapping = hf_import.decoder_mapping(model.config, hf_config["model_type"], set())
    if not model.config.tie_embeddings and not hasattr(model, "lm_head"):
      hf_config["architectures"] = ["LlamaModel"]
  tensors: dict[str, np.ndarray] = {}
  qkv_parts: dict[str, dict[int, np.ndarray]] = {}
  for path, array in params.items():
    if path not in mapping:
      raise hf_import.CheckpointError(f"parameter {path!r} has no Hugging Face equivalent")
    hf_name, layout = mapping[path]
    if layout.startswith("qkv:"):
      qkv_parts.setdefault(hf_name, {})[int(layout[4:])] = array
    else:
      tensors[hf_name] = np.ascontiguousarray(hf_mappings.to_hf(array, layout))
  for hf_name, parts in qkv_parts.items():
    tensors[hf_name] = np.concatenate([parts[j] for j in range(3)], axis=-1)
  return tensors, hf_config


def save_pretrained(model: nnx.Module, path: PathLike, *, tokenizer: Any = None
                    ) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face directory (see the module docstring); returns it."""
  directory = pathlib.Path(path)
  if isinstance(model, heads.DeepEnsemble):
    for k in range(model.num_members):
      save_pretrained(model.member(k), directory / f"member_{k}", tokenizer=tokenizer)
    _log.info("%s: wrote the %d members of the deep ensemble as member_<k>/",
              directory, model.num_members)
    return directory
  if _is_score_model(model):
    tensors, hf_config = _sequence_classifier(model, tokenizer)
  else:
    trunk = getattr(model, "trunk", model)
    if trunk is not model:
      _log.warning("save_pretrained: writing only the trunk of %s; its head has no Hugging "
                   "Face equivalent (use prefjax.train checkpoints for the whole model)",
                   _describe(model))
    tensors, hf_config = hf_state_dict(trunk)
    hf_config.update(_special_ids(tokenizer))
  directory.mkdir(parents=True, exist_ok=True)
  hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  hf_tokenizer = getattr(tokenizer, "hf", None)
  if hf_tokenizer is not None:
    hf_tokenizer.save_pretrained(str(directory))
  return directory


def _is_score_model(model: nnx.Module) -> bool:
  return (isinstance(model, SCORE_HEADS) and isinstance(model.trunk, Decoder)
          and model.pooling == "last")


def _describe(model: nnx.Module) -> str:
  pooling = getattr(model, "pooling", None)
  trunk = type(getattr(model, "trunk", model)).__name__
  return f"{type(model).__name__}({trunk}{'' if pooling is None else f', pooling={pooling!r}'})"


def _special_ids(tokenizer: Any) -> dict[str, int]:
  if tokenizer is None:
    return {}
  ids = {"bos_token_id": getattr(tokenizer, "bos_id", None),
         "eos_token_id": getattr(tokenizer, "eos_id", None),
         "pad_token_id": getattr(tokenizer, "pad_id", None)}
  return {k: int(v) for k, v in ids.items() if v is not None}


def _sequence_classifier(model: heads.PooledHeadModel, tokenizer: Any
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A last-pooled decoder reward model as ``*ForSequenceClassification`` tensors + config."""
  tensors, hf_config = hf_state_dict(model.trunk)
  hf_config.update(_special_ids(tokenizer))
  kind = "GPT2" if hf_config["model_type"] == "gpt2" else "Llama"
  hf_config["architectures"] = [f"{kind}ForSequenceClassification"]
  tensors.pop("lm_head.weight", None)
  labels = _labels(model)
  hf_config["id2label"] = {str(i): name for i, name in enumerate(labels)}
  hf_config["label2id"] = {name: i for i, name in enumerate(labels)}
  hf_config.update(_score_token(model, hf_config))
  weight = np.asarray(jax.device_get(model.head.kernel.get_value()), np.float32)
  bias = np.asarray(jax.device_get(model.head.bias.get_value()), np.float32)
  tensors["score.weight"] = np.ascontiguousarray(weight.T)
  if np.any(bias != 0):
    tensors["score.bias"] = bias
    _log.warning("the reward head's bias %s is not zero: written as 'score.bias', which "
                 "prefjax loads and transformers ignores (its scores are shifted by "
                 "-bias, a constant no pairwise comparison sees)", np.round(bias, 4).tolist())
  return tensors, hf_config


def _labels(model: heads.PooledHeadModel) -> list[str]:
  if isinstance(model, heads.MultiObjectiveRewardModel):
    return list(model.names)
  if isinstance(model, heads.MultiHeadEnsemble):
    return [f"member_{k}" for k in range(model.num_members)]
  return ["reward"]


def _score_token(model: heads.PooledHeadModel, hf_config: dict[str, Any]) -> dict[str, Any]:
  """``pad_token_id`` and the score-token marker that make the export score as ``model`` does."""
  if model.last_skips_id is not None:  # loaded from an HF reward model: HF's own rule
    return {"pad_token_id": int(model.last_skips_id)}
  pad, eos = hf_config.get("pad_token_id"), hf_config.get("eos_token_id")
  if pad is not None and pad == eos:
    _log.warning(
        "the reward model scores the last real token, the EOS (id %d) its responses end "
        "with; transformers' sequence classifiers skip every trailing pad id, also %d, so "
        "they would score the token before it. config.json marks the export (%s) so "
        "that prefjax's from_pretrained scores as trained; train with a tokenizer whose "
        "pad differs from its EOS for an export transformers scores identically",
        eos, pad, hf_import.SCORE_TOKEN_KEY)
  elif pad is None:
    _log.warning("no pad id is known (pass the tokenizer): transformers' sequence "
                 "classifiers then score one sequence per call")
  return {hf_import.SCORE_TOKEN_KEY: "last_real"}
