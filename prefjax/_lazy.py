"""Lazy package attributes (PEP 562) shared by prefjax's package ``__init__`` files.

A package that re-exports names from its submodules would otherwise import all
of them, and their dependencies, on the first ``import prefjax.<package>.x``:
``prefjax.rm.loss`` would pull in grain through the evaluator, ``prefjax.train.step``
orbax through the checkpointer. With ``attach`` each name is imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(package: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """Returns ``(__getattr__, __dir__, __all__)`` for ``package``.

  Args:
    package: the package's ``__name__``.
    exports: public name -> the submodule (relative to ``package``) defining it.
    submodules: submodules reachable as attributes (``prefjax.data.pipeline``).
  """
  exports = dict(exports)
  submodules = tuple(submodules)
  names = sorted({*exports, *submodules})

  def __getattr__(name: str) -> Any:
    if name in exports:
      return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__() -> list[str]:
    return names

  return __getattr__, __dir__, names
