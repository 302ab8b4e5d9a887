"""Load local Hugging Face checkpoints into prefjax models.

``from_pretrained(path)`` reads a directory with ``config.json`` plus
``model.safetensors`` (or a sharded ``model.safetensors.index.json``) for
model_type ``llama``, ``gpt2``, ``bert``, ``roberta``, ``xlm-roberta`` and ``distilbert``,
or a ``.gguf`` file (Llama family,
through ``prefjax.models.gguf_import.load_gguf``). Nothing is downloaded.

Loading is strict: every prefjax parameter must be found with the right shape,
and errors name the tensor, the file and both shapes. Checkpoint tensors that
no parameter uses are logged (and returned by ``load_hf_checkpoint``) instead of
being dropped silently.

Saving is ``prefjax.models.hf_export.save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.models import gguf_import
from prefjax.models import heads
from prefjax.models import hf_mappings
from prefjax.models.decoder import Decoder, DecoderConfig
from prefjax.models import encoder as encoder_lib
from prefjax.models.encoder import Encoder, EncoderConfig
# Re-exported: these lived here before hf_files / hf_heads, and callers read them here.
from prefjax.models.hf_files import (  # pylint: disable=unused-import
    CheckpointError, PathLike, SafetensorsReader, read_json as _read_json)
from prefjax.models.hf_heads import (  # pylint: disable=unused-import
    HEAD_FILE, HEAD_KEY, PIPELINE_KEY, POOLING_KEY, SCORE_TOKEN_KEY,
    _saved_head, classifier_labels, classifier_output, load_prefjax_head, load_score_head,
    saved_head, saved_pipeline)

SUPPORTED_MODEL_TYPES = ("llama", "gpt2") + encoder_lib.MODEL_TYPES
_log = logging.getLogger(__name__)


# -- config translation ---------------------------------------------------------


def _rope_theta(hf: dict[str, Any]) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  # Either key may carry the scaling (transformers 5 writes rope_parameters and lets a
  # rope_scaling beside it win): refuse a non-default type in either.
  for rope_type in (params.get("rope_type"), params.get("type"), scaling.get("rope_type"),
                    scaling.get("type")):
    if rope_type not in (None, "default"):
      raise CheckpointError(f"rope scaling type {rope_type!r} is not supported "
                            "(only default RoPE)")
  # As transformers reads them: a non-empty rope_scaling replaces rope_parameters whole.
  return float((scaling or params).get("rope_theta", hf.get("rope_theta", 10000.0)))


def _decoder_config_from_hf(hf: dict[str, Any]):
  model_type = hf["model_type"]
  if model_type == "llama":
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # the same function
      raise CheckpointError(f"llama hidden_act {hf['hidden_act']!r} unsupported (only 'silu')")
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        position="rope", rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_id=_first_id(hf.get("bos_token_id")), eos_id=_first_id(hf.get("eos_token_id")),
        pad_id=_first_id(hf.get("pad_token_id")))
  if model_type == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise CheckpointError(f"gpt2 activation_function {act!r} unsupported (only gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if hf.get(flag):
        raise CheckpointError(f"gpt2 option {flag}=True is not supported")
    if not hf.get("scale_attn_weights", True):
      raise CheckpointError("gpt2 option scale_attn_weights=False is not supported")
    d = hf["n_embd"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * d,
        max_position_embeddings=hf.get("n_positions", 1024), norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", position="learned",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention_bias=True,
        attention_out_bias=True, mlp_bias=True,
        bos_id=_first_id(hf.get("bos_token_id")), eos_id=_first_id(hf.get("eos_token_id")),
        pad_id=_first_id(hf.get("pad_token_id")))
  raise CheckpointError(f"not a decoder model_type: {model_type!r}")


def _is_sequence_classifier(hf: dict[str, Any], names: set[str]) -> bool:
  archs = hf.get("architectures") or []
  return ("score.weight" in names and "lm_head.weight" not in names
          and any(a.endswith("ForSequenceClassification") for a in archs))


BASE_MODELS = ("LlamaModel", "GPT2Model")


def _is_base_model(hf: dict[str, Any], names: set[str]) -> bool:
  """A trunk saved without its output layer (``LlamaModel``), as a reward model's is."""
  archs = hf.get("architectures") or []
  return "lm_head.weight" not in names and any(a in BASE_MODELS for a in archs)


