"""Shared TFDS machinery for preference builders: features, build summary, splits.

Every builder yields the same features, written as ArrayRecord (random access,
no TensorFlow needed; read back with ``builder.as_data_source()``):

  id        text     "<file name>:<line>" of the raw row (stable provenance)
  prompt    text
  chosen    text     response only (prompt excluded)
  rejected  text
  outcome   float32  1 = chosen preferred, 0 = rejected preferred, 0.5 = tie
  weight    float32  per-pair loss weight (default 1)
  meta      text     JSON object (dataset specific: votes, gold rewards, ...)

Examples keep the raw file order (shuffling is the input pipeline's job). Each
split also gets a `BuildSummary` and a content fingerprint, stored in the
dataset's TFDS metadata (``metadata.json`` next to the ArrayRecord shards).

Splits: the official ones found in the raw files, plus ``resplit_train``,
``resplit_validation`` and ``resplit_test``: all official rows re-split 80/10/10
by sha256 of the prompt's opening turn (`rows.resplit_name`), disjoint by
conversation.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import inspect
import json
import pathlib
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from prefjax.data.tfds_builders import rows as rows_lib

BUILD_SUMMARY_KEY = "summaries"
FINGERPRINT_KEY = "fingerprints"
INPUT_FILES_KEY = "input_files"
DATASET_META_KEY = "dataset"
TEXT_FIELDS = ("id", "prompt", "chosen", "rejected")

# Incremented once per actual build in this process (tests use it to prove caching).
build_count = 0

THIRD_PARTY_NOTE = (
    "See third_party/README.md in the prefjax repository for the licence and for "
    "how to obtain the raw files; point PREFJAX_DATA_DIR at their parent folder.")


@dataclasses.dataclass
class BuildSummary:
  """What happened to every raw row of one split: built, routed elsewhere, or skipped."""
  split: str
  rows_read: int = 0
  rows_built: int = 0
  rows_other_splits: int = 0  # resplit_* only: valid rows that hash to a sibling split
  skipped: list[rows_lib.RowProblem] = dataclasses.field(default_factory=list)
  notes: list[rows_lib.RowProblem] = dataclasses.field(default_factory=list)  # built anyway
  input_files: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> sha256

  @property
  def skipped_by_reason(self) -> dict[str, int]:
    return dict(collections.Counter(p.reason for p in self.skipped))

  def check_accounting(self) -> None:
    """No silent loss: every row read is built, routed to a sibling split, or skipped."""
    accounted = self.rows_built + self.rows_other_splits + len(self.skipped)
    if accounted != self.rows_read:
      raise AssertionError(
          f"split {self.split!r}: {self.rows_read} rows read but {self.rows_built} built + "
          f"{self.rows_other_splits} in other splits + {len(self.skipped)} skipped = {accounted}")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["skipped_by_reason"] = self.skipped_by_reason
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "BuildSummary":
    data = {k: v for k, v in data.items() if k != "skipped_by_reason"}
    for key in ("skipped", "notes"):
      data[key] = [rows_lib.RowProblem(**p) for p in data.get(key, [])]
    return cls(**data)

  def __str__(self) -> str:
    text = (f"split {self.split!r}: read {self.rows_read}, built {self.rows_built}, "
            f"skipped {len(self.skipped)} {self.skipped_by_reason or ''}".rstrip())
    if self.rows_other_splits:
      text += f", {self.rows_other_splits} in sibling resplit_* splits"
    if self.notes:
      text += f", notes {dict(collections.Counter(p.reason for p in self.notes))}"
    return text


class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: subclasses say where the raw files are and how to read a row."""

  # A new version rebuilds cached datasets: bump it when row checks change what is kept.
  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: ArrayRecord, build summaries, prompt-hash resplit.",
      "1.1.0": "Bad rows: a weight above 1e12, a meta that is not an object, a top-level "
               "key that contradicts meta's.",
      "1.2.0": "resplit_* by conversation: a transcript's opening human turn is hashed, "
               "not its whole prompt, so a dialogue's turns share a split.",
      "1.3.0": "Bad rows: a top-level key that is a near miss of a known field ('outcom', "
               "'weights'), which was kept in meta while the field took its default.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = THIRD_PARTY_NOTE
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  _unit = "line"  # how `RowProblem`s of this builder count rows: "line" or "item"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file.

    TFDS's default resolves it through `importlib_resources`, which TFDS does not
    install; the file path is all it needs (to look for a checksums file).
    """
    return epath.Path(inspect.getfile(cls))

  # TFDS prints these two messages to stdout, where they would lengthen a one-line error
  # about the data (a bad row found while building) and mix with a binary's own output.
  def _log_download_bytes(self) -> None:
    logging.info("building dataset %s from local files into %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("dataset %s built in %s; later loads reuse it", self.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = tfds.features.FeaturesDict({
        **{name: text for name in TEXT_FIELDS},
        "outcome": tfds.features.Scalar(np.float32),
        "weight": tfds.features.Scalar(np.float32),
        "meta": tfds.features.Text(),
    })
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=features,
        homepage=self.HOMEPAGE or None, citation=self.CITATION or None,
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  @abc.abstractmethod
  def _official_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, list[pathlib.Path]]:
    """Split name -> raw files, in reading order."""

  @abc.abstractmethod
  def _read_rows(self, path: pathlib.Path
                 ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
    """(line or item number, row or problem) for every raw row of ``path``."""

  def _dataset_metadata(self) -> dict[str, Any]:
    """Dataset-level facts stored with the build (e.g. a synthetic label-noise rate)."""
    return {}

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    global build_count
    build_count += 1
    official = self._official_splits(dl_manager)
    clashes = [s for s in official if s.startswith(rows_lib.RESPLIT_PREFIX)]
    if clashes:
      raise ValueError(f"raw split names {clashes} clash with the generated resplit_* splits")
    files = [p for paths in official.values() for p in paths]
    metadata = self.info.metadata
    metadata[INPUT_FILES_KEY] = {str(p): rows_lib.file_sha256(p) for p in files}
    metadata[DATASET_META_KEY] = self._dataset_metadata()
    metadata[BUILD_SUMMARY_KEY] = {}
    metadata[FINGERPRINT_KEY] = {}
    generators = {name: self._generate_examples(name, paths, None)
                  for name, paths in official.items()}
    for bucket, _ in rows_lib.RESPLIT_BUCKETS:
      name = rows_lib.RESPLIT_PREFIX + bucket
      generators[name] = self._generate_examples(name, files, bucket)
    nonempty = self._nonempty_splits(official)
    for name in [n for n in generators if n not in nonempty]:
      # TFDS cannot write an empty split: run it here so that its summary is recorded.
      for _ in generators.pop(name):
        raise AssertionError(f"split {name!r} was expected to be empty")
    return generators

  def _nonempty_splits(self, official: dict[str, list[pathlib.Path]]) -> set[str]:
    """Names of the splits (official and resplit_*) that will hold at least one row."""
    nonempty = set()
    for name, paths in official.items():
      for path in paths:
        for _, row in self._read_rows(path):
          if isinstance(row, rows_lib.PreferenceRow):
            nonempty.update((name, rows_lib.RESPLIT_PREFIX + rows_lib.resplit_name(row.prompt)))
    return nonempty

  def _generate_examples(self, split: str, paths: list[pathlib.Path], bucket: str | None):
    """Yields (key, example); records the split's summary and fingerprint at the end.

    In resplit_* splits a row that fails validation is listed as skipped in all
    three summaries: it belongs to none of them.
    """
    summary = BuildSummary(split=split, input_files={
        str(p): self.info.metadata[INPUT_FILES_KEY][str(p)] for p in paths})
    content = hashlib.sha256(f"{self.name}/{self.VERSION}/{split}".encode())
    first_of: dict[tuple[str, str, str], str] = {}  # a pair's text -> the id that had it first
    for path in paths:
      for line, row in self._read_rows(path):
        summary.rows_read += 1
        if isinstance(row, rows_lib.RowProblem):
          summary.skipped.append(row)
          continue
        if bucket is not None and rows_lib.resplit_name(row.prompt) != bucket:
          summary.rows_other_splits += 1
          continue
        summary.notes.extend(rows_lib.RowProblem(str(path), line, reason, detail, self._unit)
                             for reason, detail in row.notes)
        row_id = f"{path.name}:{line}" if self._unit == "line" else f"{path.name} item {line}"
        first = first_of.setdefault((row.prompt, row.chosen, row.rejected), row_id)
        if first != row_id:  # built anyway; eval_rm's intervals resample repeats together
          summary.notes.append(rows_lib.RowProblem(
              str(path), line, "duplicate_pair", f"same prompt and responses as {first}",
              self._unit))
        example = _example(row_id, row)
        content.update(json.dumps(example, sort_keys=True).encode("utf-8"))
        summary.rows_built += 1
        yield example["id"], example
    summary.check_accounting()
    self.info.metadata[BUILD_SUMMARY_KEY][split] = summary.to_json()
    self.info.metadata[FINGERPRINT_KEY][split] = content.hexdigest()


def _example(row_id: str, row: rows_lib.PreferenceRow) -> dict[str, Any]:
  meta = json.dumps(rows_lib.to_jsonable(dict(row.meta)), sort_keys=True, ensure_ascii=False)
  return {"id": row_id, "prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected,
          "outcome": float(row.outcome), "weight": float(row.weight), "meta": meta}


def read_jsonl_rows(path: pathlib.Path, *, layout: str, allow_empty: bool = False
                    ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
  """Rows of a (gzipped) JSONL preference file, each validated or turned into a problem."""
  for line, value in rows_lib.iter_json_lines(path):
    if isinstance(value, rows_lib.RowProblem):
      yield line, value
      continue
    try:
      yield line, rows_lib.parse_preference_object(value, layout=layout,
                                                      allow_empty=allow_empty)
    except rows_lib.RowError as e:
      yield line, rows_lib.RowProblem(str(path), line, e.reason, e.detail)
