"""Files replaced whole (``write_atomically``); a workdir held by one run (``exclusive``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import threading
from typing import IO, Any, Callable, Iterator

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
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


LOCK_FILE = ".lock"
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
