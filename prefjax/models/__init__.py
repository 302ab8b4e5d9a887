"""prefjax models: causal decoders, the BERT encoder, reward/value heads, checkpoint I/O.

Public names are imported lazily (PEP 562), so ``import prefjax.models`` is cheap.

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

# name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "from_pretrained": "hf_import",
    "save_pretrained": "hf_import",
    "load_hf_checkpoint": "hf_import",
    "CheckpointError": "hf_import",
    "Decoder": "decoder",
    "DecoderConfig": "decoder",
    "Encoder": "encoder",
    "EncoderConfig": "encoder",
    "sentence_embedding": "encoder",
    "RewardModel": "heads",
    "MultiHeadEnsemble": "heads",
    "DeepEnsemble": "heads",
    "MultiObjectiveRewardModel": "heads",
    "ValueModel": "heads",
    "attach_head": "heads",
    "ensemble_partition_rules": "heads",
    "load_gguf": "gguf_import",
    "generate": "sampling",
    "sequence_logps": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'prefjax.models' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
