"""``config.json`` (with a diff check on resume), ``summary.json`` and ``runs.jsonl`` of a workdir,
written as standard JSON (``prefjax.files.dumps``); the workdir held by one run
(``hold_workdir``)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import jax
from absl import logging

from prefjax import files
from prefjax import parallel

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RUNS_FILE = "runs.jsonl"  # one record per invocation of a binary on the workdir
# How a rerun treats a changed config is not part of what is run: setting it on the
# rerun (``--config.loop.on_config_mismatch=error``) must not itself be a mismatch.
RERUN_POLICY_FIELDS = (("loop", "on_config_mismatch"), ("loop", "allow_restart"))


# Workdirs this process's run holds (every process of a job records them alike).
_HELD_WORKDIRS: set[str] = set()


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike[str]) -> Iterator[None]:
  """Holds ``workdir``'s lock (``files.exclusive``) while the block runs; nests.

  Process 0, which writes the workdir's files, takes the lock; every process learns
  whether it got it, so a busy workdir stops the whole job. A binary holds its
  workdir from its first write to its last (``experiments.common.main_for``); the
  training loop inside it holds the same workdir again, which changes nothing (the
  outermost hold releases it). Another run, or ``files.exclusive`` called directly, is
  refused while it is held.
  """
  key = os.path.realpath(workdir)
  if key in _HELD_WORKDIRS:
    yield
    return
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(files.exclusive(workdir))
      except files.WorkdirBusyError as e:
        error = e
    if parallel.in_any_process(error is not None):  # only process 0 can be refused
      raise error or files.WorkdirBusyError(f"{workdir} is in use by another run (process "
                                            "0 found its lock held)")
    _HELD_WORKDIRS.add(key)
    try:
      yield
    finally:
      _HELD_WORKDIRS.discard(key)


class ConfigMismatchError(ValueError):
  """The workdir was created with a different config (raised in strict mode)."""


def config_to_dict(config: Any) -> dict[str, Any]:
  """``ConfigDict``/dataclass/mapping -> JSON-compatible dict (unknown leaves -> str)."""
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping, dataclass or ConfigDict; got {type(config)}")
  return json.loads(json.dumps(dict(config), default=_json_default, sort_keys=True))


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "to_dict"):
    return obj.to_dict()
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.asdict(obj)
  if isinstance(obj, (tuple, set, frozenset)):
    return list(obj)
  return str(obj)


def _dump(obj: Any) -> str:
  return files.dumps(obj, indent=2, sort_keys=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """Atomically writes ``obj`` as indented standard JSON (``files.dumps``; process 0 only;
  parent folders created). Read it back with ``files.read_json``."""
  if jax.process_index() != 0:
    return
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  files.write_atomically(path, lambda f: f.write(_dump(obj) + "\n"), mode="w")


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
  """Unified diff of the two configs as sorted, indented JSON ('' if equal)."""
  lines = difflib.unified_diff(_dump(old).splitlines(), _dump(new).splitlines(),
                               "workdir/config.json", "this run", lineterm="")
  return "\n".join(lines)


def _without_rerun_policy(config: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(config)
  for section, name in RERUN_POLICY_FIELDS:
    if isinstance(out.get(section), Mapping):
      out[section] = {k: v for k, v in out[section].items() if k != name}
  return out


def write_or_check_config(workdir: str, config: Any, *, on_mismatch: str = "warn",
                          saved_nothing: bool = False) -> dict:
  """Writes ``config.json`` on a fresh workdir; on a rerun compares and reports a diff.

  On mismatch with ``on_mismatch="warn"`` the diff is logged as a warning, the
  original ``config.json`` is kept and the new config is written beside it as
  ``config.rerun.json``; with ``"error"`` a :class:`ConfigMismatchError` is raised.
  With ``"warn"``, a workdir whose earlier attempt ``saved_nothing`` (no
  checkpoint) takes this run's config instead: ``config.json`` is replaced, the
  diff logged.
  """
  if on_mismatch not in ("warn", "error"):
    raise ValueError(f"on_mismatch={on_mismatch!r}; expected 'warn' or 'error'")
  new = config_to_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  diff = _diff_from_saved(path, new)
  if diff is None:
    write_json(path, new)
    return new
  if not diff and jax.process_index() == 0:  # A rerun as started: an older diff is stale.
    pathlib.Path(workdir, "config.rerun.json").unlink(missing_ok=True)
  if diff and saved_nothing and on_mismatch == "warn":
    logging.warning("replacing %s: the run started with it saved no checkpoint, and this "
                    "run's config differs:\n%s", path, diff)
    write_json(path, new)
    if jax.process_index() == 0:
      pathlib.Path(workdir, "config.rerun.json").unlink(missing_ok=True)
  elif diff:
    message = f"config differs from the one {workdir} was started with:\n{diff}"
    if on_mismatch == "error":
      if saved_nothing:
        message += f"\n(no checkpoint was saved: delete {path} to start with this config)"
      raise ConfigMismatchError(message)
    logging.warning("%s\n(keeping %s; this run's config is in config.rerun.json)",
                    message, path)
    write_json(os.path.join(workdir, "config.rerun.json"), new)
  return new


def replace_config(workdir: str, config: Any) -> dict:
  """Writes this run's ``config.json``, for binaries whose every run rewrites its outputs
  (evaluations, reports): the diff from a config it replaces is logged as a warning."""
  new = config_to_dict(config)
  path = os.path.join(workdir, CONFIG_FILE)
  if diff := _diff_from_saved(path, new):
    logging.warning("this run's outputs replace those of another config in %s:\n%s",
                    workdir, diff)
  write_json(path, new)
  return new


def _diff_from_saved(path: str, new: Mapping[str, Any]) -> str | None:
  """``config_diff`` of the config saved at ``path`` against ``new`` (the rerun policy
  left out); None when nothing is saved there."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    old = json.load(f)
  return config_diff(_without_rerun_policy(old), _without_rerun_policy(new))


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  """``summary.json``, standard JSON: a NaN or infinite number is written as the string
  ``"nan"``/``"inf"``, as in ``metrics.jsonl`` (bare ``NaN`` is not JSON)."""
  write_json(os.path.join(workdir, SUMMARY_FILE), dict(summary))


