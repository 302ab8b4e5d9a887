"""Workarounds for what orbax-checkpoint prints and leaves behind (``checkpoint.py``)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging as pylogging
import sys
import traceback
from typing import Any, Iterator

from absl import logging


@contextlib.contextmanager
def warnings_off(on: bool = True) -> Iterator[None]:
  """Holds back absl warnings (orbax logs through absl) while ``on``: a read-only
  ``CheckpointManager`` warns "Given directory is read only" each time one is opened."""
  absl_logger = pylogging.getLogger("absl")
  level = absl_logger.level
  if on:
    absl_logger.setLevel(pylogging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _is_orbax_coroutine(obj: Any) -> bool:
  return inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename


def _is_abandoned_read(unraisable: Any) -> bool:
  """An orbax read that a failed restore abandoned, reported as unraisable: its coroutine
  finalised by the garbage collector, or its TensorStore future completing after orbax
  closed the event loop it reports to (``call_soon_threadsafe`` raising in TensorStore's
  thread, which has no Python object to name)."""
  if _is_orbax_coroutine(unraisable.object):
    return True
  frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"
          and any(frame.name == "call_soon_threadsafe" for frame in frames))


class _QuietAbandonedReads:
  """``sys.unraisablehook`` that logs abandoned reads at debug level and passes anything
  else to the hook it replaced."""

  def __init__(self, previous):
    self.previous = previous
    self.discarded = 0

  def __call__(self, unraisable: Any) -> None:
    if _is_abandoned_read(unraisable):
      self.discarded += 1
      logging.debug("abandoned checkpoint read discarded: %s", unraisable.exc_value)
    else:
      self.previous(unraisable)


def quiet_abandoned_reads() -> _QuietAbandonedReads:
  """Installs ``_QuietAbandonedReads`` as ``sys.unraisablehook`` (once) and returns it.

  When one array of a step fails to read, orbax abandons that step's other reads. Each
  abandoned coroutine raises when it is garbage-collected, and a read still running in
  TensorStore raises when it completes after orbax closed its event loop. Python prints
  each as an "Exception ignored in ..." traceback, long after the one warning that names
  the damaged step. The hook logs them at debug level instead. It is installed before a
  restore, because a late completion can come as soon as the restore fails, and stays
  installed, because they come at no set time; any other unraisable exception goes to
  the hook it replaced.
  """
  hook = sys.unraisablehook
  if not isinstance(hook, _QuietAbandonedReads):
    hook = sys.unraisablehook = _QuietAbandonedReads(hook)
  return hook


def discard_abandoned_reads() -> int:
  """Finalises, quietly, the array reads a failed restore left pending; returns how many
  the garbage collection it runs found."""
  hook = quiet_abandoned_reads()
  before = hook.discarded
  gc.collect()
  return hook.discarded - before
