"""JAX's persistent compilation cache for the binaries.

Every binary compiles its train step once per distinct batch shape: 5–10 s each for
the 23M-parameter reward model of ``benchmarks/`` on a 2-core CPU, and a study that
runs the same binary many times (``experiments/reproduce.py``: one ``train_dpo`` per
loss and β) compiles the same programs again in every run. With the cache on, XLA's
compiled executables are written to disk, keyed by the program, the jax version, the
backend and the compile options, and a later compilation of the same program loads
them instead (``benchmarks/RESULTS.md``, "Persistent compilation cache").

``PREFJAX_COMPILATION_CACHE`` names the folder (default
``~/.cache/prefjax/jax_compilation_cache``); ``0``, ``off``, ``false``, ``no``, ``none``
or an empty value turns it off. JAX's own settings win: with
``JAX_COMPILATION_CACHE_DIR`` set (as the test suite sets it, to a private folder), that
folder is used, and with ``JAX_ENABLE_COMPILATION_CACHE=false`` the cache is off. A folder
that cannot be created (a read-only home on a compute node) leaves the cache off, with a
warning, and the run goes on. Nothing evicts entries:
delete the folder to reclaim the space.

JAX writes an entry in place and never rewrites one that exists, so an entry left
empty by a full disk would fail to load, and be recompiled, in every later run: such
entries are deleted when the cache is enabled. (An entry cut short by a crash while it
was written shows the same way, as JAX's warning "Error reading persistent compilation
cache entry" on every run; delete the folder.)
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
from absl import logging

from prefjax import xla_cpu

CACHE_ENV = "PREFJAX_COMPILATION_CACHE"
DEFAULT_DIR = "~/.cache/prefjax/jax_compilation_cache"
OFF = ("", *xla_cpu.OFF)  # unset or empty is off too
_ENTRY_SUFFIX = "-cache"  # jax._src.lru_cache's name for an entry's file


def enable(environ: Mapping[str, str] = os.environ) -> str | None:
  """Points JAX's persistent cache at the configured folder; returns it (None: off)."""
  if not jax.config.jax_enable_compilation_cache:  # JAX reads and writes no entry then
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = environ.get(CACHE_ENV, DEFAULT_DIR)
  if folder.strip().lower() in OFF:
    return None
  folder = os.path.abspath(os.path.expanduser(folder))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    logging.warning("compilation cache off: cannot create %s (%s); set %s=DIR to a writable "
                    "folder, or %s=0", folder, e.strerror, CACHE_ENV, CACHE_ENV)
    return None
  try:
    _delete_empty_entries(folder)
  except OSError as e:  # a folder someone else made, unreadable for this user
    logging.warning("compilation cache off: cannot read %s (%s); set %s=DIR to a folder of "
                    "your own, or %s=0", folder, e.strerror, CACHE_ENV, CACHE_ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def _delete_empty_entries(folder: str) -> None:
  empty = []
  for entry in os.scandir(folder):
    if entry.name.endswith(_ENTRY_SUFFIX) and entry.is_file() and entry.stat().st_size == 0:
      try:
        os.remove(entry.path)
        empty.append(entry.name)
      except OSError:  # a read-only cache: JAX only reads it
        pass
  if empty:
    logging.warning("compilation cache %s: deleted %d empty entries (a full disk while they "
                    "were written); they compile again", folder, len(empty))
