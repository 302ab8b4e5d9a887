"""prefjax models: causal decoders, the BERT encoder, reward/value heads, checkpoint I/O.

Public names are imported lazily (PEP 562), so ``import prefjax.models`` is cheap
and works even while optional modules are absent.

  from_pretrained(path, *, head=None, dtype=None)   local HF dir or .gguf -> model
  save_pretrained(model, path)                      decoder/encoder -> HF dir
  Decoder, DecoderConfig                            Llama / GPT-2 families
  Encoder, EncoderConfig, sentence_embedding        BERT family (MiniLM)
  RewardModel, MultiHeadEnsemble, DeepEnsemble,
  MultiObjectiveRewardModel, ValueModel, attach_head
  generate, sequence_logps                          sampling and scoring
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> modules (relative to this package) that may define it, first hit wins.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "from_pretrained": ("hf_import",),
    "save_pretrained": ("hf_import",),
    "load_hf_checkpoint": ("hf_import",),
    "CheckpointError": ("hf_import",),
    "Decoder": ("decoder",),
    "DecoderConfig": ("decoder",),
    "Encoder": ("encoder",),
    "EncoderConfig": ("encoder",),
    "sentence_embedding": ("encoder",),
    "RewardModel": ("heads",),
    "MultiHeadEnsemble": ("heads",),
    "DeepEnsemble": ("heads",),
    "MultiObjectiveRewardModel": ("heads",),
    "ValueModel": ("heads",),
    "attach_head": ("heads",),
    "ensemble_partition_rules": ("heads",),
    "load_gguf": ("gguf_import",),
    "generate": ("sampling",),
    "sequence_logps": ("sampling", "decoder", "logprobs"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  modules = _EXPORTS.get(name)
  if modules is None:
    raise AttributeError(f"module 'prefjax.models' has no attribute {name!r}")
  errors = []
  for module_name in modules:
    try:
      module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{module_name}":
        raise
      errors.append(f"prefjax.models.{module_name} does not exist")
      continue
    if hasattr(module, name):
      value = getattr(module, name)
      globals()[name] = value
      return value
    errors.append(f"prefjax.models.{module_name} has no {name!r}")
  raise AttributeError(f"prefjax.models.{name} is unavailable: {'; '.join(errors)}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
