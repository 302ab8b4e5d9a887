"""prefjax models: causal decoders, the BERT encoder, reward/value heads, checkpoint I/O.

Public names are imported lazily (PEP 562, ``prefjax._lazy``), so ``import prefjax.models``
is cheap.

  from_pretrained(path, *, head=None, dtype=None)   local HF dir or .gguf -> model
  save_pretrained(model, path, tokenizer=None)      model -> HF dir (reward models as
                                                    *ForSequenceClassification)
  Decoder, DecoderConfig                            Llama / GPT-2 families
  Encoder, EncoderConfig, sentence_embedding        BERT family (MiniLM)
  RewardModel, MultiHeadEnsemble, DeepEnsemble,
  MultiObjectiveRewardModel, ValueModel, attach_head
  generate, sequence_logps                          sampling and scoring
"""

from prefjax import _lazy

# name -> the module (relative to this package) that defines it.
_EXPORTS = {
    "from_pretrained": "hf_import",
    "save_pretrained": "hf_export",
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

_SUBMODULES = ("attention", "decoder", "encoder", "gguf_import", "heads", "hf_export", "hf_import",
               "hf_mappings", "layers", "sampling", "segments")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