def _first_id(value) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def decoder_config_to_hf(config) -> dict[str, Any]:
  """HF ``config.json`` for a ``DecoderConfig`` (Llama or GPT-2 family)."""
  c = config
  ids = {"bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id}
  ids = {k: v for k, v in ids.items() if v is not None}
  if _is_gpt2_like(c):
    if c.head_dim * c.num_heads != c.hidden_size:
      raise CheckpointError(
          f"a GPT-2-style decoder with head_dim={c.head_dim} x num_heads={c.num_heads} != "
          f"hidden_size={c.hidden_size} has no Hugging Face form (GPT-2's heads split n_embd)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_embd": c.hidden_size, "n_layer": c.num_layers,
            "n_head": c.num_heads, "n_inner": c.intermediate_size,
            "n_positions": c.max_position_embeddings, "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new", "tie_word_embeddings": c.tie_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **ids}
  if c.norm != "rms" or c.mlp != "swiglu" or c.position != "rope":
    raise CheckpointError(
        f"DecoderConfig(norm={c.norm}, mlp={c.mlp}, position={c.position}) matches "
        "neither the Llama nor the GPT-2 HF architecture")
  if c.attention_out_bias != c.attention_bias:
    raise CheckpointError("HF Llama ties o_proj bias to attention_bias; this config differs")
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
          "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
          "intermediate_size": c.intermediate_size,
          "max_position_embeddings": c.max_position_embeddings,
          "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
          "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.attention_bias,
          "mlp_bias": c.mlp_bias, "attention_dropout": 0.0, **ids}


def _is_gpt2_like(c) -> bool:
  return (c.norm == "layer" and c.mlp == "gelu" and c.position == "learned"
          and c.attention_bias and c.attention_out_bias
          and c.mlp_bias and c.num_kv_heads == c.num_heads)


def decoder_mapping(config, hf_model_type: str, names: set[str]) -> hf_mappings.Mapping:
  if hf_model_type == "gpt2":
    prefix = "transformer." if "transformer.wte.weight" in names or not names else ""
    return hf_mappings.gpt2_mapping(config.num_layers, tied=config.tie_embeddings,
                                    prefix=prefix)
  prefix = "model." if "model.embed_tokens.weight" in names or not names else ""
  return hf_mappings.llama_mapping(
      config.num_layers, tied=config.tie_embeddings, attention_bias=config.attention_bias,
      mlp_bias=config.mlp_bias, prefix=prefix)


# -- loading --------------------------------------------------------------------


@dataclasses.dataclass
class LoadReport:
  """What a checkpoint load used: loaded parameter count and unused HF tensors."""

  model_type: str
  num_loaded: int
  unused: list[str]


def param_paths(model: nnx.Module) -> dict[str, nnx.Variable]:
  return {"/".join(str(p) for p in path): var for path, var in nnx.iter_graph(model)
          if isinstance(var, nnx.Param)}


def _fetch(reader: SafetensorsReader, name: str, used: set[str], where: str) -> np.ndarray:
  for alias in hf_mappings.hf_aliases(name):
    if alias in reader.files:
      used.add(alias)
      return reader.get(alias)
  raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint")


