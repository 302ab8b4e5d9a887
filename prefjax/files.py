"""Files replaced whole (``write_atomically``); a workdir held by one run (``exclusive``);
standard JSON for every JSON file the project writes (``dumps``, ``read_json``); the
source hash caches key on (``source_digest``); a finished run's figures moved in from
their staging folder (``publish_figures``); an ``.npz`` read whole (``read_npz``); a long
job's arrays saved chunk by chunk so that it resumes (``PartialArrays``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import inspect
import json
import math
import os
import pathlib
import shutil
import threading
import time
from types import ModuleType
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

import numpy as np
from absl import logging


def write_atomically(path: str | os.PathLike[str], fill: Callable[[IO[Any]], None],
                     mode: str = "wb") -> None:
  """Writes ``path`` through ``fill(file)``, then puts it in place in one rename.

  ``fill`` writes into a hidden temporary file beside ``path``, named for this
  process and thread. Readers see the old file or the whole new one, never part of
  a write, and writers of one path at the same time each leave a whole file (the
  last rename wins). ``mode``: "wb", or "w" for UTF-8 text.
  """
  if mode not in ("wb", "w"):
    raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
  try:
    with open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
      fill(f)
    os.replace(tmp, path)
  except BaseException as e:
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a full disk
      raise OSError(e.errno, e.strerror, str(path)) from e
    raise


def make_workdir(workdir: str | os.PathLike[str], *,
                 known_entries: tuple[str, ...] = ()) -> str:
  """Creates ``workdir`` (a local or mounted path) and returns it absolute.

  Refuses a URL (every workdir file is written by POSIX rename, append and lock), a
  file, and a folder this user cannot write or whose ``WRITTEN_ENTRIES`` it cannot; warns when an existing folder holds
  entries other than ``known_entries`` and the lock yet no ``known_entries[0]`` (the
  record an earlier run leaves first).
  """
  if "://" in os.fspath(workdir):
    raise ValueError(
        f"--workdir={workdir}: workdirs are local paths (prefjax writes them by POSIX "
        "rename, append and lock); mount the bucket (e.g. with gcsfuse) and pass its path")
  path = pathlib.Path(workdir).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir={workdir} is a file, not a directory")
  fresh = not path.exists()
  path.mkdir(parents=True, exist_ok=True)
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"--workdir={path} is not writable by this user")
  for name in WRITTEN_ENTRIES:  # else found at the first save or log line, maybe hours in
    entry = path / name
    if entry.exists() and not os.access(entry, os.W_OK | (os.X_OK if entry.is_dir() else 0)):
      raise PermissionError(f"{entry} is not writable by this user: a run writes into it")
  known = {*known_entries, LOCK_FILE}
  if (not fresh and known_entries and not (path / known_entries[0]).exists()
      and any(entry.name not in known for entry in path.iterdir())):
    logging.warning("--workdir=%s already holds files no prefjax run wrote; this run's "
                    "outputs go beside them", path)
  return str(path)


LOCK_FILE = ".lock"
# What runs write into or append to in place (every other file is replaced by rename).
WRITTEN_ENTRIES = ("checkpoints", "tensorboard", "logs", "figures", "metrics.jsonl",
                   "runs.jsonl", LOCK_FILE)
# flock unsupported (e.g. Lustre mounted noflock, some FUSE filesystems).
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


class WorkdirBusyError(OSError):
  """Another run holds the workdir (an ``OSError``: the binaries report it in one line)."""


@contextlib.contextmanager
def exclusive(workdir: str | os.PathLike[str]) -> Iterator[None]:
  """Holds an advisory lock (``flock``) on ``workdir/.lock`` while the block runs.

  A second run started on the same workdir (a requeued job while the first still runs)
  stops at once with :class:`WorkdirBusyError`, instead of both saving checkpoints and
  appending metrics into it. The kernel drops the lock when the process dies, however
  it dies.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  with open(path, "a", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(f"{workdir} is in use by another run (it holds {path}); let it "
                             "finish or stop it, or use another --workdir") from None
    except OSError as e:
      if e.errno not in _NO_FLOCK:
        raise
      logging.warning("%s: this filesystem has no flock (%s): running without the lock "
                      "that stops a second run on the same workdir", workdir, e.strerror)
      yield
      return
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _plain_json(obj: Any) -> Any:
  """NumPy/JAX scalars and arrays as Python numbers and lists; anything else as ``str``."""
  if hasattr(obj, "tolist"):
    return obj.tolist()
  return str(obj)


def dumps(obj: Any, **kwargs: Any) -> str:
  """``json.dumps`` of :func:`standard_json` (``obj``): a NaN or infinite number as a string.

  ``allow_nan=False``: a non-finite number that gets past ``standard_json`` (from a
  ``default`` hook) raises instead of writing bare ``NaN``, which is not JSON.
  """
  kwargs.setdefault("default", _plain_json)
  return json.dumps(standard_json(obj), allow_nan=False, **kwargs)


def standard_json(obj: Any) -> Any:
  """``obj`` (mappings, sequences, NumPy/JAX values) as plain JSON values, with a NaN or
  infinite number as the string ``"nan"``/``"inf"``/``"-inf"``: JSON has no such numbers.

  The project's one convention for every JSON file it writes: NaN is a value not measured
  or undefined (an empty split's accuracy), ``"inf"``/``"-inf"`` an overflow (a diverged
  loss); strings keep the three apart, where ``null`` would merge them with "absent".
  :func:`from_standard_json` turns them back into floats.
  """
  if isinstance(obj, Mapping):
    return {k: standard_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [standard_json(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (float, int)):
    return standard_json(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  return obj


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def from_standard_json(obj: Any) -> Any:
  """The inverse of :func:`standard_json` for what readers compute with: the strings
  ``"nan"``/``"inf"``/``"-inf"`` (at any depth) as floats; all else as it is."""
  if isinstance(obj, Mapping):
    return {k: from_standard_json(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [from_standard_json(v) for v in obj]
  if isinstance(obj, str):
    return _NON_FINITE.get(obj, obj)
  return obj


def read_json(path: str | os.PathLike[str], *, standard: bool = True) -> Any:
  """A JSON file of the project, non-finite numbers as floats (:func:`from_standard_json`;
  an older file's bare ``NaN`` reads as NaN too; ``standard=False``: as written). A
  file that is not JSON is a ``ValueError`` naming it."""
  with open(path, encoding="utf-8") as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); a run killed while writing it, or "
                       "a full disk, can leave it so") from None
  return from_standard_json(obj) if standard else obj


def source_digest(*modules: ModuleType) -> str:
  """A short hash of ``modules``' source files: a cache keyed by config alone would keep
  serving what older code computed after that code changed (any edit invalidates it)."""
  h = hashlib.sha256()
  for module in modules:
    h.update(pathlib.Path(inspect.getfile(module)).read_bytes())
  return h.hexdigest()[:12]


FIGURES = "figures"


def publish_figures(workdir: str, staging: str, drawn: Iterable[str],
                    previous: Iterable[Any]) -> None:
  """Moves a finished run's figures from ``staging`` into ``workdir/figures`` and removes
  the ones of the previous report (``previous``, paths as ``figures/x.png``) that this run
  did not draw (``drawn``); any other file there is left alone. A run that fails before
  this leaves the previous figures beside the previous report."""
  fig_dir = os.path.join(workdir, FIGURES)
  os.makedirs(fig_dir, exist_ok=True)
  if os.path.isdir(staging):
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(fig_dir, name))
    shutil.rmtree(staging)
  keep = {os.path.basename(f) for f in drawn}
  # Only names of files directly in figures/: the report could have been edited by hand.
  old = {os.path.basename(f) for f in previous
         if isinstance(f, str) and os.path.dirname(f) == FIGURES}
  for name in old - keep:
    path = os.path.join(fig_dir, name)
    if os.path.isfile(path):
      os.remove(path)


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120) -> str:
  """Writes a matplotlib ``Figure`` to ``path`` (format from its extension, PNG by
  default), tightly laid out, creating its folder; returns ``path``.

  The figures are built as ``matplotlib.figure.Figure`` objects, outside pyplot: a
  library that called ``matplotlib.use("Agg")`` on import would switch a notebook's
  backend off inline display, and pyplot's figure registry is not thread-safe.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  kind = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
  write_atomically(path, lambda f: fig.savefig(f, format=kind, dpi=dpi))
  return os.fspath(path)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` file, read into memory (the file closed)."""
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


PARTIAL_SAVE_EVERY_S = 30.0


class PartialArrays:
  """Arrays gathered chunk by chunk (rows along axis 0) and saved to ``path`` as they
  come, so that a long job killed halfway resumes after the chunks last saved.

  The file holds ``fingerprint`` (whatever identifies the job: a rerun under another one
  starts afresh, with a warning) and how many items (``done``) the saved rows cover.
  ``add`` appends one chunk's arrays; ``arrays`` concatenates them. The file is
  rewritten whole, so at most every ``PARTIAL_SAVE_EVERY_S`` seconds (a stopped job redoes
  at most that much). The caller deletes the file once the job's whole result is written
  elsewhere. ``path=None`` keeps the arrays in memory only.
  """

  def __init__(self, path: str | os.PathLike[str] | None, fingerprint: str):
    self.path = None if path is None else os.fspath(path)
    self.fingerprint, self.done, self._parts = fingerprint, 0, {}
    self._saved_at = -math.inf
    if self.path is None or not os.path.exists(self.path):
      return
    saved = read_npz(self.path)
    if str(saved.pop("fingerprint", "")) != fingerprint:
      logging.warning("%s was written by another job (its fingerprint differs): starting "
                      "from the beginning", self.path)
      return
    self.done = int(saved.pop("done"))
    self._parts = {name: [array] for name, array in saved.items()}
    logging.info("%s: resuming after %d items", self.path, self.done)

  def add(self, done: int, **arrays: np.ndarray) -> None:
    """Appends a chunk's arrays (the same names every chunk) and saves; ``done``: how
    many items the saved rows now cover."""
    if self._parts and set(arrays) != set(self._parts):
      raise ValueError(f"{self.path}: a chunk's arrays {sorted(arrays)} differ from the "
                       f"saved ones {sorted(self._parts)}")
    for name, array in arrays.items():
      self._parts.setdefault(name, []).append(np.asarray(array))
    self.done = done
    if self.path is not None and time.monotonic() - self._saved_at >= PARTIAL_SAVE_EVERY_S:
      write_atomically(self.path, lambda f: np.savez(
          f, fingerprint=self.fingerprint, done=done, **self.arrays()))
      self._saved_at = time.monotonic()

  def arrays(self) -> dict[str, np.ndarray]:
    return {name: np.concatenate(parts) for name, parts in self._parts.items()}
