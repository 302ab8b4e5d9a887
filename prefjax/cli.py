"""The experiment binaries' ``--config`` flag and error switch (absl + ml_collections).

* :func:`define_config_flag`: ``--config=FILE[:ARG]`` whose parser checks that the file
  exists and that every ``--config.a.b`` override names a field (one-line errors, before
  the workdir), and whose ``int``/``float`` overrides also read ``None``.
* :func:`check_none_overrides`: ``--config.a.b=None`` only on a field that takes None.
* :func:`verbose_errors`: ``--verbose_errors`` or ``$PREFJAX_VERBOSE_ERRORS``.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from prefjax import compilation_cache
from prefjax import configlib

VERBOSE_ERRORS_ENV = "PREFJAX_VERBOSE_ERRORS"


def verbose_errors(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """``--verbose_errors`` (anywhere on the command line) or ``$PREFJAX_VERBOSE_ERRORS``."""
  if os.environ.get(VERBOSE_ERRORS_ENV, "").strip().lower() not in compilation_cache.OFF:
    return True
  if "verbose_errors" in flag_values and flag_values["verbose_errors"].present:
    return bool(flag_values.verbose_errors)
  return any(re.fullmatch(r"--verbose_errors(=(1|true|True))?", arg) for arg in sys.argv)


def override_keys(name: str, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The ``a.b`` of every ``--NAME.a.b[=value]`` on the command line (as ml_collections)."""
  argv = flag_values.read_flags_from_files(sys.argv, force_gnu=False)
  pattern = re.compile(rf"-{{1,2}}(no)?{name}\.")
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if pattern.match(arg)]


class CheckedConfigFileParser(flags.ArgumentParser):
  """Wraps the config-file parser of ml_collections: checks the file exists and every
  ``--config.a.b`` override names a field.

  ml_collections would fail on an unknown override with a chained traceback, and on a
  missing file only when the config is first read (after the workdir exists); both
  are one-line flag errors here.
  """

  def __init__(self, name: str, parser: flags.ArgumentParser):
    self.name, self._parser = name, parser

  def flag_type(self) -> str:
    return self._parser.flag_type()

  def parse(self, path):
    filename = path.split(":", 1)[0]
    if not os.path.isfile(filename):
      raise configlib.ConfigError(f"config file {filename!r} not found (cwd {os.getcwd()})")
    try:
      config = self._parser.parse(path)
    except (TypeError, ValueError) as e:  # get_config raised; ml_collections adds its trace.
      raise configlib.ConfigError(
          str(e) if verbose_errors() else str(e).strip().splitlines()[-1]) from e
    for key in override_keys(self.name):
      configlib.check_key_path(config, key)
    return config


class NoneOrNumberParser(flags.ArgumentParser):
  """An ``int``/``float`` override parser that also reads ``None``: ml_collections parses
  ``--config.data.pipeline.num_epochs=None`` with ``int()``, so no field that a config
  sets to a number could be set back to None from the command line. Which fields take
  None is checked once the flags are parsed (:func:`check_none_overrides`)."""

  def __init__(self, parser: flags.ArgumentParser):
    super().__init__()
    self._parser = parser

  def flag_type(self) -> str:
    return f"{self._parser.flag_type()} or None"

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip() == "None":
      return None
    return self._parser.parse(argument)


def define_config_flag(name: str = "config",
                       flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--NAME=FILE[:ARG]`` with :class:`CheckedConfigFileParser` and ``None`` overrides."""
  for field_type, parser in ((int, flags.IntegerParser()), (float, flags.FloatParser())):
    config_flags.register_flag_parser_for_type(field_type, NoneOrNumberParser(parser))
  config_flags.DEFINE_config_file(
      name, None, "Config file, optionally with an argument: configs/x.py:quick. "
      f"Override fields with --{name}.a.b=value; --config_help lists them.",
      flag_values=flag_values, lock_config=True)
  flag_values[name].parser = CheckedConfigFileParser(name, flag_values[name].parser)


def check_none_overrides(name: str = "config",
                         flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--config.a.b=None`` on a field that does not take None (a count, a rate) is one
  line naming it, not a ``TypeError`` inside the run."""
  config = flag_values[name].value
  for path, value in sorted(config_flags.get_override_values(flag_values[name]).items()):
    if value is None and not configlib.may_be_none(config, path):
      raise configlib.ConfigError(
          f"--{name}.{path}=None: this field takes a number, not None (fields that take "
          "None are the optional ones: a None default, or a type such as int | None)")