def fill_params(model: nnx.Module, mapping: hf_mappings.Mapping,
                reader: SafetensorsReader, *, param_dtype=jnp.float32) -> list[str]:
  """Writes checkpoint tensors into ``model``'s parameters; returns unused HF tensor names.

  ``model`` may be abstract (built under ``nnx.eval_shape``): every parameter
  is replaced. Raises ``CheckpointError`` for a parameter with no mapping, a
  missing tensor or a shape mismatch, naming the tensor and both shapes.
  """
  where = str(reader.directory)
  params = param_paths(model)
  unmapped = sorted(set(params) - set(mapping))
  if unmapped:
    raise CheckpointError(f"{where}: no checkpoint tensor is mapped to parameters {unmapped}")
  used: set[str] = set()
  for path, var in params.items():
    hf_name, layout = mapping[path]
    array = hf_mappings.to_prefjax(_fetch(reader, hf_name, used, where), layout)
    expected = tuple(var.shape)
    if tuple(array.shape) != expected:
      raise CheckpointError(
          f"{where}: tensor {hf_name!r} has shape {tuple(array.shape)} (after layout "
          f"{layout!r}) but parameter {path!r} expects {expected}")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise CheckpointError(f"{where}: tensor {hf_name!r} is {array.dtype} (a quantized "
                            "checkpoint?): only float checkpoints load")
    if not np.all(np.isfinite(array.astype(np.float32))):
      raise CheckpointError(f"{where}: tensor {hf_name!r} contains NaN or inf")
    var.set_value(jnp.asarray(array, dtype=param_dtype))
  return sorted(n for n in reader.names() - used if not hf_mappings.is_ignored(n))


def _abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
  return nnx.eval_shape(build)


def load_hf_checkpoint(path: PathLike, *, dtype=None, param_dtype=jnp.float32,
                       ) -> tuple[nnx.Module, LoadReport]:
  """Loads a local HF directory into a ``Decoder`` or ``Encoder``; returns ``(model, report)``."""
  directory = pathlib.Path(path)
  config_file = directory / "config.json"
  if not config_file.exists():
    what = "does not exist" if not directory.exists() else "has no config.json"
    raise FileNotFoundError(f"{directory} {what}: expected a Hugging Face model directory "
                            "(a train_* run writes one to WORKDIR/hf with export_hf=True)")
  hf = _read_json(config_file)
  if not isinstance(hf, dict):
    raise CheckpointError(f"{config_file}: expected a JSON object")
  model_type = hf.get("model_type")
  for key in ("quantization_config", "compression_config"):
    if key in hf:
      method = (hf[key] or {}).get("quant_method", "?") if isinstance(hf[key], dict) else "?"
      raise CheckpointError(f"{config_file}: a quantized checkpoint ({key}, quant_method "
                            f"{method!r}); only float checkpoints load: use the unquantized "
                            "model's directory")
  if model_type is None and (directory / "checkpoints").is_dir():
    export = directory / "hf"
    raise CheckpointError(
        f"{directory} is a prefjax run's workdir, not a Hugging Face model directory: "
        + (f"its export is {export}" if (export / "config.json").exists() else
           "rerun it with --config.export_hf=True to write its export to WORKDIR/hf")
        + " (a proxy checkpoint or an eval_rm rm: scorer takes the workdir itself)")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{config_file}: model_type {model_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  config = _trunk_config(hf, config_file)
  reader = SafetensorsReader(directory)
  names = reader.names()
  encoder = model_type in encoder_lib.MODEL_TYPES
  if encoder:
    mapping = hf_mappings.encoder_mapping(config, names)
    model = _abstract(lambda: Encoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                      param_dtype=param_dtype))
  else:
    if _is_sequence_classifier(hf, names) and not config.tie_embeddings:
      # A reward-model checkpoint has a `score` head instead of `lm_head`; the trunk's
      # LM logits are then the (unused) tied embedding projection.
      _log.info("%s: sequence-classification checkpoint without lm_head; tying the "
                "decoder's output embedding", directory)
      config = config.replace(tie_embeddings=True)
    elif _is_base_model(hf, names) and not config.tie_embeddings:
      _log.warning("%s: a %s checkpoint has no LM head; the decoder's LM logits use the "
                   "tied input embedding", directory, hf["architectures"][0])
      config = config.replace(tie_embeddings=True)
    mapping = decoder_mapping(config, model_type, names)
    model = _abstract(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                      param_dtype=param_dtype))
  unused = fill_params(model, mapping, reader, param_dtype=param_dtype)
  _check_layer_count(unused, config.num_layers, config_file)
  if not encoder and config.tie_embeddings and "lm_head.weight" in unused:
    _check_tied_head(reader, mapping["embed/embedding"][0], config_file)
  output = classifier_output(hf)  # a classifier's label logits: from_pretrained's concern
  unexplained = [n for n in unused if n.rpartition(".")[0] != output]
  pooler = [n for n in unexplained if encoder and n.split(".")[-3:-1] == ["pooler", "dense"]]
  if pooler:  # a base model's [CLS] pooler: prefjax's heads pool the states their own way
    _log.info("%s: the %s base model's pooler (%s) is not used", directory, model_type,
              ", ".join(pooler))
    unexplained = [n for n in unexplained if n not in pooler]
  if unexplained:
    _log.warning("%s: %d checkpoint tensors are not used by prefjax's %s model: %s",
                 directory, len(unexplained), model_type, unexplained[:20])
  return model, LoadReport(model_type, len(param_paths(model)), unused)


