"""Save prefjax models as Hugging Face directories that ``transformers`` loads.

``save_pretrained(model, path, tokenizer=None)`` writes ``model.safetensors`` and
``config.json``:

  Decoder                        ``LlamaForCausalLM`` / ``GPT2LMHeadModel``; a decoder
                                 whose untied LM head was dropped (a reward model's
                                 trunk) is written as the base ``LlamaModel``/``GPT2Model``
  Encoder                        ``BertModel`` / ``RobertaModel`` / ``XLMRobertaModel`` /
                                 ``DistilBertModel`` (a classifier's pooler as the base
                                 model's, or DistilBERT's ``pre_classifier``)
  RewardModel, MultiHeadEnsemble, ``LlamaForSequenceClassification`` /
  MultiObjectiveRewardModel       ``GPT2ForSequenceClassification`` with ``num_labels``
  on a decoder, "last" pooling   outputs (objective names as ``id2label``), regression:
                                 the form TRL's ``RewardTrainer`` and reward benchmarks load
  the same on an encoder,        ``BertForSequenceClassification`` (and RoBERTa's, XLM-R's,
  "pooler" pooling               DistilBERT's): pooler and ``classifier``, its bias included
  DeepEnsemble                   one such directory per member, ``member_<k>/``
  other head models              the trunk for transformers, and the head (an encoder's
                                 mean/CLS pooling, a value head: no Hugging Face form) in
                                 ``prefjax_head.safetensors``

``config.json`` records every head model's head spec and pooling (``hf_import.HEAD_KEY``,
``POOLING_KEY``): ``from_pretrained(path, head=...)`` loads the head back, and
``eval_rm``'s ``hf:`` scorer reads which head to build.

``tokenizer``: the prefjax tokenizer the model was trained with. Its special ids go into
``config.json`` (else the model config's), and a Hugging Face tokenizer's files are
written too. A reward model's copy encodes as prefjax's pipeline does (BOS + text + EOS,
``add_bos`` as the pipeline's), so ``tokenizer(texts, padding=True)`` feeds the model
what it was trained on; a policy's (a ``Decoder``) encodes a prompt as BOS + text.

Sequence classifiers in ``transformers`` score the last token that is not
``pad_token_id``. A prefjax reward model reads the last real token, the EOS every
response ends with. Where the tokenizer's pad id is its EOS id (GPT-2's, SmolLM2's), the
exported tokenizer gets a pad token of its own (``PAD_TOKEN``; a zero embedding row is
added where the vocabulary has no spare id), so transformers reads that EOS too. Without
a Hugging Face tokenizer the export is only marked (``hf_import.SCORE_TOKEN_KEY``, with a
warning) so that prefjax's ``from_pretrained`` still scores as trained. A head bias (zero
under the Bradley–Terry loss in exact arithmetic) is written as ``score.bias``, which
prefjax loads and transformers ignores: its scores are then shifted by a constant per
output, which no pairwise comparison sees.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import processors

from prefjax.data import tokenize
from prefjax.models import heads
from prefjax.models import hf_import
from prefjax.models import hf_mappings
from prefjax.models.decoder import Decoder
from prefjax.models.encoder import Encoder

PathLike = str | os.PathLike
_log = logging.getLogger(__name__)

SCORE_HEADS = (heads.RewardModel, heads.MultiHeadEnsemble, heads.MultiObjectiveRewardModel)
# The pad token added to a reward model's tokenizer whose pad id is its EOS id.
PAD_TOKEN = "<|pad|>"
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")
CLASSIFIER_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
    "bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "distilbert": "DistilBertForSequenceClassification"}


def hf_state_dict(model: nnx.Module, *, classifier: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """``(tensors, config_dict)`` of a ``Decoder`` or ``Encoder`` in Hugging Face layout.

  A decoder whose untied LM head was dropped (a reward or value model's trunk) is
  written as the base model (``LlamaModel``, ``GPT2Model``) with tied embeddings; an
  encoder with ``classifier`` as a ``*ForSequenceClassification``'s trunk and pooler.
  """
  params = {p: np.asarray(jax.device_get(v.get_value()))
            for p, v in hf_import.param_paths(model).items()}
  if isinstance(model, Encoder):
    hf_config = model.config.to_hf_dict()
    mapping = hf_mappings.encoder_mapping(model.config, classifier=classifier)
  else:
    config = model.config
    headless = not config.tie_embeddings and not hasattr(model, "lm_head")
    if headless:
      config = config.replace(tie_embeddings=True)
    hf_config = hf_import.decoder_config_to_hf(config)
    mapping = hf_import.decoder_mapping(config, hf_config["model_type"], set())
    if headless:
      hf_config["architectures"] = ["GPT2Model" if hf_config["model_type"] == "gpt2"
                                    else "LlamaModel"]
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
  if hf_config.get("type_vocab_size") == 0:
    _add_zero_token_type(tensors, hf_config)
  return tensors, hf_config


def _add_zero_token_type(tensors: dict[str, np.ndarray], hf_config: dict[str, Any]) -> None:
  """An encoder without token types as transformers can run it (it has no zero-type BERT):
  one token type whose embedding is zero, which adds nothing."""
  words = next(n for n in tensors if n.endswith("embeddings.word_embeddings.weight"))
  tensors[words.replace("word_embeddings", "token_type_embeddings")] = np.zeros(
      (1, tensors[words].shape[1]), tensors[words].dtype)
  hf_config["type_vocab_size"] = 1


def save_pretrained(model: nnx.Module, path: PathLike, *, tokenizer: Any = None,
                    add_bos: bool = True, pipeline: Mapping[str, Any] | None = None
                    ) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face directory (see the module docstring); returns it.

  ``add_bos``: whether the texts the model was trained on began with the BOS token (the
  pipeline's ``add_bos``), which the saved tokenizer of a reward model or a policy then
  adds (a reward model's adds the EOS too). ``pipeline``: the training pipeline's text
  fields (``PipelineConfig.text_fields()``: cuts, prompt style, BOS), recorded in
  ``config.json`` (``hf_import.PIPELINE_KEY``) so that ``eval_rm``'s ``hf:`` scorer reads
  pairs as training did.
  """
  directory = pathlib.Path(path)
  if isinstance(model, heads.DeepEnsemble):
    for k in range(model.num_members):
      save_pretrained(model.member(k), directory / f"member_{k}", tokenizer=tokenizer,
                      add_bos=add_bos, pipeline=pipeline)
    _log.info("%s: wrote the %d members of the deep ensemble as member_<k>/",
              directory, model.num_members)
    return directory
  hf_tokenizer = None
  head_tensors = None
  prompt_style = (pipeline or {}).get("prompt_style", "raw")
  if _is_score_model(model) and isinstance(model.trunk, Encoder):
    tensors, hf_config = _encoder_classifier(model, tokenizer)
    if getattr(tokenizer, "hf", None) is not None:
      hf_tokenizer = _with_specials(copy.deepcopy(tokenizer.hf),
                                    tokenizer.bos_id if add_bos else None,
                                    tokenize.response_end_id(tokenizer, prompt_style))
  elif _is_score_model(model):
    tensors, hf_config = _sequence_classifier(model, tokenizer)
    hf_tokenizer = _score_tokenizer(tokenizer, tensors, hf_config, add_bos,
                                    skips_id=model.last_skips_id, prompt_style=prompt_style)
    hf_config.update(_score_token(model, hf_config))
  else:
    trunk = getattr(model, "trunk", model)
    tensors, hf_config = hf_state_dict(trunk)
    hf_config.update(_special_ids(tokenizer, trunk))
    if isinstance(model, Decoder):
      hf_tokenizer = _policy_tokenizer(tokenizer, add_bos)
    if trunk is not model:
      head_tensors = _own_head(model)
      _log.warning("%s has no Hugging Face form: transformers loads its trunk (%s); the head "
                   "is in %s, which prefjax's from_pretrained(head=%r) loads",
                   _describe(model), hf_config["architectures"][0], hf_import.HEAD_FILE,
                   heads.head_spec(model))
  if hasattr(model, "trunk"):
    hf_config[hf_import.HEAD_KEY] = heads.head_spec(model)
    if getattr(model, "pooling", None):
      hf_config[hf_import.POOLING_KEY] = model.pooling
  if pipeline is not None:
    hf_config[hf_import.PIPELINE_KEY] = dict(pipeline)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  if head_tensors is not None:
    save_file(head_tensors, str(directory / hf_import.HEAD_FILE), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True,
                                                    allow_nan=False))
  hf_tokenizer = hf_tokenizer or getattr(tokenizer, "hf", None)
  if hf_tokenizer is not None:
    hf_tokenizer.save_pretrained(str(directory))
  return directory


