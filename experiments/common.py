"""absl boilerplate shared by the experiment binaries.

Every binary is ``python -m experiments.NAME --config=configs/.../x.py[:arg]
--workdir=DIR [--config.key=value ...]``. A binary defines ``run(config,
workdir)`` (what the tests call in-process) and ends with::

  if __name__ == "__main__":
    common.define_flags()
    app.run(common.main_for(run))

Exit codes: 0 finished; 1 an error. Config mistakes (an unknown
``--config.key``, a missing config file) stop before anything is written, with
one line; errors of a run (a bad value, bad data, a missing file) end in a short
message rather than a traceback, unless ``--verbose_errors`` (or
``PREFJAX_VERBOSE_ERRORS=1``) is given. ``--config_help`` lists the config's
fields with their values and exits 0.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import logging as std_logging
import os
import pathlib
import signal
import socket
import sys
from typing import Any, Callable

import jax
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow_datasets as tfds

from experiments import preemption
from prefjax import cli
from prefjax import compilation_cache
from prefjax import configlib
from prefjax import experiment
from prefjax import files
from prefjax import parallel
from prefjax import train
from prefjax.train import summary as summary_lib

FLAGS = flags.FLAGS
# Errors a user can cause and fix (bad config values, data, paths): one short message.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
# What every binary writes into its workdir before its config is read in full.
RECORDS_ONLY = {summary_lib.RUNS_FILE, "logs", files.LOCK_FILE}


def define_flags() -> None:
  """Defines ``--config``, ``--workdir``, ``--config_help`` and ``--verbose_errors``.

  They are key flags of the binary, so its ``--help`` lists them.
  """
  if "config" not in FLAGS:
    cli.define_config_flag("config")
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", None, "Output directory; rerunning with it resumes.")
  if "config_help" not in FLAGS:
    flags.DEFINE_bool("config_help", False,
                      "Print every field of --config with its value and exit.")
  if "verbose_errors" not in FLAGS:
    flags.DEFINE_bool("verbose_errors", False, "Show the full traceback of an error "
                      f"(also ${cli.VERBOSE_ERRORS_ENV}=1).")
  if "imports" not in FLAGS:
    flags.DEFINE_list("imports", [], "Python modules to import before the run, e.g. yours "
                      "that register losses: --imports=my_pkg.losses (eval_rm's dpo: scorer "
                      "of such a run needs them too).")
  parallel.distributed.define_flags(FLAGS)  # --coordinator_address, --num_processes, ...
  for name in ("config", "workdir", "config_help", "verbose_errors", "imports",
               "coordinator_address", "num_processes", "process_id"):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO lines of chatty libraries (orbax logs every checkpoint step in detail),
  TFDS warnings (it warns on every custom dataset config prefjax builds), orbax's
  warning on every read-only open, which is how prefjax loads a run to evaluate it, and
  tensorboardX's two lines for each non-finite scalar (the loop's own warning names the
  step, its loss and gradient norm)."""

  NOISY = {f"{os.sep}orbax{os.sep}": std_logging.WARNING,
           f"{os.sep}tensorflow_datasets{os.sep}": std_logging.ERROR,
           # "Unable to initialize backend 'tpu'", at INFO in every run on a CPU or GPU.
           f"{os.sep}jax{os.sep}_src{os.sep}xla_bridge": std_logging.WARNING}
  EXPECTED = {f"{os.sep}orbax{os.sep}": ("Given directory is read only",),
              f"{os.sep}tensorboardX{os.sep}": ("NaN or Inf found",)}

  def filter(self, record: std_logging.LogRecord) -> bool:
    if any(part in record.pathname and str(record.msg).startswith(messages)
           for part, messages in self.EXPECTED.items()):
      return False
    return all(record.levelno >= level for part, level in self.NOISY.items()
               if part in record.pathname)


def quiet_libraries() -> None:
  """Puts ``_QuietLibraries`` on absl's handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def prepare_workdir(workdir: str | os.PathLike[str]) -> str:
  """``files.make_workdir``: creates ``workdir``, checked; call ``start_logs`` once it is held."""
  return files.make_workdir(workdir, known_entries=(summary_lib.RUNS_FILE, "logs"))


def start_logs(workdir: str) -> None:
  """Mirrors absl logs into ``workdir/logs`` (once the workdir is held: a run refused by
  the lock must not repoint ``logs/log.INFO``) and sets the binaries' log levels."""
  log_dir = pathlib.Path(workdir, "logs")
  log_dir.mkdir(exist_ok=True)
  logging.get_absl_handler().use_absl_log_file("log", str(log_dir))
  quiet_libraries()
  logging.set_verbosity(logging.INFO)
  if not FLAGS["stderrthreshold"].present:  # Progress on the terminal unless asked otherwise.
    logging.set_stderrthreshold(logging.INFO)
  tfds.display_progress_bar(False)  # Dataset builds take seconds; bars garble logs.


def record_invocation(workdir: str) -> None:
  """Appends what started this run to ``workdir/runs.jsonl`` (``summary.RUNS_FILE``): the
  UTC time, command line, ``--imports``, host, process count, and the code that ran
  (``summary.code_state``: prefjax's commit, whether it had changes, library versions)."""
  if jax.process_index() != 0:  # process 0 writes the workdir's files
    return
  summary_lib.append_run_record(workdir, {
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "argv": list(sys.argv), "imports": list(FLAGS.imports) if "imports" in FLAGS else [],
      "host": socket.gethostname(), "processes": jax.process_count(),
      **summary_lib.code_state()})


