"""``config.json`` (with a diff check on resume), ``summary.json`` and ``runs.jsonl`` of a workdir,
written as standard JSON (``prefjax.files.dumps``); the workdir held by one run
(``hold_workdir``)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Iterator, Mapping

import jax
from absl import logging

from prefjax import configlib
from prefjax import files
from prefjax import parallel
from prefjax.train import metrics as metrics_lib

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
PREVIOUS_SUMMARY_FILE = "summary.previous.json"  # a finished run's, while a longer one trains
DISCARDED_SUMMARY_FILE = "summary.discarded.json"  # a run's that a fresh start replaced
RERUN_CONFIG_FILE = "config.rerun.json"  # a changed rerun's config, beside the first one
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
  ``config.rerun.json`` (replaced, or removed by a rerun as the run started or when the
  restore fails or the run had finished; the training loop keeps the diff in ``runs.jsonl``,
  :func:`record_config_change`); with
  ``"error"`` a :class:`ConfigMismatchError` is raised.
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
  if not diff:  # A rerun as started: an older diff is stale.
    discard_rerun_config(workdir)
  if diff and saved_nothing and on_mismatch == "warn":
    logging.warning("replacing %s: the run started with it saved no checkpoint, and this "
                    "run's config differs:\n%s", path, diff)
    write_json(path, new)
    discard_rerun_config(workdir)
  elif diff:
    message = f"config differs from the one {workdir} was started with:\n{diff}"
    if on_mismatch == "error":
      if saved_nothing:
        message += f"\n(no checkpoint was saved: delete {path} to start with this config)"
      raise ConfigMismatchError(message)
    logging.warning("%s\n(keeping %s; this run's config is in config.rerun.json; once it "
                    "trains on, the diff is recorded in %s and the summary's config_changes)",
                    message, path, RUNS_FILE)
    write_json(os.path.join(workdir, RERUN_CONFIG_FILE), new)
  return new


def discard_rerun_config(workdir: str) -> None:
  """Removes ``config.rerun.json`` (a run that wrote it stopped before training)."""
  if jax.process_index() == 0:
    pathlib.Path(workdir, RERUN_CONFIG_FILE).unlink(missing_ok=True)


def record_config_change(workdir: str, from_step: int) -> None:
  """Appends to ``runs.jsonl`` how the config a rerun trains on from ``from_step`` differs
  from ``config.json`` (its ``config.rerun.json``), when that differs from the last change
  recorded; a rerun as the workdir started, after a recorded change, is recorded with an
  empty diff. The records stay (:func:`config_changes`)."""
  if jax.process_index() != 0:
    return
  rerun = os.path.join(workdir, RERUN_CONFIG_FILE)
  diff = (_diff_from_saved(os.path.join(workdir, CONFIG_FILE),
                           files.read_json(rerun, standard=False)) or ""
          ) if os.path.exists(rerun) else ""
  changes = config_changes(workdir)
  kept = _kept_on_resume(changes, from_step)  # a record replaces the others
  if len(kept) < len(changes) or diff != (kept[-1]["config_diff"] if kept else ""):
    append_run_record(workdir, {"config_diff": diff, "from_step": from_step})


def _kept_on_resume(changes: list[dict[str, Any]], step: int | None) -> list[dict[str, Any]]:
  """The changes a rerun resuming at ``step`` keeps: what earlier runs trained from there on
  was discarded with its steps (a record without a step keeps them all)."""
  return [c for c in changes if step is None or c["from_step"] is None
          or c["from_step"] < step]


def config_changes(workdir: str) -> list[dict[str, Any]]:
  """The configs runs of ``workdir`` trained on under since it last started afresh
  (``runs.jsonl``), oldest first: ``{"from_step": the step they resumed at,
  "config_diff": the diff from config.json, "" for config.json itself}``. A record at a
  step replaces those at that step or later (their training was discarded when the rerun
  resumed there: a changed rerun stopped before its first step leaves no change)."""
  changes: list[dict[str, Any]] = []
  for record in read_run_records(workdir, skip_bad=True):
    if record.get("restart"):
      changes = []
    elif "config_diff" in record:
      step = record.get("from_step")
      changes = _kept_on_resume(changes, step)
      if record["config_diff"] != (changes[-1]["config_diff"] if changes else ""):
        changes.append({"from_step": step, "config_diff": record["config_diff"]})
  return changes


def refuse_lost_checkpoints(workdir: str, checkpoints: str, checkpoint_every: int) -> None:
  """Raises ``NoIntactCheckpointError`` when ``workdir``, which holds no checkpoint, holds
  the summary of a run that finished (its final checkpoint deleted or moved): retraining
  from scratch would replace its records. Warns when only ``metrics.jsonl`` suggests a
  save (logged past ``checkpoint_every``: this run's, unless ``config.json`` holds the
  one the workdir's run saved with), as a run killed during its first save leaves it."""
  from prefjax.train import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel (it imports us)
  lost_hint = (f"was {checkpoints} deleted or moved?" + (
      f" (damaged steps are in {checkpoints}.damaged)"
      if os.path.isdir(checkpoints + ".damaged") else ""))
  if any(os.path.exists(os.path.join(workdir, name))
         for name in (SUMMARY_FILE, PREVIOUS_SUMMARY_FILE)):
    raise checkpoint_lib.NoIntactCheckpointError(
        f"{workdir} holds no checkpoint, but the summary of a run that finished: "
        f"{lost_hint} Put it back to resume, or rerun with --config.loop.allow_restart=True "
        "to train from scratch (its summary set aside as summary.discarded.json, "
        "metrics.jsonl replaced)")
  config_path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(config_path):
    saved_loop = files.read_json(config_path, standard=False).get("loop") or {}
    checkpoint_every = saved_loop.get("checkpoint_every", checkpoint_every) or 0
  logged = max((r.get("step", 0) for r in metrics_lib.read_metrics(workdir, torn_tail_ok=True)),
               default=0)
  if 0 < checkpoint_every <= logged:
    logging.warning("%s holds no checkpoint, but metrics.jsonl logged step %d with "
                    "checkpoint_every=%d: killed during its first save, or %s This run "
                    "starts from step 0 and replaces those metrics.", workdir, logged,
                    checkpoint_every, lost_hint)


def start_afresh(workdir: str) -> None:
  """Before a fresh start in a workdir that held a run: its summaries are set aside as
  ``summary.discarded.json``, ``runs.jsonl`` marks the restart (the config changes the
  new run reports start after it) and records this run's change, if any, from step 0."""
  if jax.process_index() != 0:
    return
  for name in (PREVIOUS_SUMMARY_FILE, SUMMARY_FILE):  # the newer one is kept
    if os.path.exists(os.path.join(workdir, name)):
      os.replace(os.path.join(workdir, name), os.path.join(workdir, DISCARDED_SUMMARY_FILE))
      logging.warning("%s starts afresh: its %s is now %s", workdir, name,
                      DISCARDED_SUMMARY_FILE)
  if config_changes(workdir):
    append_run_record(workdir, {"restart": True})
  record_config_change(workdir, 0)


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
  old = files.read_json(path, standard=False)
  return config_diff(_without_rerun_policy(old), _without_rerun_policy(new))


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  """``summary.json``, standard JSON: a NaN or infinite number is written as the string
  ``"nan"``/``"inf"``, as in ``metrics.jsonl`` (bare ``NaN`` is not JSON)."""
  write_json(os.path.join(workdir, SUMMARY_FILE), dict(summary))


def code_state() -> dict[str, Any]:
  """The code a run ran: prefjax's git commit and whether its tracked files differed from
  it (None outside git), and the versions of the core libraries."""
  root = pathlib.Path(__file__).resolve().parents[2]
  def git(*args: str) -> str | None:
    try:
      done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                            timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return done.stdout.strip()
  commit = git("rev-parse", "HEAD")
  # --no-optional-locks: runs started together from one checkout must not race on its index.
  changes = (git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
             if commit else None)
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint"):
    try:
      versions[name] = importlib.metadata.version(name.replace(".", "-"))
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"prefjax_commit": commit,
          "prefjax_changed": None if changes is None else bool(changes), "versions": versions}


