"""JAX's persistent compilation cache for the binaries.

Every binary compiles its train step once per distinct batch shape: 5–10 s each for
the 23M-parameter reward model of ``benchmarks/`` on a 2-core CPU, and a study that
runs the same binary many times (``experiments/reproduce.py``: one ``train_dpo`` per
loss and β) compiles the same programs again in every run. With the cache on, XLA's
compiled executables are written to disk, keyed by the program, the jax version, the
backend and the compile options, and a later compilation of the same program loads
them instead (``benchmarks/RESULTS.md``, "Persistent compilation cache").

``PREFJAX_COMPILATION_CACHE`` names the folder (default
``~/.cache/prefjax/jax_compilation_cache``); ``0`` or an empty value turns it off.
JAX's own setting wins: with ``JAX_COMPILATION_CACHE_DIR`` set (as the test suite
sets it, to a private folder), that folder is used. Nothing evicts entries: delete
the folder to reclaim the space.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

CACHE_ENV = "PREFJAX_COMPILATION_CACHE"
DEFAULT_DIR = "~/.cache/prefjax/jax_compilation_cache"


def enable(environ: Mapping[str, str] = os.environ) -> str | None:
  """Points JAX's persistent cache at the configured folder; returns it (None: off)."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = environ.get(CACHE_ENV, DEFAULT_DIR)
  if folder in ("", "0"):
    return None
  folder = os.path.abspath(os.path.expanduser(folder))
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder
