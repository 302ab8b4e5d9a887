"""Exit codes of the experiment binaries, and SIGTERM before training starts.

  0                      finished.
  1                      an error (the message says which).
  PREEMPTED_EXIT_CODE    stopped by SIGTERM (or a multi-host preemption notice):
                         what existed was saved; rerun with the same
                         ``--workdir`` to resume.

During training ``train_loop`` (and ``train_rl``'s loop) turns SIGTERM into "save a
checkpoint and stop" (and skips the final eval). Before and after training there
is nothing new to save, so :func:`exit_on_sigterm` makes SIGTERM end the process at once with
``PREEMPTED_EXIT_CODE`` instead of Python's default death by signal (exit 143).
This module imports nothing heavy: ``experiments/__init__.py`` installs the
handler before a binary imports JAX.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

# os.EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
  """Raised by the SIGTERM handler: unwinds like ``sys.exit(PREEMPTED_EXIT_CODE)``."""

  def __init__(self):
    super().__init__(PREEMPTED_EXIT_CODE)


def _exit_now(signum: int, frame: Any) -> None:
  # os._exit, not SystemExit: unwinding and finalising the interpreter while JAX's
  # native modules are half-imported or their threads are starting can segfault
  # (seen: exit -11 instead of 75). There is nothing to save here.
  del frame
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os.write(2, f"received signal {signum} outside training: nothing new to save; exiting "
              f"with code {PREEMPTED_EXIT_CODE} (rerun with the same --workdir: it goes on "
              "from what was saved)\n".encode())
  os._exit(PREEMPTED_EXIT_CODE)


def exit_on_sigterm() -> None:
  """Makes SIGTERM exit with ``PREEMPTED_EXIT_CODE`` (main thread only)."""
  signal.signal(signal.SIGTERM, _exit_now)


def was_preempted(result: Any) -> bool:
  """Whether a binary's ``run`` result (a ``TrainResult`` or a dict with a
  ``preempted`` entry) stopped on a signal after saving."""
  if isinstance(result, dict):
    return bool(result.get("preempted"))
  return bool(getattr(result, "preempted", False))