def append_run_record(workdir: str, record: Mapping[str, Any]) -> None:
  """Appends one line to ``runs.jsonl``: what started a run of this workdir (process 0)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, RUNS_FILE), "a", encoding="utf-8") as f:
    f.write(files.dumps(dict(record), sort_keys=True, default=str) + "\n")


def read_run_records(workdir: str, *, skip_bad: bool = False) -> list[dict[str, Any]]:
  """The ``runs.jsonl`` records of ``workdir``, oldest first ([] when it has none); a line
  that is not JSON (a full disk cut it) is an error naming it, or with ``skip_bad`` left
  out with a warning."""
  path = os.path.join(workdir, RUNS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          if not skip_bad:
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
          logging.warning("%s:%d: not a JSON object (%s): left out", path, number, e)
  return records


def started_by(workdir: str) -> str | None:
  """The binary (``experiments.NAME``) of ``workdir``'s newest recorded run, if any: the one
  whose outputs it holds, since another binary is let in only while it holds none (a run
  that stopped on its config before writing any)."""
  try:
    records = read_run_records(workdir, skip_bad=True)  # a cut last line hides nothing
  except OSError:
    return None
  argv = records[-1].get("argv") if records else None
  return binary_name(argv[0]) if argv else None


def binary_name(program: str) -> str | None:
  """``experiments.NAME`` of a command line's ``argv[0]`` (``…/experiments/NAME.py``)."""
  name = os.path.splitext(os.path.basename(program))[0]
  return f"experiments.{name}" if name else None


