"""Your own preference data: a JSONL file, the documented way to bring new data.

Load it with ``load_preferences("jsonl:/path/to/file.jsonl", "train")``. One JSON
object per line (``.jsonl`` or ``.jsonl.gz``), in any of three layouts:

  {"prompt": "...", "chosen": " response A", "rejected": " response B"}
  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: A", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: B"}
  {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", ...}], ...}

The second layout (full transcripts) is split like HH-RLHF, at the last
"\\n\\nAssistant:" both share; the third (chat messages, TRL's conversational format, with
an explicit or implicit prompt) is stored in that transcript layout (`chat_rows`).
Optional per row: ``weight`` (>= 0, default 1), ``outcome`` in [0, 1] (default 1 = chosen
preferred, 0.5 = tie) and ``meta`` (an object); any other key is kept in ``meta``. Bad rows
are reported by line (see `rows` for the reasons).

The whole file is one split, ``train``, plus the conversation-hash ``resplit_*``
splits. The build cache is keyed by the file's sha256 (it is part of the
builder config name), so editing the file triggers a fresh build.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Iterator

import tensorflow_datasets as tfds

from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import rows as rows_lib


@dataclasses.dataclass
class JsonlConfig(tfds.core.BuilderConfig):
  """A user JSONL file; ``name`` embeds the file's content hash."""
  path: str = ""
  sha256: str = ""
  layout: str = "auto"


def content_config_name(label: str, sha256: str) -> str:
  """A TFDS-safe config name: sanitised label + first 16 hex digits of the content hash."""
  safe = re.sub(r"[^a-z0-9_.]+", "_", label.lower()).strip("._") or "data"
  return f"{safe[:48]}-{sha256[:16]}"


def config_for_file(path: str | pathlib.Path, *, layout: str = "auto") -> JsonlConfig:
  """The builder config of ``path`` as it is now (hashes the file)."""
  path = pathlib.Path(path).expanduser().resolve()
  if not path.is_file():
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise FileNotFoundError(f"preference JSONL file {path} {what}")
  sha = rows_lib.file_sha256(path)
  return JsonlConfig(name=content_config_name(path.name, sha), path=str(path), sha256=sha,
                     layout=layout, description=f"user preferences from {path}")


class PreferenceJsonl(base.PreferenceBuilder, skip_registration=True):
  """Preference pairs from a user JSONL file (config from `config_for_file`)."""

  name = "preference_jsonl"
  DESCRIPTION = __doc__
  VERSION = tfds.core.Version("1.4.0")
  RELEASE_NOTES = {**base.PreferenceBuilder.RELEASE_NOTES,
                   "1.4.0": "Rows whose fields are lists of chat messages (`chat_rows`), which "
                            "were wrong_type rows before."}

  def _official_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, list[pathlib.Path]]:
    del dl_manager  # the file path lives in the config
    config = self.builder_config
    path = pathlib.Path(config.path)
    if rows_lib.file_sha256(path) != config.sha256:
      raise RuntimeError(f"{path} changed while it was being built; load it again")
    return {"train": [path]}

  def _read_rows(self, path: pathlib.Path
                 ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
    return base.read_jsonl_rows(path, layout=self.builder_config.layout)
