"""Preference data: TFDS builders, `load_preferences`, tokenization and grain pipelines.

Names are resolved lazily, so ``import prefjax.data`` stays cheap and a missing
sibling module (tokenize, pipeline) only fails when it is actually used.
"""

import importlib
from typing import Any

_EXPORTS = {
    "load_preferences": "prefjax.data.sources",
    "PreferenceSource": "prefjax.data.sources",
    "BadRowError": "prefjax.data.sources",
    "default_cache_dir": "prefjax.data.sources",
    "EmptyDataError": "prefjax.data.report",
    "BuildSummary": "prefjax.data.tfds_builders.base",
    "RowProblem": "prefjax.data.tfds_builders.rows",
    "PreferenceRow": "prefjax.data.tfds_builders.rows",
    "split_transcript": "prefjax.data.tfds_builders.rows",
    "resplit_name": "prefjax.data.tfds_builders.rows",
    "write_synthetic_dataset": "prefjax.data.tfds_builders.synthetic",
    "synthetic_root": "prefjax.data.tfds_builders.synthetic",
}
_SUBMODULES = ("sources", "tfds_builders", "tokenize", "pipeline", "report", "tiny_world")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return __all__
