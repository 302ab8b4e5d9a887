"""Files replaced whole (``write_atomically``)."""

from __future__ import annotations

import os
import pathlib
import threading
from typing import IO, Any, Callable


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
