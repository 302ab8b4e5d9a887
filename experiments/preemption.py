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
handler before a binary imports JAX, and before the train binaries' one restart
(``xla_cpu.apply_malloc_defaults``), which holds a SIGTERM sent meanwhile for the
restarted process's handler.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from typing import Any, Iterator

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


@contextlib.contextmanager
def exit_on_sigterm_in_native_wait() -> Iterator[None]:
  """SIGTERM exits with ``PREEMPTED_EXIT_CODE`` during a native call that waits without
  returning to Python, where Python's handler would never run (e.g.
  ``jax.distributed.initialize`` waiting for the other processes).

  Whichever thread the signal reaches, Python's C-level handler writes its number to
  the wakeup fd (``signal.set_wakeup_fd``); a thread of its own reads it and exits.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  read_fd, write_fd = os.pipe()
  done = threading.Event()

  def wait() -> None:
    while not done.is_set():
      ready, _, _ = select.select([read_fd], [], [], 1.0)
      if ready and signal.SIGTERM in os.read(read_fd, 512):
        _exit_now(signal.SIGTERM, None)

  previous = None
  waiter = threading.Thread(target=wait, name="sigterm-in-native-wait", daemon=True)
  try:
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    waiter.start()
    yield
  finally:
    done.set()
    if waiter.is_alive():
      os.write(write_fd, b"\0")  # wakes it at once
      waiter.join()
    if previous is not None:
      signal.set_wakeup_fd(previous)
    os.close(read_fd)
    os.close(write_fd)


def was_preempted(result: Any) -> bool:
  """Whether a binary's ``run`` result (a ``TrainResult`` or a dict with a
  ``preempted`` entry) stopped on a signal after saving."""
  if isinstance(result, dict):
    return bool(result.get("preempted"))
  return bool(getattr(result, "preempted", False))
