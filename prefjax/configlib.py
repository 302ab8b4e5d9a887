"""Typed config dataclasses built from dicts or ``ml_collections.ConfigDict``s."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


def check_fields(section: str, cfg: Mapping[str, Any] | None, known: Iterable[str]) -> None:
  """Rejects the keys of a config section (e.g. ``config.eval``) that are not in ``known``."""
  known = set(known)
  unknown = sorted(set(cfg or {}) - known)
  if unknown:
    raise ValueError(f"{section}: unknown field(s) {unknown}; known: {sorted(known)}")


def dataclass_from_mapping(cls: type[T], cfg: Mapping[str, Any] | T, **converters) -> T:
  """``cls(**cfg)`` with unknown keys rejected by name; ``cfg`` may already be a ``cls``.

  ``converters`` map a field name to a function applied to its value (e.g. ``tuple``).
  """
  if isinstance(cfg, cls):
    return cfg
  data = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  check_fields(cls.__name__, data, (f.name for f in dataclasses.fields(cls)))
  for name, convert in converters.items():
    if name in data:
      data[name] = convert(data[name])
  return cls(**data)
