"""Typed config sections: unknown keys are errors that name the closest valid keys.

Config files declare whole sections from the dataclass that reads them
(``section(LoopConfig, num_steps=300)``), so every field a dataclass documents
exists in the shipped config with its default and can be set on the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import numbers
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


class ConfigError(ValueError):
  """A config key or value that does not fit the schema."""


class UnregisteredNameError(ConfigError):
  """A config names something no registry holds: maybe registered by a user module that
  this process did not import (``--imports``)."""


def missing_field_error(error: AttributeError | KeyError) -> ConfigError | None:
  """A ConfigDict's missing field (a binary given another binary's config), read as an
  attribute or an item, as a one-line ``ConfigError``; None for any other error."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None or "ml_collections" not in tb.tb_frame.f_code.co_filename:
    return None
  return ConfigError(f"the config has no field {str(error).strip(chr(34))} that this binary "
                     "reads: is --config a config for this binary?")


def unknown_keys_message(section: str, unknown: Iterable[str], known: Iterable[str]) -> str:
  """One line: the unknown keys of ``section``, the closest known ones, all known ones."""
  unknown, known = sorted(unknown), sorted(known)
  close = list(dict.fromkeys(m for key in unknown for m in difflib.get_close_matches(key, known)))
  hint = f" (did you mean {', '.join(close)}?)" if close else ""
  if "kwargs" in known:  # config.loss: a loss's own hyperparameters go there
    hint += (f" (a hyperparameter of the selected loss: --{section}.kwargs="
             f"{unknown[0]}=VALUE)")
  return f"{section}: unknown field(s) {unknown}{hint}; known: {known}"


def check_fields(section: str, cfg: Mapping[str, Any] | None, known: Iterable[str],
                 hint: str = "") -> None:
  """Rejects the keys of a config section (e.g. ``config.eval``) that are not in ``known``;
  ``hint`` ends the message (what to check, e.g. that the config is this binary's)."""
  known = set(known)
  unknown = set(cfg or {}) - known
  if unknown:
    raise ConfigError(unknown_keys_message(section, unknown, known)
                      + (f" ({hint})" if hint else ""))


def check_key_path(config: Mapping[str, Any], path: str, root: str = "config") -> None:
  """Raises ``ConfigError`` unless ``root.path`` (``a.b.c``) names a field of ``config``.

  Used on ``--config.a.b=value`` overrides before ml_collections applies them, so a typo
  is one line naming the section's fields instead of a traceback.
  """
  node, section = config, root
  for part in path.split("."):
    name = part.split("[", 1)[0]
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{section} is a value ({type(node).__name__}), not a section: "
                        f"cannot set {root}.{path}")
    if name not in node:
      elsewhere = [f"{root}.{p}" for p in _paths_ending_in(config, name)]
      hint = f" ({' and '.join(elsewhere)} exists)" if elsewhere else ""
      if not node.keys():  # an empty dict field (eval_rm's pipeline): set it whole
        hint += f" ({section} is an empty dict: set it whole, --{section}='{{\"{name}\": ...}}')"
      raise ConfigError(unknown_keys_message(section, [name], node.keys()) + hint)
    node, section = node[name], f"{section}.{name}"


def _paths_ending_in(config: Any, name: str, prefix: str = "") -> list[str]:
  """Dotted paths of the fields called ``name`` anywhere in ``config``."""
  out = []
  if isinstance(config, (Mapping, ml_collections.ConfigDict)):
    for key in config.keys():
      path = f"{prefix}{key}"
      if key == name:
        out.append(path)
      out += _paths_ending_in(config[key], name, path + ".")
  return out