def _check_tied_head(reader: SafetensorsReader, embedding: str,
                     config_file: pathlib.Path) -> None:
  """``tie_word_embeddings`` and an ``lm_head.weight`` of other values: transformers 4 tied
  them (as prefjax would), transformers 5 keeps the head; refused rather than guessed."""
  head = reader.get("lm_head.weight")
  embed = _fetch(reader, embedding, set(), str(reader.directory))
  if head.shape != embed.shape or not np.array_equal(head, embed):
    raise CheckpointError(f"{config_file} sets tie_word_embeddings, but the checkpoint's "
                          f"lm_head.weight differs from {embedding!r}: set "
                          "tie_word_embeddings to false in config.json to load the head, or "
                          "delete lm_head.weight to tie them")


def _trunk_config(hf: dict[str, Any], config_file: pathlib.Path
                  ) -> DecoderConfig | EncoderConfig:
  try:
    config = (EncoderConfig.from_hf_dict(hf) if hf["model_type"] in encoder_lib.MODEL_TYPES
              else _decoder_config_from_hf(hf))
  except KeyError as e:
    raise CheckpointError(f"{config_file}: missing field {e.args[0]!r}") from e
  except ValueError as e:  # an unsupported option, named without the file
    raise CheckpointError(f"{config_file}: {e}") from e
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise CheckpointError(f"{config_file} gives the model's {field} as {value!r}; a size "
                            "must be a positive integer")
  return config


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")


def _check_layer_count(unused: list[str], num_layers: int, config_file: pathlib.Path) -> None:
  """A checkpoint with more layers than its config.json says would load truncated."""
  extra = sorted({int(m.group(1)) for n in unused if (m := _LAYER_INDEX.search(n))})
  extra = [i for i in extra if i >= num_layers]
  if extra:
    raise CheckpointError(f"{config_file} gives {num_layers} layers but the checkpoint also "
                          f"has tensors of layer(s) {extra[:5]} (a config of another model?)")


SCORE_HEAD_MODES = ("require", "if_fits")


