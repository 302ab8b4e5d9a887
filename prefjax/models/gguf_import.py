"""Import Llama-family GGUF files (llama.cpp format) into a prefjax ``Decoder``.

Weights are dequantized to float32 with ``gguf.quants.dequantize`` (any
quantization the ``gguf`` package knows: F32/F16/BF16, Q8_0, Q4_0/1, K-quants,
...). The architecture comes from the ``llama.*`` metadata keys.

Two llama.cpp conventions are undone so the weights match the Hugging Face
layout the ``Decoder`` uses:
- ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q``/``attn_k`` per head
  from HF's "rotate half" RoPE layout to interleaved pairs; ``unpermute_rope_rows``
  inverts that.
- GGUF stores ``[out, in]`` matrices (PyTorch order); prefjax kernels are ``[in, out]``.
A file without ``output.weight`` has tied input/output embeddings.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax.models.decoder import Decoder, DecoderConfig

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (per block) -> (prefjax path suffix, transpose?).
_BLOCK_TENSORS = {
    "attn_norm.weight": ("input_norm/scale", False),
    "ffn_norm.weight": ("post_attn_norm/scale", False),
    "attn_q.weight": ("attn/q_proj/kernel", True),
    "attn_k.weight": ("attn/k_proj/kernel", True),
    "attn_v.weight": ("attn/v_proj/kernel", True),
    "attn_output.weight": ("attn/o_proj/kernel", True),
    "ffn_gate.weight": ("mlp/gate_proj/kernel", True),
    "ffn_up.weight": ("mlp/up_proj/kernel", True),
    "ffn_down.weight": ("mlp/down_proj/kernel", True),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("embed/embedding", False),
    "output_norm.weight": ("final_norm/scale", False),
    "output.weight": ("lm_head/kernel", True),
}


class GGUFImportError(ValueError):
  """The GGUF file cannot be mapped onto a prefjax Decoder."""


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """All metadata key/values of a GGUF file as Python values (strings decoded)."""
  reader = _open(os.fspath(path))
  return {name: field.contents() for name, field in reader.fields.items()}


def _open(path: str) -> gguf.GGUFReader:
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, struct.error) as e:  # e.g. a file cut short
    raise GGUFImportError(f"{path}: not a readable GGUF file (cut short?): "
                          f"{type(e).__name__}: {e}") from e


def _require(meta: dict[str, Any], key: str, path: str) -> Any:
  if key not in meta:
    raise GGUFImportError(f"{path}: metadata key '{key}' is missing")
  return meta[key]


def config_from_metadata(meta: dict[str, Any], *, path: str = "<gguf>",
                         vocab_size: int | None = None,
                         tie_embeddings: bool = True) -> DecoderConfig:
  """``DecoderConfig`` from GGUF ``llama.*`` metadata."""
  arch = _require(meta, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFImportError(f"{path}: architecture '{arch}' is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
  if meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
    raise GGUFImportError(f"{path}: rope scaling "
                          f"'{meta[f'{arch}.rope.scaling.type']}' is not supported")
  for key in (f"{arch}.rope.scaling.factor", f"{arch}.rope.scale_linear"):
    # llama.cpp reads a factor without a type as linear scaling.
    if float(meta.get(key, 1.0)) != 1.0:
      raise GGUFImportError(f"{path}: {key}={meta[key]} (rope scaling) is not supported")
  hidden = int(_require(meta, f"{arch}.embedding_length", path))
  heads = int(_require(meta, f"{arch}.attention.head_count", path))
  head_dim = int(meta.get(f"{arch}.attention.key_length",
                          meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
  rotated = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rotated != head_dim:  # partial rotary: the decoder rotates the whole head
    raise GGUFImportError(f"{path}: {arch}.rope.dimension_count={rotated} rotates part of "
                          f"each {head_dim}-wide head, which is not supported")
  if vocab_size is None:
    vocab_size = meta.get(f"{arch}.vocab_size")
    if vocab_size is None:
      vocab_size = len(_require(meta, "tokenizer.ggml.tokens", path))
  optional_id = lambda key: None if key not in meta else int(meta[key])
  return DecoderConfig(
      vocab_size=int(vocab_size),
      hidden_size=hidden,
      num_layers=int(_require(meta, f"{arch}.block_count", path)),
      num_heads=heads,
      num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
      head_dim=head_dim,
      intermediate_size=int(_require(meta, f"{arch}.feed_forward_length", path)),
      max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
      norm="rms",
      # GGUF stores eps as float32; its shortest decimal form is HF's value (1e-5).
      norm_eps=float(str(np.float32(
          meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)))),
      mlp="swiglu",
      position="rope",
      rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      tie_embeddings=tie_embeddings,
      bos_id=optional_id("tokenizer.ggml.bos_token_id"),
      eos_id=optional_id("tokenizer.ggml.eos_token_id"),
      pad_id=optional_id("tokenizer.ggml.padding_token_id"),
  )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's per-head row permutation of ``attn_q``/``attn_k`` (``[out, in]``).

  llama.cpp reorders each head's rows from ``[first half | second half]`` to
  interleaved pairs; this restores HF's order.
  """
  out = weight.shape[0]
  if out % (2 * num_heads):
    raise GGUFImportError(f"cannot unpermute a [{out}, ...] projection over {num_heads} heads")
  per_head = out // num_heads // 2
  return (weight.reshape(num_heads, per_head, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _target(name: str, path: str) -> tuple[str, bool]:
  if name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[name]
  if name == "rope_freqs.weight":
    raise GGUFImportError(f"{path}: tensor 'rope_freqs.weight' holds Llama 3.1/3.2 rope "
                          "scaling, which is not supported (only default RoPE)")
  match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if match and match.group(2) in _BLOCK_TENSORS:
    suffix, transpose = _BLOCK_TENSORS[match.group(2)]
    return f"layers/{match.group(1)}/{suffix}", transpose
  raise GGUFImportError(f"{path}: tensor '{name}' has no prefjax counterpart "
                        "(unsupported architecture variant?)")


def read_gguf(path: str | os.PathLike) -> tuple[DecoderConfig, dict[str, np.ndarray]]:
  """Dequantized float32 weights keyed by prefjax parameter path, plus the config."""
  path = os.fspath(path)
  reader = _open(path)
  meta = {name: field.contents() for name, field in reader.fields.items()}
  by_name = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in by_name:
    raise GGUFImportError(f"{path}: tensor 'token_embd.weight' is missing")
  vocab = int(by_name["token_embd.weight"].shape[-1])
  config = config_from_metadata(meta, path=path, vocab_size=vocab,
                                tie_embeddings="output.weight" not in by_name)
  params = {}
  for name, tensor in by_name.items():
    target, transpose = _target(name, path)
    # A plain ndarray copy: dequantizing straight from the memmap is several times slower.
    raw = np.array(tensor.data)
    weight = np.asarray(gguf.quants.dequantize(raw, tensor.tensor_type), np.float32)
    weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if not np.all(np.isfinite(weight)):
      raise GGUFImportError(f"{path}: tensor '{name}' contains NaN or inf")
    if name.endswith("attn_q.weight"):
      weight = unpermute_rope_rows(weight, config.num_heads)
    elif name.endswith("attn_k.weight"):
      weight = unpermute_rope_rows(weight, config.num_kv_heads)
    params[target] = weight.T if transpose else weight
  return config, params


def load_params(model: Decoder, params: dict[str, np.ndarray], *, source: str) -> Decoder:
  """Writes ``params`` (path -> array) into ``model``; every parameter must be given once.

  Raises naming the tensor on a missing, unexpected or mis-shaped parameter.
  """
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  expected = {"/".join(map(str, k)): k for k in flat}
  missing = sorted(set(expected) - set(params))
  if missing:
    raise GGUFImportError(f"{source}: missing tensors for {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''}")
  unexpected = sorted(set(params) - set(expected))
  if unexpected:
    raise GGUFImportError(f"{source}: unexpected tensors {unexpected[:8]}")
  for name, key in expected.items():
    variable = flat[key]
    if tuple(params[name].shape) != tuple(variable.shape):
      raise GGUFImportError(f"{source}: tensor '{name}' has shape {params[name].shape}, "
                            f"model expects {tuple(variable.shape)}")
    variable.set_value(jnp.asarray(params[name], variable.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_gguf(path: str | os.PathLike, *, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> Decoder:
  """A ``Decoder`` holding the dequantized weights of a Llama-family GGUF file."""
  config, params = read_gguf(path)
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype))
  return load_params(abstract, params, source=os.fspath(path))