@contextlib.contextmanager
def naming_recorded_imports(workdir: str) -> Iterator[None]:
  """A ``KeyError`` or ``configlib.UnregisteredNameError`` in the block (a loss or RL
  algorithm registered by a module of the user's own, not imported on this rerun) gains the
  ``--imports`` the workdir's runs recorded."""
  try:
    yield
  except (KeyError, configlib.UnregisteredNameError) as e:
    raise type(e)(f"{e.args[0]}{imports_hint(workdir)}") from e


def imports_hint(workdir: str) -> str:
  """``" (its runs.jsonl records --imports=a,b)"`` when runs in ``workdir`` imported user
  modules that this process has not (a loss registered there is unknown without them);
  ``""`` otherwise: with them imported, the name itself is wrong."""
  recorded = sorted({m for r in read_run_records(workdir, skip_bad=True)
                     for m in r.get("imports") or []})
  if all(m in sys.modules for m in recorded):
    return ""
  return f" (its runs.jsonl records --imports={','.join(recorded)})"


def read_summary(workdir: str, *, previous: bool = False) -> dict[str, Any]:
  """``summary.json``, its non-finite numbers as floats (as the run's own summary had them);
  ``previous``: the one a run that trained on past its finish set aside ({} if none)."""
  if not previous:
    return files.read_json(os.path.join(workdir, SUMMARY_FILE))
  path = os.path.join(workdir, PREVIOUS_SUMMARY_FILE)
  return files.read_json(path) if os.path.exists(path) else {}


def set_aside_summary(workdir: str) -> None:
  """Moves a finished run's ``summary.json`` to ``summary.previous.json`` when a longer run
  trains on from it: while it trains, no summary claims the workdir is finished."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if jax.process_count() > 1:  # every process has read it (``run``) before it moves
    parallel.in_any_process(False)
  if jax.process_index() == 0 and os.path.exists(path):
    final = read_summary(workdir).get("final_step")
    os.replace(path, os.path.join(workdir, PREVIOUS_SUMMARY_FILE))
    logging.info("%s finished at step %s and trains on: its summary is now %s until this "
                 "run finishes", workdir, final, PREVIOUS_SUMMARY_FILE)