def from_pretrained(path: PathLike, *, head: str | None = None, dtype=None,
                    param_dtype=jnp.float32, seed: int = 0,
                    pooling: str | None = None, score_head: str = "require",
                    score_label: str | None = None) -> nnx.Module:
  """Loads a local HF directory or a ``.gguf`` file, optionally with a head.

  Args:
    path: HF directory (config.json + safetensors) or a ``.gguf`` file.
    head: None (plain trunk / LM), "reward", "reward_ensemble:K", "value" or
      "multi:name1,name2" (see ``heads.attach_head``); heads are freshly
      initialised from ``seed``.
    dtype: compute dtype; default float32 on CPU, bfloat16 on accelerators.
    param_dtype: parameter dtype (float32 default).
    seed: seed of the new head's initialisation.
    pooling: reward-head pooling ("last", "mean", "cls", "pooler"); default the
      checkpoint's own ("last" for a decoder classifier, "pooler" for an encoder
      classifier), else ``heads.default_pooling``: "last" for decoders, "pooler" for an
      encoder with a pooler, "mean" for other encoders.
    score_head: what a ``*ForSequenceClassification`` checkpoint (an HF reward model or
      classifier) loaded with a reward head does with its output layer (a decoder's
      ``score``, an encoder's ``classifier``):
      "require" loads them and raises ``CheckpointError`` when the head's shape
      or pooling cannot take them; "if_fits" loads them when it can and otherwise
      keeps the fresh head with a warning (a 4-member ensemble on the trunk of a
      one-output reward model).
    score_label: with ``head="reward"``, a label of a classifier (a
      ``*ForSequenceClassification``, ``config.json``'s ``id2label``) whose log-odds is the
      reward: ``z_label − z_other`` of a two-label softmax, ``z_label`` of independent
      sigmoids (``hf_heads.label_log_odds``); it must load, whatever ``score_head`` says.
  """
  heads.parse_head(head)  # fail on a bad spec before reading any weights
  if score_head not in SCORE_HEAD_MODES:
    raise ValueError(f"score_head must be one of {SCORE_HEAD_MODES}, got {score_head!r}")
  if score_label is not None:
    if head != "reward":
      raise ValueError(f"score_label={score_label!r} reads a classifier label's log-odds "
                       f"as one reward; it needs head='reward', got {head!r}")
    score_head = "require"
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    if score_label is not None:
      raise CheckpointError(f"{path}: score_label={score_label!r} reads a classifier's "
                            "output layer; a GGUF file holds no classification head")
    trunk = gguf_import.load_gguf(path, dtype=dtype, param_dtype=param_dtype)
    return heads.attach_head(trunk, head, rngs=nnx.Rngs(seed), pooling=pooling)
  trunk, report = load_hf_checkpoint(path, dtype=dtype, param_dtype=param_dtype)
  hf = _read_json(path / "config.json")
  saved, saved_pooling = _saved_head(hf)
  if head is not None and pooling is None and saved is not None:
    pooling = saved_pooling
  model = heads.attach_head(trunk, head, rngs=nnx.Rngs(seed), pooling=pooling)
  if head is None and saved is not None:
    _log.warning("%s holds a %r reward/value head; head=None loads the trunk alone",
                 path, saved)
  if (path / HEAD_FILE).exists() and head is not None:
    _load_or_keep(lambda: load_prefjax_head(model, path, saved=(saved, saved_pooling)),
                  score_head, head)
  output = classifier_output(hf)
  if f"{output}.weight" not in report.unused:
    if score_label is not None:
      raise CheckpointError(f"{path}: score_label={score_label!r} reads a Hugging Face "
                            "*ForSequenceClassification's label logits, which this directory "
                            f"does not have (no '{output}.weight')")
    return model
  if not isinstance(model, heads.PooledHeadModel):
    _log.warning("%s: the checkpoint's reward head '%s.weight' is not used (head=%r; "
                 "head=%r scores with it%s)", path, output, head, saved or "reward",
                 "" if saved in (None, "reward") else ", head='reward' with a score_label "
                 "one label's log-odds")
    return model
  skips_pad = hf.get(SCORE_TOKEN_KEY) != "last_real"
  _load_or_keep(lambda: load_score_head(model, SafetensorsReader(path), output=output,
                                        skips_pad=skips_pad,
                                        saved=saved, label=score_label,
                                        labels=classifier_labels(hf),
                                        independent=_multi_label(hf)), score_head, head)
  return model


def _multi_label(hf: dict[str, Any]) -> bool:
  """Whether a classifier's labels are independent sigmoids (transformers' problem_type)."""
  return hf.get("problem_type") == "multi_label_classification"


def _load_or_keep(load: Callable[[], None], score_head: str, head: str) -> None:
  try:
    load()
  except CheckpointError as e:
    if score_head == "require":
      raise
    _log.warning("%s; the %r head keeps its fresh initialisation", e, head)

