"""Name and layout maps between Hugging Face checkpoints and prefjax parameter trees.

A mapping is ``{prefjax_path: (hf_tensor_name, layout)}`` where ``prefjax_path``
is the "/"-joined NNX state path of a parameter and ``layout`` says how the HF
tensor becomes the prefjax array:

  "copy"       same layout (embeddings, norms, biases, GPT-2 ``Conv1D`` weights,
               which PyTorch already stores as ``[in, out]``)
  "transpose"  ``torch.nn.Linear`` weight ``[out, in]`` -> ``nnx.Linear`` kernel
               ``[in, out]``

Llama q/k projections keep Hugging Face's "rotate half" RoPE layout because the
prefjax decoder uses the same layout, so no head permutation is needed.
"""

from __future__ import annotations

import re
from typing import Any

Mapping = dict[str, tuple[str, str]]

# HF buffers or tensors prefjax does not need; loading never reports them as unused.
IGNORED_HF_TENSORS = (
    re.compile(r"(^|\.)position_ids$"),           # BERT buffer
    re.compile(r"rotary_emb\.inv_freq$"),         # old Llama buffer
    re.compile(r"\.attn\.(masked_)?bias$"),       # GPT-2 causal-mask buffers
)


def is_ignored(name: str) -> bool:
  return any(p.search(name) for p in IGNORED_HF_TENSORS)


def hf_aliases(name: str) -> list[str]:
  """Alternative names old checkpoints use for the same tensor (TF-era LayerNorm names)."""
  out = [name]
  if name.endswith("LayerNorm.weight"):
    out.append(name[:-len("weight")] + "gamma")
  if name.endswith("LayerNorm.bias"):
    out.append(name[:-len("bias")] + "beta")
  return out


