"""Writing AI-labelled pairs as a JSONL preference file that ``load_preferences`` reads back.

Rows are ``{prompt, chosen, rejected, outcome, meta}`` (the ``jsonl:PATH`` layout of
``prefjax.data.tfds_builders.preference_jsonl``); the file is replaced atomically.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from prefjax import files
from prefjax.data import sources


def write_preferences(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes ``rows`` to ``path``; returns the dataset name ``jsonl:PATH``."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.write_atomically(
      path, lambda f: f.writelines(files.dumps(row, ensure_ascii=False) + "\n"
                                   for row in rows), mode="w")
  return f"jsonl:{path}"


def read_back(name: str, *, cache_dir: str | None = None) -> sources.PreferenceSource:
  """Opens a written file through ``load_preferences`` (every row must be valid)."""
  return sources.load_preferences(name, "train", data_dir=cache_dir or None)
