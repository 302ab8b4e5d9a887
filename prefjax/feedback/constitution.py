"""Constitutions: plain-text files of principles, one per line, and how a pair gets its principles.

A constitution file (``configs/constitutions/harmlessness.txt``) holds one principle per
line, phrased as the question the judge answers ("Which response is less likely to ...?").
Blank lines and lines starting with ``#`` are skipped. A file with no principle, or a
missing file, is an error naming the file.

Each pair is judged under either one principle drawn at random (``mode="sample"``, as
in Constitutional AI, Bai et al. 2022, arXiv 2212.08073) or under ``num_principles``
principles whose probabilities are averaged (``mode="ensemble"``; 0 = all of them).
The draw is a pure function of (seed, pair index), so a rerun labels identically.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

PRINCIPLE_MODES = ("sample", "ensemble")


def load_constitution(path: str | os.PathLike[str]) -> list[str]:
  """The principles of one constitution file (see the module docstring)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"constitution file {path} not found; give a text file with one "
                            "principle per line (see configs/constitutions/)")
  data = path.read_bytes()
  try:
    lines = data.decode("utf-8-sig").splitlines()  # -sig: editors' byte-order mark
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"constitution file {path}:{line}: invalid UTF-8 byte "
                     f"{data[e.start:e.start + 1]!r}; save it as UTF-8") from None
  principles = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
  if not principles:
    raise ValueError(f"constitution file {path} has no principle; write one principle per line")
  return principles


def load_constitutions(paths: str | Sequence[str]) -> list[str]:
  """Principles of several files (comma-separated string or a list), in order, deduplicated."""
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",") if p.strip()]
  if not paths:
    raise ValueError("no constitution file given (config.constitution)")
  # dict.fromkeys keeps the first of each, within a file as across files: a repeated
  # line would otherwise be drawn twice as often in "sample" mode.
  return list(dict.fromkeys(p for path in paths for p in load_constitution(path)))


def principles_for_pair(principles: Sequence[str], index: int, *, mode: str, seed: int,
                        num_principles: int = 0) -> list[str]:
  """The principles pair ``index`` is judged under (one for ``sample``, k for ``ensemble``)."""
  if mode not in PRINCIPLE_MODES:
    raise ValueError(f"principle mode must be one of {PRINCIPLE_MODES}, got {mode!r}")
  rng = np.random.default_rng((seed, index))
  if mode == "sample":
    return [principles[int(rng.integers(len(principles)))]]
  k = len(principles) if num_principles <= 0 else min(num_principles, len(principles))
  if k == len(principles):
    return list(principles)
  return [principles[i] for i in sorted(rng.choice(len(principles), size=k, replace=False))]