def bert_mapping(num_layers: int, prefix: str = "", *, token_types: bool = True,
                 pooler: str | None = None) -> Mapping:
  """BERT / RoBERTa (``BertModel``; ``prefix="bert."`` / ``"roberta."`` for task models)
  -> ``Encoder``. ``pooler``: the HF name of the dense layer ``Encoder.pooler`` reads."""
  m = _encoder_embeddings(prefix)
  if token_types:
    m["type_embed/embedding"] = (prefix + "embeddings.token_type_embeddings.weight", "copy")
  for i in range(num_layers):
    _encoder_layer(m, i, f"{prefix}encoder.layer.{i}.", (
        ("attn/q_proj", "attention.self.query"), ("attn/k_proj", "attention.self.key"),
        ("attn/v_proj", "attention.self.value"), ("attn/o_proj", "attention.output.dense"),
        ("mlp/up_proj", "intermediate.dense"), ("mlp/down_proj", "output.dense")),
        (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")))
  return _with_pooler(m, pooler)


def distilbert_mapping(num_layers: int, prefix: str = "", *,
                       pooler: str | None = None) -> Mapping:
  """DistilBERT (``DistilBertModel``; ``prefix="distilbert."`` for task models) -> ``Encoder``."""
  m = _encoder_embeddings(prefix)
  for i in range(num_layers):
    _encoder_layer(m, i, f"{prefix}transformer.layer.{i}.", (
        ("attn/q_proj", "attention.q_lin"), ("attn/k_proj", "attention.k_lin"),
        ("attn/v_proj", "attention.v_lin"), ("attn/o_proj", "attention.out_lin"),
        ("mlp/up_proj", "ffn.lin1"), ("mlp/down_proj", "ffn.lin2")),
        (("attn_norm", "sa_layer_norm"), ("mlp_norm", "output_layer_norm")))
  return _with_pooler(m, pooler)


def _encoder_embeddings(prefix: str) -> Mapping:
  e = prefix + "embeddings."
  return {"embed/embedding": (e + "word_embeddings.weight", "copy"),
          "pos_embed/embedding": (e + "position_embeddings.weight", "copy"),
          "embed_norm/scale": (e + "LayerNorm.weight", "copy"),
          "embed_norm/bias": (e + "LayerNorm.bias", "copy")}


def _encoder_layer(m: Mapping, i: int, hf: str, linears, norms) -> None:
  px = f"layers/{i}/"
  for ours, theirs in linears:
    m[px + ours + "/kernel"] = (hf + theirs + ".weight", "transpose")
    m[px + ours + "/bias"] = (hf + theirs + ".bias", "copy")
  for ours, theirs in norms:
    m[px + ours + "/scale"] = (hf + theirs + ".weight", "copy")
    m[px + ours + "/bias"] = (hf + theirs + ".bias", "copy")


def _with_pooler(m: Mapping, pooler: str | None) -> Mapping:
  if pooler is not None:
    m["pooler/kernel"] = (pooler + ".weight", "transpose")
    m["pooler/bias"] = (pooler + ".bias", "copy")
  return m


# The task models' trunk attribute, by model type.
ENCODER_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.",
                    "distilbert": "distilbert."}
# The dense layer of a sequence classifier's head that ``Encoder.pooler`` is, by model type
# (a base model's pooler, where it has one, is ``<prefix>pooler.dense``).
CLASSIFIER_POOLERS = {"bert": "{prefix}pooler.dense", "roberta": "classifier.dense",
                      "xlm-roberta": "classifier.dense", "distilbert": "pre_classifier"}
# The output layer of a sequence classifier, whose rows are its labels' logits.
CLASSIFIER_OUTPUTS = {"bert": "classifier", "roberta": "classifier.out_proj",
                      "xlm-roberta": "classifier.out_proj", "distilbert": "classifier"}


def encoder_mapping(config: Any, names: set[str] | None = None, *,
                    classifier: bool = False) -> Mapping:
  """The mapping of an ``EncoderConfig``'s model from checkpoint tensor ``names`` (a task
  model's are prefixed), or, with ``names=None``, to what export writes: the base model, or
  with ``classifier`` the trunk and pooler of a ``*ForSequenceClassification``."""
  model_type = config.model_type
  prefix = ENCODER_PREFIXES[model_type]
  task = classifier if names is None else prefix + "embeddings.word_embeddings.weight" in names
  prefix = prefix if task else ""
  pooler = None
  if config.pooler is not None:
    pooler = CLASSIFIER_POOLERS[model_type].format(prefix=prefix)
    if not (classifier if names is None else pooler + ".weight" in names):
      pooler = "pre_classifier" if model_type == "distilbert" else prefix + "pooler.dense"
  if model_type == "distilbert":
    return distilbert_mapping(config.num_layers, prefix, pooler=pooler)
  return bert_mapping(config.num_layers, prefix, token_types=config.type_vocab_size > 0,
                      pooler=pooler)


def llama_mapping(num_layers: int, *, tied: bool, attention_bias: bool = False,
                  mlp_bias: bool = False, prefix: str = "model.") -> Mapping:
  """Llama / SmolLM2 / Mistral-style checkpoints (``LlamaForCausalLM``) -> ``Decoder``."""
  m: Mapping = {
      "embed/embedding": (prefix + "embed_tokens.weight", "copy"),
      "final_norm/scale": (prefix + "norm.weight", "copy"),
  }
  if not tied:
    m["lm_head/kernel"] = ("lm_head.weight", "transpose")
  for i in range(num_layers):
    hf = f"{prefix}layers.{i}."
    px = f"layers/{i}/"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      m[f"{px}attn/{proj}/kernel"] = (f"{hf}self_attn.{proj}.weight", "transpose")
      if attention_bias:
        m[f"{px}attn/{proj}/bias"] = (f"{hf}self_attn.{proj}.bias", "copy")
    for proj in ("gate_proj", "up_proj", "down_proj"):
      m[f"{px}mlp/{proj}/kernel"] = (f"{hf}mlp.{proj}.weight", "transpose")
      if mlp_bias:
        m[f"{px}mlp/{proj}/bias"] = (f"{hf}mlp.{proj}.bias", "copy")
    m[f"{px}input_norm/scale"] = (f"{hf}input_layernorm.weight", "copy")
    m[f"{px}post_attn_norm/scale"] = (f"{hf}post_attention_layernorm.weight", "copy")
  return m


def gpt2_mapping(num_layers: int, *, tied: bool = True,
                 prefix: str = "transformer.") -> Mapping:
  """GPT-2 (``GPT2LMHeadModel``, tied head or ``lm_head`` of its own) -> ``Decoder``.

  GPT-2's fused ``c_attn`` ``[D, 3D]`` is split into q/k/v by the loader (layout
  "qkv:<j>" = the j-th third along the output axis).
  """
  m: Mapping = {
      "embed/embedding": (prefix + "wte.weight", "copy"),
      "pos_embed/embedding": (prefix + "wpe.weight", "copy"),
      "final_norm/scale": (prefix + "ln_f.weight", "copy"),
      "final_norm/bias": (prefix + "ln_f.bias", "copy"),
  }
  if not tied:
    m["lm_head/kernel"] = ("lm_head.weight", "transpose")
  for i in range(num_layers):
    hf = f"{prefix}h.{i}."
    px = f"layers/{i}/"
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
      m[f"{px}attn/{proj}/kernel"] = (f"{hf}attn.c_attn.weight", f"qkv:{j}")
      m[f"{px}attn/{proj}/bias"] = (f"{hf}attn.c_attn.bias", f"qkv:{j}")
    for ours, theirs in (("attn/o_proj", "attn.c_proj"), ("mlp/up_proj", "mlp.c_fc"),
                         ("mlp/down_proj", "mlp.c_proj")):
      m[f"{px}{ours}/kernel"] = (f"{hf}{theirs}.weight", "copy")
      m[f"{px}{ours}/bias"] = (f"{hf}{theirs}.bias", "copy")
    for ours, theirs in (("input_norm", "ln_1"), ("post_attn_norm", "ln_2")):
      m[f"{px}{ours}/scale"] = (f"{hf}{theirs}.weight", "copy")
      m[f"{px}{ours}/bias"] = (f"{hf}{theirs}.bias", "copy")
  return m


def to_prefjax(array: Any, layout: str) -> Any:
  """HF tensor -> prefjax array for one mapping entry (NumPy in, NumPy out)."""
  if layout == "copy":
    return array
  if layout == "transpose":
    return array.T
  if layout.startswith("qkv:"):
    j = int(layout.split(":")[1])
    width = array.shape[-1] // 3
    return array[..., j * width:(j + 1) * width]
  raise ValueError(f"unknown layout {layout!r}")


def to_hf(array: Any, layout: str) -> Any:
  """prefjax array -> HF tensor (inverse of ``to_prefjax``; "qkv" parts are joined by the caller)."""
  if layout == "transpose":
    return array.T
  return array
