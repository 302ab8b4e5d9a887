"""`load_preferences`: one call from a dataset name to a random-access source of pairs.

Names:
  ``hh_rlhf/<config>``  HH-RLHF tranche (harmless-base, helpful-base, helpful-online,
                        helpful-rejection-sampled); splits: the official files + resplit_*
  ``pandalm``           PandaLM human test set; splits: test + resplit_*
  ``jsonl:PATH``        your own JSONL file (see `tfds_builders.preference_jsonl`);
                        splits: train + resplit_*
  ``synthetic:NAME``    written by `write_synthetic_dataset` (NAME, or a folder path);
                        splits: train + resplit_*

The first load builds the TFDS dataset (ArrayRecord) into ``data_dir`` (default
``$PREFJAX_CACHE_DIR`` or ``~/.cache/prefjax/tfds``); later loads reuse it. A
build is redone when the raw files' content changes (user files are keyed by
their hash; for HH-RLHF and PandaLM the recorded input hashes are checked).
Processes that share ``data_dir`` build each dataset version once: a build holds
a lock file beside it, and the others wait for it, then read what it built.

Bad rows never vanish: each build records, per split, rows read / built /
skipped, with file:line and reason for every skip (`BuildSummary`). With
``on_bad_row="error"`` (default) a split with any bad row raises `BadRowError`
listing them; with ``"skip"`` the source is returned, the skips are logged and
stay listed in ``source.summary``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import difflib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
import types
from typing import Any, Sequence

import tensorflow_datasets as tfds

from prefjax import assets
from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import hh_rlhf
from prefjax.data.tfds_builders import pandalm
from prefjax.data.tfds_builders import preference_jsonl
from prefjax.data.tfds_builders import rows as rows_lib
from prefjax.data.tfds_builders import synthetic

CACHE_DIR_ENV = "PREFJAX_CACHE_DIR"
ON_BAD_ROW_MODES = ("error", "skip")
_MAX_LISTED = 20
_log = logging.getLogger(__name__)


class BadRowError(ValueError):
  """A split has rows that could not be built; the message lists file:line and reason."""

  def __init__(self, dataset: str, summary: base.BuildSummary):
    self.dataset = dataset
    self.summary = summary
    self.problems = list(summary.skipped)
    listed = "\n".join(f"  {p}" for p in self.problems[:_MAX_LISTED])
    more = len(self.problems) - _MAX_LISTED
    if more > 0:
      listed += f"\n  ... and {more} more"
    super().__init__(
        f"{dataset} split {summary.split!r}: {len(self.problems)} bad row(s) of "
        f"{summary.rows_read} read {summary.skipped_by_reason}:\n{listed}\n"
        "Fix the input, or drop these rows with --config.data.on_bad_row=skip "
        "(load_preferences(..., on_bad_row='skip')); they stay counted in source.summary.")


def default_cache_dir() -> pathlib.Path:
  """TFDS build/cache directory: ``$PREFJAX_CACHE_DIR`` or ``~/.cache/prefjax/tfds``."""
  return pathlib.Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/prefjax/tfds").expanduser()


class PreferenceSource(collections.abc.Sequence):
  """Random-access preference pairs (``len`` + ``__getitem__``), grain-compatible.

  Each item is a dict: ``id`` (raw file:line), ``prompt``, ``chosen``,
  ``rejected`` (str), ``outcome``, ``weight`` (float) and ``meta`` (dict).

  Attributes:
    name: the dataset name given to `load_preferences`.
    split: the split (TFDS slicing like "train[:10%]" allowed).
    summary: `BuildSummary` of the split's build (rows read/built/skipped, notes).
    fingerprint: stable sha256 of the split's content; keys downstream caches.
    metadata: dataset-level facts (e.g. ``label_noise`` of a synthetic dataset).
    cache_hit: False when this call built the dataset.
    path: the directory holding the built ArrayRecord shards.
  """

  def __init__(self, data_source: Sequence[dict[str, Any]], *, name: str, split: str,
               summary: base.BuildSummary, fingerprint: str, metadata: dict[str, Any],
               cache_hit: bool, path: str):
    self._data = data_source
    self.name = name
    self.split = split
    self.summary = summary
    self.fingerprint = fingerprint
    self.metadata = metadata
    self.cache_hit = cache_hit
    self.path = path

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.__getitems__(range(*index.indices(len(self))))
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} pairs")
    return _decode(self._data[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    if hasattr(self._data, "__getitems__"):
      return [_decode(x) for x in self._data.__getitems__(indices)]
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return (f"PreferenceSource({self.name!r}, split={self.split!r}, len={len(self)}, "
            f"fingerprint={self.fingerprint[:12]}, skipped={len(self.summary.skipped)})")


def _decode(example: dict[str, Any]) -> dict[str, Any]:
  out = {k: _text(example[k]) for k in base.TEXT_FIELDS}
  out["outcome"] = float(example["outcome"])
  out["weight"] = float(example["weight"])
  out["meta"] = json.loads(_text(example["meta"]))
  return out


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _builder_for(name: str, data_dir: str, manual_dir: str | os.PathLike[str] | None
                 ) -> tuple[base.PreferenceBuilder, pathlib.Path | None]:
  """(builder, manual dir or None) for a dataset name."""
  if name.startswith("jsonl:"):
    config = preference_jsonl.config_for_file(name[len("jsonl:"):])
    return preference_jsonl.PreferenceJsonl(config=config, data_dir=data_dir), None
  if name.startswith("synthetic:"):
    ref = name[len("synthetic:"):]
    is_path = os.sep in ref or "/" in ref
    folder = pathlib.Path(ref) if is_path else synthetic.synthetic_root(manual_dir) / ref
    config = synthetic.config_for_folder(folder)
    return synthetic.SyntheticPreferences(config=config, data_dir=data_dir), None
  if name == "pandalm":
    manual = _manual_dir(manual_dir, "pandalm")
    return pandalm.Pandalm(data_dir=data_dir), manual
  if name.startswith("hh_rlhf/") and name.split("/", 1)[1] in hh_rlhf.CONFIG_NAMES:
    manual = _manual_dir(manual_dir, "hh_rlhf")
    return hh_rlhf.HhRlhf(config=name.split("/", 1)[1], data_dir=data_dir), manual
  check_dataset_name(name)  # raises: no builder above reads this name
  raise AssertionError(f"{name!r} passed check_dataset_name but no builder reads it")


def check_dataset_name(name: str, *, also: Sequence[str] = ()) -> None:
  """Raises ``ValueError`` naming the known datasets (and the closest) unless ``name`` is
  one ``load_preferences`` reads, or in ``also`` (names a binary adds: ``tiny_world``)."""
  if name in also or name == "pandalm" or name.startswith(("jsonl:", "synthetic:")) or (
      name.startswith("hh_rlhf/") and name.split("/", 1)[1] in hh_rlhf.CONFIG_NAMES):
    return
  known = [*also, *(f"hh_rlhf/{c}" for c in hh_rlhf.CONFIG_NAMES), "pandalm", "jsonl:PATH",
           "synthetic:NAME"]
  near = difflib.get_close_matches(name, known, n=1)
  raise ValueError(f"unknown preference dataset {name!r}"
                   + (f" (did you mean {near[0]!r}?)" if near else "") + f"; known: {known}")


def _manual_dir(override: str | os.PathLike[str] | None, subdir: str) -> pathlib.Path:
  manual = pathlib.Path(override) if override else assets.data_dir() / subdir
  if not manual.is_dir():
    raise assets.AssetNotFoundError(
        f"raw data folder {manual} not found; set {assets.DATA_DIR_ENV} (or pass "
        f"manual_dir=). {base.THIRD_PARTY_NOTE}")
  return manual


def _current_inputs(builder: base.PreferenceBuilder, manual: pathlib.Path | None
                    ) -> dict[str, str]:
  """{file name: sha256} of the raw files a build would read now."""
  splits = builder._official_splits(types.SimpleNamespace(manual_dir=manual))  # pylint: disable=protected-access
  files = [p for paths in splits.values() for p in paths]
  return {p.name: rows_lib.file_sha256(p) for p in files}


def _recorded_inputs(builder: base.PreferenceBuilder) -> dict[str, str]:
  recorded = builder.info.metadata.get(base.INPUT_FILES_KEY, {}) if builder.info.metadata else {}
  return {pathlib.Path(p).name: sha for p, sha in recorded.items()}


def _prepare(builder: base.PreferenceBuilder, manual: pathlib.Path | None) -> None:
  config = tfds.download.DownloadConfig(manual_dir=str(manual)) if manual else None
  builder.download_and_prepare(file_format="array_record", download_config=config)


def load_preferences(name: str, split: str, *,
                     data_dir: str | os.PathLike[str] | None = None,
                     on_bad_row: str = "error",
                     manual_dir: str | os.PathLike[str] | None = None) -> PreferenceSource:
  """Builds (once, cached) and opens a preference dataset split.

  Args:
    name: ``hh_rlhf/<config>``, ``pandalm``, ``jsonl:PATH`` or ``synthetic:NAME``.
    split: a split name, e.g. "test", "train", "resplit_train"; TFDS slicing allowed.
    data_dir: TFDS build/cache directory (default `default_cache_dir()`); never the
      read-only raw data folder.
    on_bad_row: "error" raises `BadRowError` when the split has bad rows; "skip"
      drops them, logs them and lists them in ``source.summary``.
    manual_dir: the raw files' folder (HH-RLHF: holds ``{config}/{split}.jsonl.gz``;
      PandaLM: holds ``testset-v1.json``; synthetic: the root holding NAME/).
      Default: ``prefjax.assets.data_dir()/{hh_rlhf,pandalm}`` and `synthetic_root()`.

  Returns:
    A `PreferenceSource`.
  """
  if on_bad_row not in ON_BAD_ROW_MODES:
    raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_MODES}, got {on_bad_row!r}")
  cache = str(pathlib.Path(data_dir or default_cache_dir()).expanduser().resolve())
  builder, manual = _builder_for(name, cache, manual_dir)
  current_inputs = functools.cache(functools.partial(_current_inputs, builder, manual))
  cache_hit = _up_to_date(builder, manual, current_inputs)
  if not cache_hit:
    with _build_lock(builder, name):
      # Another process may have built it while this one waited; a new builder reads that.
      builder, manual = _builder_for(name, cache, manual_dir)
      cache_hit = _up_to_date(builder, manual, current_inputs)
      if not cache_hit:
        if builder.is_prepared():
          _log.warning("%s: raw files changed since %s was built; rebuilding", name,
                       builder.data_dir)
          shutil.rmtree(builder.data_dir)
          builder, manual = _builder_for(name, cache, manual_dir)
        _prepare(builder, manual)
        _check_inputs_did_not_change(builder, manual, name)
  return _open_split(builder, name, split, on_bad_row, cache_hit)


def _check_inputs_did_not_change(builder: base.PreferenceBuilder, manual: pathlib.Path | None,
                                 name: str) -> None:
  """Each split reads the raw files anew: a file written to during the build (a labelling
  job appending to it) would leave splits built from different contents."""
  try:
    changed = _current_inputs(builder, manual) != _recorded_inputs(builder)
  except RuntimeError:  # a JSONL builder's own check of its file's hash
    changed = True
  if changed:
    shutil.rmtree(builder.data_dir, ignore_errors=True)
    raise ValueError(f"{name}: its raw files changed while it was being built, so its "
                     "splits would hold different contents; the build was discarded: load "
                     "it again once nothing writes to them")


def _up_to_date(builder: base.PreferenceBuilder, manual: pathlib.Path | None,
                current_inputs: collections.abc.Callable[[], dict[str, str]]) -> bool:
  """Built, and (for raw files read from ``manual``) from the files there now."""
  return builder.is_prepared() and (manual is None or
                                    _recorded_inputs(builder) == current_inputs())


@contextlib.contextmanager
def _build_lock(builder: base.PreferenceBuilder, name: str):
  """Holds an exclusive lock on a file beside ``builder.data_dir``.

  Two processes building one dataset version at once (a sweep launched on a cold
  cache) collide when TFDS renames its temporary folder to the version folder. The
  holder removes the temporary folders of builds killed before it (none else can
  be live).
  """
  data_dir = pathlib.Path(builder.data_dir)
  try:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir.parent / f".{data_dir.name}.lock", "a", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise OSError(f"{name}: cannot write the dataset cache {data_dir.parent} ({e.strerror}); "
                  f"set {CACHE_DIR_ENV} to a writable folder") from e
  with lock:
    if not _wait_for_lock(lock, name, data_dir):
      yield
      return
    try:
      for orphan in data_dir.parent.glob(f"incomplete.*_{data_dir.name}"):
        _log.info("%s: removing %s, left by a build that was stopped", name, orphan)
        shutil.rmtree(orphan, ignore_errors=True)
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


_WAIT_LOG_EVERY_S = 60.0


def _wait_for_lock(lock: Any, name: str, data_dir: pathlib.Path) -> bool:
  """Takes the lock, logging while another process holds it; False where the filesystem
  has no locks (then the build runs unlocked, with a warning)."""
  waited = 0.0
  while True:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      if waited % _WAIT_LOG_EVERY_S == 0:
        _log.info("%s: waiting for another process building %s (%.0f s so far)", name,
                  data_dir, waited)
      time.sleep(1.0)
      waited += 1.0
    except OSError as e:
      if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
        raise
      _log.warning("%s: this filesystem has no flock (%s): building %s without the lock that "
                   "keeps two builds apart", name, e.strerror, data_dir)
      return False


def _as_read_from(summary: base.BuildSummary, path: str) -> base.BuildSummary:
  """A user file's build summary naming ``path``: the build cache is keyed by the file's name
  and content, so a copy elsewhere (or a moved file) reads a build another path made, whose
  bad rows and notes named that path, perhaps deleted since."""
  if len(summary.input_files) != 1 or path in summary.input_files:
    return summary
  (built_from, sha256), = summary.input_files.items()
  relocate = lambda p: dataclasses.replace(p, file=path) if p.file == built_from else p  # noqa: E731
  return dataclasses.replace(summary, skipped=[relocate(p) for p in summary.skipped],
                             notes=[relocate(p) for p in summary.notes],
                             input_files={path: sha256})


def _open_split(builder: base.PreferenceBuilder, name: str, split: str, on_bad_row: str,
                cache_hit: bool) -> PreferenceSource:
  base_split = split.split("[", 1)[0]
  metadata = builder.info.metadata
  if base_split not in metadata[base.BUILD_SUMMARY_KEY]:
    raise ValueError(f"{name} has no split {base_split!r}; available: "
                     f"{sorted(metadata[base.BUILD_SUMMARY_KEY])}")
  summary = base.BuildSummary.from_json(metadata[base.BUILD_SUMMARY_KEY][base_split])
  if getattr(builder.builder_config, "path", ""):
    summary = _as_read_from(summary, builder.builder_config.path)
  if summary.skipped:
    if on_bad_row == "error":
      raise BadRowError(name, summary)
    _log.warning("%s: skipped bad rows: %s; first: %s", name, summary, summary.skipped[0])
  if summary.notes:
    _log.info("%s: %d notes on built rows; first: %s", name, len(summary.notes), summary.notes[0])
  fingerprint = metadata[base.FINGERPRINT_KEY][base_split]
  if split != base_split:
    fingerprint = hashlib.sha256(f"{fingerprint}{split}".encode()).hexdigest()
  # TFDS cannot store an empty split (e.g. a resplit of a tiny file): its summary exists.
  try:
    data = builder.as_data_source(split) if base_split in builder.info.splits else []
  except ValueError as e:  # TFDS: "Paths sequence can not be of 0 length" for train[5:5]
    if split == base_split:
      raise
    rows = builder.info.splits[base_split].num_examples
    what = ("is not a TFDS slice (e.g. train[:90%], train[100:200])" if "parsing" in str(e)
            else f"selects no row of the {rows} in {base_split!r}")
    raise ValueError(f"{name}: the split {split!r} {what} ({str(e).splitlines()[0]})") from e
  return PreferenceSource(
      data, name=name, split=split, summary=summary,
      fingerprint=fingerprint, metadata=dict(metadata.get(base.DATASET_META_KEY, {})),
      cache_hit=cache_hit, path=str(builder.data_dir))