def append_run_record(workdir: str, record: Mapping[str, Any]) -> None:
  """Appends one line to ``runs.jsonl``: what started a run of this workdir (process 0)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, RUNS_FILE), "a", encoding="utf-8") as f:
    f.write(files.dumps(dict(record), sort_keys=True, default=str) + "\n")


def read_run_records(workdir: str) -> list[dict[str, Any]]:
  """The ``runs.jsonl`` records of ``workdir``, oldest first ([] when it has none)."""
  path = os.path.join(workdir, RUNS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def naming_recorded_imports(workdir: str) -> Iterator[None]:
  """A ``KeyError`` in the block (a loss registered by a module of the user's own, not
  imported on this rerun) gains the ``--imports`` the workdir's runs recorded."""
  try:
    yield
  except KeyError as e:
    raise KeyError(f"{e.args[0]}{imports_hint(workdir)}") from e


def imports_hint(workdir: str) -> str:
  """``" (its runs.jsonl records --imports=a,b)"`` when runs in ``workdir`` imported user
  modules (a loss registered there is unknown without them); ``""`` otherwise."""
  modules = sorted({m for r in read_run_records(workdir) for m in r.get("imports") or []})
  return f" (its runs.jsonl records --imports={','.join(modules)})" if modules else ""


def read_summary(workdir: str) -> dict[str, Any]:
  """``summary.json``, its non-finite numbers as floats (as the run's own summary had them)."""
  return files.read_json(os.path.join(workdir, SUMMARY_FILE))