def _field_type(hint: Any) -> type:
  """``int | None`` -> ``int``; other hints as they are (for typed placeholders)."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _field_type(args[0]) if len(args) == 1 else object
  return typing.get_origin(hint) or hint


def _admits_none(hint: Any) -> bool:
  return hint is Any or hint is None or hint is type(None) or (
      typing.get_origin(hint) in (typing.Union, types.UnionType)
      and type(None) in typing.get_args(hint))


def may_be_none(config: ml_collections.ConfigDict, path: str) -> bool:
  """Whether field ``a.b`` of ``config`` may take None: a typed placeholder (a field of a
  :func:`section` whose type admits None, or ``config_dict.placeholder(T)``). A field
  another refers to (``get_ref``) is one too; its dataclass, if any, refuses None."""
  *parents, leaf = path.split(".")
  for name in parents:
    config = config[name]
  field = config._fields.get(leaf)  # pylint: disable=protected-access
  return isinstance(field, config_dict.FieldReference)


def section(cls: type, **values: Any) -> ml_collections.ConfigDict:
  """A config section with every field of dataclass ``cls``: ``values``, else the default.

  Fields whose type admits None are typed placeholders (``--config.a.b=None`` sets them
  to None from the command line, a number sets them to it); a field without a default
  must be given; a key ``cls`` lacks is a ``ConfigError``.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  check_fields(cls.__name__, values, fields)
  hints = typing.get_type_hints(cls)
  out = {}
  for name, field in fields.items():
    if name in values:
      out[name] = values[name]
    elif field.default is not dataclasses.MISSING:
      out[name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[name] = field.default_factory()
    else:
      raise ConfigError(f"{cls.__name__}.{name} has no default: pass {name}=...")
    if _admits_none(hints[name]) and not isinstance(out[name], config_dict.FieldReference):
      out[name] = config_dict.FieldReference(out[name], field_type=_field_type(hints[name]))
  return ml_collections.ConfigDict(out)


def flat_items(config: Mapping[str, Any], prefix: str = "config") -> list[tuple[str, Any]]:
  """``[("config.a.b", value), ...]`` for every leaf of a (nested) config, sorted."""
  items = []
  for key in sorted(config.keys()):
    value, name = config[key], f"{prefix}.{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)) and len(value):
      items.extend(flat_items(value, name))
    else:
      items.append((name, value))
  return items


def plain(cfg: Any) -> dict[str, Any]:
  """A ``ConfigDict`` (or any mapping) as a plain ``dict``; ``None`` as ``{}``."""
  if cfg is None:
    return {}
  return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def dataclass_from_mapping(cls: type[T], cfg: Mapping[str, Any] | T, **converters) -> T:
  """``cls(**cfg)`` with unknown keys rejected by name; ``cfg`` may already be a ``cls``.

  ``converters`` map a field name to a function applied to its value (e.g. ``tuple``).
  """
  if isinstance(cfg, cls):
    return cfg
  data = plain(cfg)
  check_fields(cls.__name__, data, (f.name for f in dataclasses.fields(cls)))
  hints = typing.get_type_hints(cls)
  for name, value in data.items():
    if value is None and not _admits_none(hints[name]):
      kind = getattr(hints[name], "__name__", hints[name])
      raise ConfigError(f"{cls.__name__}.{name} cannot be None (type {kind})")
  for name, convert in converters.items():
    if name in data:
      data[name] = convert(data[name])
  return cls(**data)


def parse_kwargs(value: Any) -> dict[str, Any]:
  """Loss hyperparameters from a mapping or a ``"name=value,name=value"`` string (CLI-friendly)."""
  if not value:
    return {}
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, Mapping):
    return dict(value)
  out = {}
  for item in str(value).split(","):
    name, sep, text = item.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"kwargs {value!r}: expected 'name=value[,name=value]'")
    out[name.strip()] = _literal(text.strip())
  return out


def _literal(text: str) -> Any:
  """A kwargs value: JSON (``0.5``, ``true``, ``null``) or a Python literal (``.5``,
  ``True``, ``None``), else the text itself."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    pass
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def check_kwargs(what: str, name: str, kwargs: Mapping[str, Any],
                 defaults: Mapping[str, Any]) -> None:
  """Raises ValueError for a hyperparameter ``name`` (a loss) does not take, or whose
  value is not of its default's kind (``what``: how the error names the setting)."""
  if unknown := sorted(set(kwargs) - set(defaults)):
    raise ValueError(f"{what} {unknown} are not hyperparameters of {name!r}; it accepts "
                     f"{sorted(defaults)}")
  for key, value in kwargs.items():
    if not _same_kind(value, defaults[key]):
      raise ValueError(f"{what} {key}={value!r} for {name!r}: expected "
                       f"{_kind(defaults[key])} (default {defaults[key]!r})")
    if isinstance(value, float) and math.isnan(value):  # passes every range check
      raise ValueError(f"{what} {key}={value!r} for {name!r}: expected a number, not NaN")


def _kind(default: Any) -> str:
  if isinstance(default, bool):
    return "true or false"
  if default is None or isinstance(default, numbers.Real):
    return "a number"
  return f"a {type(default).__name__}"


def _same_kind(value: Any, default: Any) -> bool:
  """Whether a hyperparameter's value fits its default: numbers (or None defaults) take
  real numbers or numeric arrays, flags take bools, strings take strings."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if default is None and value is None:
    return True
  if default is None or isinstance(default, numbers.Real):
    if getattr(value, "dtype", None) is not None and getattr(value, "shape", None) is not None:
      return value.dtype.kind in "fiu"
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  return not isinstance(default, str) or isinstance(value, str)