def config_help(config: Any) -> str:
  """Every field of ``config`` as ``config.a.b = value``, one a line."""
  # An empty ConfigDict's repr is YAML's "{}\n".
  return "\n".join(f"{key} = {value!r}".rstrip("\n")
                   for key, value in configlib.flat_items(config))


def _error_message(error: BaseException) -> str:
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return f"{type(error).__name__}: {text}"


def report_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Ends ``main`` on a user error with its message on stderr and exit code 1."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except (*USER_ERRORS, AttributeError) as e:
      if isinstance(e, (AttributeError, KeyError)):  # a ConfigDict's missing field
        e = configlib.missing_field_error(e) or e  # (an AttributeError otherwise is a bug)
      if cli.verbose_errors() or isinstance(e, AttributeError):
        raise
      logging.flush()
      sys.stderr.write(f"error: {_error_message(e)} [--verbose_errors shows the traceback]\n")
      sys.exit(1)
    except KeyboardInterrupt:  # in training, Ctrl-C saves and exits 75; this is outside it
      if cli.verbose_errors():
        raise
      logging.flush()
      sys.stderr.write("interrupted (Ctrl-C) outside training: nothing new to save; rerun "
                       "with the same --workdir: it goes on from what was saved\n")
      sys.exit(INTERRUPTED_EXIT_CODE)

  return wrapped


def _check_command_line(argv: list[str]) -> None:
  if len(argv) > 1:
    raise configlib.ConfigError(f"unexpected positional arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise configlib.ConfigError("--config is required, e.g. --config=configs/rm/tiny.py")
  if not FLAGS.workdir and not FLAGS.config_help:
    raise configlib.ConfigError("--workdir is required (rerunning with it resumes)")
  cli.check_none_overrides("config")


def imports_flag() -> str:
  """`` --imports=...`` as this run was given it ('' for none, or when run in-process): a
  "Next:" command that rebuilds this run's loss needs it too."""
  if "imports" not in FLAGS or not FLAGS.is_parsed() or not FLAGS.imports:
    return ""
  return f" --imports={','.join(FLAGS.imports)}"


def _import_user_modules() -> None:
  for module in FLAGS.imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise configlib.ConfigError(f"--imports: cannot import {module!r}: {e}") from e


def _refuse_another_binarys_workdir(workdir: str) -> None:
  """A workdir holds the runs of one binary: another would replace its ``config.json`` and
  outputs (``eval_rm`` given the RM run it scores as its workdir) or stop at its
  checkpoints after a long config diff."""
  theirs, ours = summary_lib.started_by(workdir), summary_lib.binary_name(sys.argv[0])
  here = os.path.dirname(os.path.abspath(__file__))
  is_binary = lambda name: name and os.path.isfile(
      os.path.join(here, name.split(".")[-1] + ".py"))
  if theirs and theirs != ours and is_binary(theirs) and is_binary(ours):
    if not set(os.listdir(workdir)) - RECORDS_ONLY:  # it stopped before writing anything
      logging.info("--workdir=%s: %s stopped there before writing any output; %s takes it",
                   workdir, theirs, ours)
      return
    raise configlib.ConfigError(f"--workdir={workdir} holds a run of {theirs}: {ours} would "
                                "replace its config.json and outputs; use another --workdir")


def main_for(run: Callable[[Any, str], Any],
             check: Callable[[Any], None] | None = None) -> Callable[[list[str]], None]:
  """An absl ``main`` that validates the flags (and the config, with ``check``, before the
  workdir is touched) and calls ``run(config, workdir)``.

  Exit codes: 0 finished, 1 error, ``preemption.PREEMPTED_EXIT_CODE`` when the
  run stopped on SIGTERM after saving. The workdir's lock (``train.hold_workdir``) is
  held from ``runs.jsonl``'s record to the run's last write (its export, its report),
  not only while the training loop runs.
  """

  def main(argv: list[str]) -> None:
    quiet_libraries()  # before JAX's backend starts, which logs at INFO
    _check_command_line(argv)
    if FLAGS.config_help:
      print(config_help(FLAGS.config))
      return
    preemption.exit_on_sigterm()
    # Multi-host: joins the job when a coordinator is given or a cluster is detected.
    with preemption.exit_on_sigterm_in_native_wait():  # it waits for the other processes
      parallel.initialize_distributed()
    _import_user_modules()  # after: a module that computes would start JAX's backend
    experiment.check_before_the_workdir(FLAGS.config)
    if check is not None:
      with summary_lib.naming_recorded_imports(FLAGS.workdir):  # a rerun without --imports
        check(FLAGS.config)
    workdir = prepare_workdir(FLAGS.workdir)
    with train.hold_workdir(workdir):  # from the first record to the last export
      _refuse_another_binarys_workdir(workdir)
      start_logs(workdir)
      record_invocation(workdir)
      logging.info("compilation cache: %s (%s=0 turns it off)",
                   compilation_cache.enable() or "off", compilation_cache.CACHE_ENV)
      logging.info("config %s, overrides %s (all fields: --config_help; saved in config.json)",
                   config_flags.get_config_filename(FLAGS["config"]),
                   config_flags.get_override_values(FLAGS["config"]))
      try:
        result = run(FLAGS.config, workdir)
      except train.NoIntactCheckpointError as e:
        sys.exit(f"error: {e}")
    if preemption.was_preempted(result):
      sys.exit(preemption.PREEMPTED_EXIT_CODE)
    # Finished and written: a SIGTERM during interpreter shutdown (which restores its
    # default action, death by signal, exit 143) has nothing left to stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

  return report_errors(main)
