"""Preference data: TFDS builders, `load_preferences`, tokenization and grain pipelines.

Names are resolved lazily (``prefjax._lazy``), so ``import prefjax.data`` stays cheap
and a missing sibling module (tokenize, pipeline) only fails when it is actually used.
"""

from prefjax import _lazy

_EXPORTS = {
    "load_preferences": "sources",
    "PreferenceSource": "sources",
    "BadRowError": "sources",
    "default_cache_dir": "sources",
    "EmptyDataError": "report",
    "BuildSummary": "tfds_builders.base",
    "RowProblem": "tfds_builders.rows",
    "PreferenceRow": "tfds_builders.rows",
    "split_transcript": "tfds_builders.rows",
    "resplit_name": "tfds_builders.rows",
    "conversation_key": "tfds_builders.rows",
    "write_synthetic_dataset": "tfds_builders.synthetic",
    "synthetic_root": "tfds_builders.synthetic",
}
_SUBMODULES = ("packing", "padding", "pipeline", "report", "sources", "tfds_builders", "tiny_world",
               "tokenize", "truncation")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
