"""Synthetic preference datasets written by study code from a gold reward.

The overoptimization studies label pairs with a gold reward (optionally with
label noise) and save them with `write_synthetic_dataset`; experiments then read
them back like any dataset: ``load_preferences("synthetic:NAME", "train")``.

On disk, ``{root}/{NAME}/`` holds ``preferences.jsonl`` (one {"prompt", "chosen",
"rejected", "outcome", "weight", "meta"} per line) and ``metadata.json``
({"name", "label_noise", "gold_name", "meta", "num_rows", "data_sha256",
"format_version"}). ``root`` defaults to ``$PREFJAX_SYNTHETIC_DIR`` or
``~/.cache/prefjax/synthetic``. The metadata (label-noise rate, gold reward
name, ...) is available as ``source.metadata`` on the loaded source. As with
user JSONL, the build cache is keyed by the files' content hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping

import tensorflow_datasets as tfds

from prefjax import files
from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import preference_jsonl
from prefjax.data.tfds_builders import rows as rows_lib

SYNTHETIC_DIR_ENV = "PREFJAX_SYNTHETIC_DIR"
DATA_FILE = "preferences.jsonl"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def synthetic_root(root: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Where synthetic datasets live: ``root``, ``$PREFJAX_SYNTHETIC_DIR`` or the user cache."""
  if root is None:
    root = os.environ.get(SYNTHETIC_DIR_ENV) or "~/.cache/prefjax/synthetic"
  return pathlib.Path(root).expanduser().resolve()


def dataset_exists(name: str, root: str | os.PathLike[str] | None = None) -> bool:
  """Whether ``synthetic:NAME`` has been written completely (its metadata is written last)."""
  return (synthetic_root(root) / name / METADATA_FILE).exists()


def write_synthetic_dataset(name: str, rows: Iterable[Mapping[str, Any]], *,
                            label_noise: float, gold_name: str,
                            meta: Mapping[str, Any] | None,
                            root: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Validates and writes a synthetic dataset; returns its folder.

  Args:
    name: dataset name (letters, digits, "_", ".", "-"); loaded as "synthetic:NAME".
    rows: dicts with prompt/chosen/rejected (text) and optional outcome, weight and
      meta (numpy values are converted, e.g. gold rewards of both responses).
    label_noise: probability in [0, 1] that a label was flipped/sampled against the
      gold preference when the data was made.
    gold_name: which gold reward labelled the pairs.
    meta: any other facts about the generation (seed, policy, sampler, ...).
    root: parent folder; see `synthetic_root`.

  Raises:
    ValueError: naming the row index and the problem, before anything is written.
  """
  if not _NAME.match(name):
    raise ValueError(f"synthetic dataset name {name!r} must match {_NAME.pattern}")
  if isinstance(label_noise, bool) or not (
      isinstance(label_noise, (int, float)) and math.isfinite(label_noise)
      and 0.0 <= label_noise <= 1.0):
    raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise!r}")
  if not isinstance(gold_name, str) or not gold_name:
    raise ValueError(f"gold_name must be a non-empty string, got {gold_name!r}")
  lines = [files.dumps(_canonical_row(i, row), sort_keys=True, ensure_ascii=False)
           for i, row in enumerate(rows)]
  if not lines:
    raise ValueError(f"synthetic dataset {name!r} has no rows")
  data = ("\n".join(lines) + "\n").encode("utf-8")
  metadata = {"name": name, "label_noise": float(label_noise), "gold_name": gold_name,
              "meta": rows_lib.to_jsonable(dict(meta or {})), "num_rows": len(lines),
              "data_sha256": hashlib.sha256(data).hexdigest(),
              "format_version": FORMAT_VERSION}
  folder = synthetic_root(root) / name
  folder.mkdir(parents=True, exist_ok=True)
  files.write_atomically(folder / DATA_FILE, lambda f: f.write(data))
  files.write_atomically(folder / METADATA_FILE,
                         lambda f: f.write(files.dumps(metadata, indent=2, sort_keys=True)),
                         mode="w")
  return folder


def _canonical_row(index: int, row: Mapping[str, Any]) -> dict[str, Any]:
  try:
    parsed = rows_lib.parse_preference_object(
        rows_lib.to_jsonable(dict(row)), layout="prompt")
  except rows_lib.RowError as e:
    raise ValueError(f"synthetic row {index}: {e.reason}: {e.detail}") from e
  return {"prompt": parsed.prompt, "chosen": parsed.chosen, "rejected": parsed.rejected,
          "outcome": parsed.outcome, "weight": parsed.weight, "meta": dict(parsed.meta)}


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """A synthetic dataset folder; ``name`` embeds the content hash of both files."""
  folder: str = ""


def config_for_folder(folder: str | os.PathLike[str]) -> SyntheticConfig:
  """The builder config of a dataset folder written by `write_synthetic_dataset`."""
  folder = pathlib.Path(folder).expanduser().resolve()
  paths = [folder / DATA_FILE, folder / METADATA_FILE]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f"synthetic dataset {folder} is incomplete, missing {missing}; "
        "write it with prefjax.data.write_synthetic_dataset")
  sha = hashlib.sha256("".join(rows_lib.file_sha256(p) for p in paths).encode()).hexdigest()
  return SyntheticConfig(name=preference_jsonl.content_config_name(folder.name, sha),
                         folder=str(folder), description=f"synthetic preferences in {folder}")


class SyntheticPreferences(base.PreferenceBuilder, skip_registration=True):
  """Preference pairs labelled by a gold reward (config from `config_for_folder`)."""

  name = "synthetic_preferences"
  DESCRIPTION = __doc__

  def _metadata_file(self) -> dict[str, Any]:
    path = pathlib.Path(self.builder_config.folder) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8"))

  def _dataset_metadata(self) -> dict[str, Any]:
    return self._metadata_file()

  def _official_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, list[pathlib.Path]]:
    del dl_manager  # the folder lives in the config
    path = pathlib.Path(self.builder_config.folder) / DATA_FILE
    expected = self._metadata_file().get("data_sha256")
    if rows_lib.file_sha256(path) != expected:
      raise ValueError(f"{path} does not match the data_sha256 in its {METADATA_FILE}: "
                       "it was edited or cut short after write_synthetic_dataset wrote it")
    return {"train": [path]}

  def _read_rows(self, path: pathlib.Path
                 ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
    return base.read_jsonl_rows(path, layout="prompt")
