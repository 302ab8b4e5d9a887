"""A built dataset row's fields, read with errors that name the row and the field."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np


def row_name(row: Mapping[str, Any], index: int) -> str:
  """``source row 3 (file.jsonl:4)``: the index, and the raw file:line when the row has an id."""
  row_id = row.get("id")
  return f"source row {index}" + (f" ({row_id})" if isinstance(row_id, str) and row_id else "")


def text(row: Mapping[str, Any], key: str, index: int) -> str:
  """``row[key]``, which must be a string."""
  if key not in row:
    raise KeyError(f"{row_name(row, index)}: missing field {key!r} (fields: {sorted(row)})")
  value = row[key]
  if not isinstance(value, str):
    raise TypeError(f"{row_name(row, index)}: field {key!r} must be str, "
                    f"got {type(value).__name__}")
  return value


def number(row: Mapping[str, Any], key: str, default: float, index: int,
           lo: float, hi: float) -> float:
  """``row[key]`` as a finite float in ``[lo, hi]``; ``default`` when absent or None."""
  value = row.get(key)
  if value is None:
    return default
  # As the builders' rows: True and "0.5" are refused, not read as 1.0 and 0.5. A built
  # row's scalar arrives as a NumPy number or 0-d array.
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise ValueError(f"{row_name(row, index)}: field {key!r}={value!r} is not a number")
  value = float(value)
  if not (math.isfinite(value) and lo <= value <= hi):
    raise ValueError(f"{row_name(row, index)}: field {key!r}={value} not in [{lo}, {hi}]")
  return value