def _is_score_model(model: nnx.Module) -> bool:
  """A reward head of an HF ``*ForSequenceClassification``'s form: a decoder's at its last
  token, an encoder's through its pooler on the first."""
  if not isinstance(model, SCORE_HEADS):
    return False
  return model.pooling == ("pooler" if isinstance(model.trunk, Encoder) else "last")


def _own_head(model: nnx.Module) -> dict[str, np.ndarray]:
  linear = heads.output_layer(model)
  return {name: np.asarray(jax.device_get(getattr(linear, name).get_value()))
          for name in ("kernel", "bias")}


def _describe(model: nnx.Module) -> str:
  pooling = getattr(model, "pooling", None)
  trunk = type(getattr(model, "trunk", model)).__name__
  return f"{type(model).__name__}({trunk}{'' if pooling is None else f', pooling={pooling!r}'})"


def _special_ids(tokenizer: Any, trunk: nnx.Module | None = None) -> dict[str, int]:
  if tokenizer is None:
    return {}
  ids = {"bos_token_id": getattr(tokenizer, "bos_id", None),
         "eos_token_id": getattr(tokenizer, "eos_id", None),
         "pad_token_id": getattr(tokenizer, "pad_id", None)}
  if isinstance(trunk, Encoder) and trunk.config.position_offset:
    del ids["pad_token_id"]  # RoBERTa's positions start after the model's own pad id
  return {k: int(v) for k, v in ids.items() if v is not None}


