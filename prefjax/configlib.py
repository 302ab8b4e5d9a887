"""Typed config dataclasses built from dicts or ``ml_collections.ConfigDict``s."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def dataclass_from_mapping(cls: type[T], cfg: Mapping[str, Any] | T, **converters) -> T:
  """``cls(**cfg)`` with unknown keys rejected by name; ``cfg`` may already be a ``cls``.

  ``converters`` map a field name to a function applied to its value (e.g. ``tuple``).
  """
  if isinstance(cfg, cls):
    return cfg
  data = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
  for name, convert in converters.items():
    if name in data:
      data[name] = convert(data[name])
  return cls(**data)
