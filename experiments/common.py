"""absl boilerplate shared by the experiment binaries.

Every binary is ``python -m experiments.NAME --config=configs/.../x.py[:arg]
--workdir=DIR [--config.key=value ...]``. A binary defines ``run(config,
workdir)`` (what the tests call in-process) and ends with::

  if __name__ == "__main__":
    common.define_flags()
    app.run(common.main_for(run))
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import sys
from typing import Any, Callable

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import preemption
from prefjax import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines ``--config`` (an ml_collections config file) and ``--workdir``."""
  if "config" not in FLAGS:
    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with an argument: configs/x.py:quick.",
        lock_config=True)
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", None, "Output directory; rerunning with it resumes.")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO lines of chatty libraries (orbax logs every checkpoint step in detail)."""

  NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def prepare_workdir(workdir: str | os.PathLike[str]) -> str:
  """Creates ``workdir`` and mirrors absl logs into ``workdir/logs``."""
  path = pathlib.Path(workdir).expanduser().resolve()
  path.mkdir(parents=True, exist_ok=True)
  log_dir = path / "logs"
  log_dir.mkdir(exist_ok=True)
  handler = logging.get_absl_handler()
  handler.use_absl_log_file("log", str(log_dir))
  handler.addFilter(_QuietLibraries())
  logging.set_verbosity(logging.INFO)
  logging.set_stderrthreshold(logging.INFO)
  return str(path)


def main_for(run: Callable[[Any, str], Any]) -> Callable[[list[str]], None]:
  """An absl ``main`` that validates the flags and calls ``run(config, workdir)``.

  Exit codes: 0 finished, 1 error, ``preemption.PREEMPTED_EXIT_CODE`` when the
  run stopped on SIGTERM after saving.
  """

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise ValueError(f"unexpected positional arguments: {argv[1:]}")
    if FLAGS.config is None:
      raise ValueError("--config is required, e.g. --config=configs/rm/tiny.py")
    if not FLAGS.workdir:
      raise ValueError("--workdir is required (rerunning with it resumes)")
    preemption.exit_on_sigterm()
    workdir = prepare_workdir(FLAGS.workdir)
    logging.info("config:\n%s", FLAGS.config)
    try:
      result = run(FLAGS.config, workdir)
    except train.NoIntactCheckpointError as e:
      sys.exit(f"error: {e}")
    if preemption.was_preempted(result):
      sys.exit(preemption.PREEMPTED_EXIT_CODE)

  return main