def _sequence_classifier(model: heads.PooledHeadModel, tokenizer: Any
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A last-pooled decoder reward model as ``*ForSequenceClassification`` tensors + config."""
  tensors, hf_config = _classifier_form(model, tokenizer)
  tensors.pop("lm_head.weight", None)
  head = _own_head(model)
  bias = head["bias"].astype(np.float32)
  tensors["score.weight"] = np.ascontiguousarray(head["kernel"].astype(np.float32).T)
  if np.any(bias != 0):
    tensors["score.bias"] = bias
    _log.warning("the reward head's bias %s is not zero: written as 'score.bias', which "
                 "prefjax loads and transformers ignores (its scores are shifted by "
                 "-bias, a constant no pairwise comparison sees)", np.round(bias, 4).tolist())
  return tensors, hf_config


def _encoder_classifier(model: heads.PooledHeadModel, tokenizer: Any
                        ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A pooler-pooled encoder reward model as ``*ForSequenceClassification`` tensors + config
  (BERT's, RoBERTa's or DistilBERT's: the classifier reads the bias too)."""
  tensors, hf_config = _classifier_form(model, tokenizer)
  output = hf_mappings.CLASSIFIER_OUTPUTS[model.trunk.config.model_type]
  head = _own_head(model)
  tensors[f"{output}.weight"] = np.ascontiguousarray(head["kernel"].astype(np.float32).T)
  tensors[f"{output}.bias"] = head["bias"].astype(np.float32)
  return tensors, hf_config


def _classifier_form(model: heads.PooledHeadModel, tokenizer: Any
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The trunk's tensors and a ``*ForSequenceClassification`` config whose labels are the
  head's outputs (a regression: pipelines then return the raw rewards)."""
  encoder = isinstance(model.trunk, Encoder)
  tensors, hf_config = hf_state_dict(model.trunk, classifier=encoder)
  hf_config.update(_special_ids(tokenizer, model.trunk))
  hf_config["architectures"] = [CLASSIFIER_ARCHITECTURES[hf_config["model_type"]]]
  labels = _labels(model)
  hf_config["id2label"] = {str(i): name for i, name in enumerate(labels)}
  hf_config["label2id"] = {name: i for i, name in enumerate(labels)}
  hf_config["problem_type"] = "regression"
  return tensors, hf_config


def _labels(model: heads.PooledHeadModel) -> list[str]:
  if isinstance(model, heads.MultiObjectiveRewardModel):
    return list(model.names)
  if isinstance(model, heads.MultiHeadEnsemble):
    return [f"member_{k}" for k in range(model.num_members)]
  return ["reward"]


def _score_tokenizer(tokenizer: Any, tensors: dict[str, np.ndarray], hf_config: dict[str, Any],
                     add_bos: bool, *, skips_id: int | None, prompt_style: str = "raw") -> Any:
  """A copy of a Hugging Face tokenizer that encodes as prefjax's pipeline does for a reward
  model: BOS (when ``add_bos``) + text + the response's end (EOS, or in ``chat`` style the
  template's turn-end token: ``tokenize.response_end_id``), padded with its pad id. A model
  read from a Hugging Face classifier scores the last token that is not ``skips_id`` (its
  config's pad id), and the copy pads with that id, so that transformers skips the padding
  and nothing else. Otherwise the model scores that end, and a pad id equal to it becomes
  a new ``PAD_TOKEN`` (with a zero embedding row where the vocabulary has no spare id), so
  that transformers' sequence classifier reads the end too. ``tensors`` and ``hf_config``
  are updated to match; None without a Hugging Face tokenizer."""
  if getattr(tokenizer, "hf", None) is None:
    return None
  hf_tok = copy.deepcopy(tokenizer.hf)
  bos, pad = tokenizer.bos_id, tokenizer.pad_id
  end = tokenize.response_end_id(tokenizer, prompt_style)
  if skips_id is not None:
    pad = skips_id
    if hf_tok.pad_token_id != pad:
      hf_tok.pad_token = hf_tok.convert_ids_to_tokens(pad)
  elif pad == end:
    hf_tok.add_special_tokens({"pad_token": PAD_TOKEN})
    pad = hf_tok.pad_token_id
    name = next(n for n in EMBEDDINGS if n in tensors)
    rows = tensors[name].shape[0]
    if pad >= rows:
      extra = np.zeros((pad + 1 - rows, tensors[name].shape[1]), tensors[name].dtype)
      tensors[name] = np.concatenate([tensors[name], extra])
      hf_config["vocab_size"] = pad + 1
      _log.info("the tokenizer's pad id was its EOS id: added %r as id %d (a zero embedding "
                "row), so that transformers scores the final EOS", PAD_TOKEN, pad)
  elif hf_tok.pad_token_id is None:  # prefjax pads with the EOS: the saved copy says so
    hf_tok.pad_token = hf_tok.convert_ids_to_tokens(pad)
  hf_config["pad_token_id"] = int(pad)
  hf_tok.padding_side = "right"
  return _with_specials(hf_tok, bos if add_bos else None, end)


def _policy_tokenizer(tokenizer: Any, add_bos: bool) -> Any:
  """A copy of a Hugging Face tokenizer that encodes a prompt as the pipeline did for a
  policy: BOS (when ``add_bos``) + text, nothing appended. None without one."""
  if getattr(tokenizer, "hf", None) is None:
    return None
  return _with_specials(copy.deepcopy(tokenizer.hf), tokenizer.bos_id if add_bos else None,
                        None)


def _with_specials(hf_tok: Any, bos: int | None, eos: int | None) -> Any:
  """``hf_tok`` encoding ``[bos] text [eos]`` (either omitted when None) by default."""
  if getattr(hf_tok, "backend_tokenizer", None) is None:
    _log.warning("the tokenizer has no fast (Rust) backend, so its saved copy cannot be made "
                 "to add BOS and EOS as prefjax's pipeline does: add them to texts before "
                 "passing them to transformers")
    return hf_tok
  template = ([(hf_tok.convert_ids_to_tokens(bos), bos)] if bos is not None else []
              ) + [("$A", None)] + ([(hf_tok.convert_ids_to_tokens(eos), eos)]
                                    if eos is not None else [])
  hf_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single=" ".join(t for t, _ in template),
      special_tokens=sorted({(t, i) for t, i in template if i is not None}))
  return hf_tok


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
        "that prefjax's from_pretrained scores as trained; pass the Hugging Face tokenizer "
        "to give the export a pad token of its own", eos, pad, hf_import.SCORE_TOKEN_KEY)
  elif pad is None:
    _log.warning("no pad id is known (pass the tokenizer): transformers' sequence "
                 "classifiers then score one sequence per call")
  return {hf_import.SCORE_TOKEN_KEY: "last_real"}
