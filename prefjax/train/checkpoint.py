"""Orbax checkpointing of the train state, data-iterator position and config.

One ``orbax.checkpoint.CheckpointManager`` under ``<workdir>/checkpoints`` keeps the last
``keep_last`` checkpoints plus the ``keep_best`` best ones by an eval metric (orbax
preservation policies ``LatestN`` + ``BestN``). Every checkpoint holds ``state`` (the
:class:`~prefjax.train.state.TrainState`: params, optimizer state, step, RNG key data,
skip counters), ``data`` (every process's train-iterator ``get_state()``, JSON) and
``config`` (the experiment config, JSON).

Saves are asynchronous where orbax supports it; :meth:`Checkpointer.wait` blocks until they
are durable. A final step's file sizes and SHA-256 digests are recorded (``integrity.py``)
and checked before every restore: a step whose files differ is skipped by
:meth:`Checkpointer.restore_newest_intact`, with a warning naming the step and the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from prefjax import configlib
from prefjax import files
from prefjax.parallel import distributed
from prefjax.parallel import rules
from prefjax.train import integrity
from prefjax.train import orbax_quirks
from prefjax.train import ranking
from prefjax.train import state as state_lib
from prefjax.train import summary as summary_lib

PyTree = Any


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: PyTree) -> PyTree:
  """Replaces typed PRNG keys by their raw ``uint32`` key data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree: PyTree, template: PyTree) -> PyTree:
  """Inverse of :func:`to_savable`, using ``template`` to know which leaves were keys."""
  def restore(t, x):
    return jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x
  return jax.tree.map(restore, template, tree)


def load_params(workdir: str | os.PathLike[str], model: nnx.Module, *,
                step: int | str | None = None, best_metric: str | None = None,
                best_mode: str | None = None,
                trainable: nnx.filterlib.Filter = nnx.Param) -> nnx.Module:
  """Loads the params saved by ``train_loop`` in ``workdir`` into ``model`` (in place).

  Args:
    workdir: a ``train_loop`` workdir (checkpoints under ``checkpoints/``).
    model: a model of the same architecture; its arrays' shardings are kept.
    step: an int, ``None``/``"latest"``, or ``"best"``.
    best_metric, best_mode: how ``"best"`` is ranked (an eval metric; ``min`` or ``max``,
      by default what the metric's name says, as ``loop.best_mode``); by default as the
      run ranked its checkpoints (``loop.best_metric`` in its ``config.json``).
    trainable: the filter the run trained with (only those variables load).

  Returns:
    ``model``, with the restored parameters.
  """
  ckpt = _read_only(workdir, best_metric, best_mode, step)
  try:
    step = _resolve_step(ckpt, workdir, step)
    _, params, _ = state_lib.split_model(model, trainable)
    nnx.update(model, ckpt.restore_params(params, step))
  finally:
    ckpt.close()
  return model


def saved_step(workdir: str | os.PathLike[str], step: int | str | None = None, *,
               best_metric: str | None = None, best_mode: str | None = None) -> int:
  """The step :func:`load_params` loads for these arguments."""
  ckpt = _read_only(workdir, best_metric, best_mode, step)
  try:
    step = _resolve_step(ckpt, workdir, step)
    return ckpt.latest_step() if step is None else step
  finally:
    ckpt.close()


def split_ref(ref: str | os.PathLike[str]) -> tuple[str, int | str | None]:
  """``"WORKDIR[@latest|@best|@STEP]"`` -> ``(workdir, step)`` for :func:`load_params`."""
  path, sep, suffix = os.path.expanduser(os.fspath(ref)).rpartition("@")
  if not sep:
    return path + sep + suffix, None
  if suffix in ("latest", "best"):
    return path, suffix
  if suffix.isdigit():
    return path, int(suffix)
  raise ValueError(f"checkpoint {os.fspath(ref)!r}: what follows the last '@' must be "
                   "latest, best or a step number (a path with '@' in it: end it with "
                   "@latest)")


def run_ranking(workdir: str | os.PathLike[str]) -> tuple[str, str | None]:
  """``(best_metric, best_mode)`` a run ranked its checkpoints by (its ``config.json``)."""
  path = os.path.join(os.fspath(workdir), summary_lib.CONFIG_FILE)
  loop = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      loop = json.load(f).get("loop") or {}
  if not loop.get("best_metric"):
    raise ValueError(f"{workdir} was trained without loop.best_metric, so no checkpoint of "
                     "it is ranked best; use @latest or @STEP")
  return loop["best_metric"], loop.get("best_mode")


def checkpoint_identity(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """What :func:`load_params` loads from ``WORKDIR[@latest|@best|@STEP]`` (default the
  latest step): the step and the SHA-256 of its file manifest (sizes and digests of every
  file), or ``{}`` without checkpoints. Outputs computed from a run's weights key their
  reuse on it."""
  workdir, step = split_ref(workdir)
  try:
    step = saved_step(workdir, step)
  except (FileNotFoundError, ValueError):
    return {}
  if step is None:
    return {}
  manifest = os.path.join(os.fspath(workdir), "checkpoints", str(step), integrity.MANIFEST)
  digest = None
  if os.path.exists(manifest):
    with open(manifest, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  return {"step": int(step), "manifest_sha256": digest}


def saved_run_config(workdir: str | os.PathLike[str], step: int | None = None
                     ) -> dict[str, Any]:
  """``Checkpointer.saved_config`` of ``workdir``'s checkpoint ``step`` (default: the
  latest); ``{}`` without one or when it cannot be read (callers then fall back on
  ``config.json``, and the parameters' restore reports what is wrong)."""
  try:
    ckpt = _read_only(workdir, None, "min", None)
  except FileNotFoundError:
    return {}
  try:
    step = ckpt.latest_step() if step is None else step
    return {} if step is None else ckpt.saved_config(step)
  except (KeyError, FileNotFoundError, ValueError):
    return {}
  finally:
    ckpt.close()


def _read_only(workdir, best_metric: str | None, best_mode: str | None,
               step: int | str | None) -> "Checkpointer":
  workdir = os.path.expanduser(os.fspath(workdir))
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints directory in {workdir}")
  if step == "best" and best_metric is None:  # as the run ranked its checkpoints
    best_metric, best_mode = run_ranking(workdir)
  if step == "best" and best_mode is None:
    try:
      best_mode = ranking.best_mode_for(best_metric)
    except configlib.ConfigError:
      raise ValueError(f"best_metric={best_metric!r}: pass best_mode='min' or 'max' (the "
                       "name does not say whether lower or higher is better)") from None
  return Checkpointer(directory, best_metric=best_metric, best_mode=best_mode or "min",
                      read_only=True)


def _resolve_step(ckpt: "Checkpointer", workdir, step: int | str | None) -> int | None:
  """An int step, or None for the latest (a command line's "12" is step 12)."""
  if isinstance(step, str) and step.strip().isdigit():
    return int(step)
  if step == "best":
    step = ckpt.best_step()
    if step is None:
      raise ValueError(f"no checkpoint in {workdir} has eval metric {ckpt.best_metric!r}")
  elif step == "latest":
    step = None
  elif isinstance(step, str):
    raise ValueError(f"step={step!r}: expected a step number, 'latest' or 'best'")
  return step


def _gather_json(value: Any) -> list[Any]:
  """Every process's JSON-serialisable ``value``, in process order (orbax's
  JSON items are written by the primary process only, but each host's data
  iterator is at its own position of its own shard)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(gathered[i, :int(n)].tobytes()) for i, n in enumerate(lengths.ravel())]


def array_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """``{"params/hidden/kernel": shape}`` for every array leaf of ``tree`` (or of a
  checkpoint's metadata tree), named as orbax names the saved arrays."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {rules.path_str(path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _params_first(name: str) -> tuple[bool, str]:
  return not name.startswith("params/"), name


def shape_mismatches(saved: Mapping[str, tuple[int, ...]],
                     wanted: Mapping[str, tuple[int, ...]], *, subtree: str = "",
                     limit: int = 6) -> str | None:
  """What keeps ``wanted`` arrays from restoring out of ``saved`` ones, or None.

  Names each array the model has and the checkpoint lacks, each the checkpoint has
  (under ``subtree``, for a restore of that part only) and the model lacks, and each
  whose shape differs, ``limit`` of each kind. Dtypes are not compared: a restore
  casts them.
  """
  missing = sorted(wanted.keys() - saved.keys(), key=_params_first)
  extra = sorted((k for k in saved.keys() - wanted.keys() if k.startswith(subtree)),
                 key=_params_first)
  changed = [f"{k}: checkpoint {saved[k]}, model {wanted[k]}"
             for k in sorted(wanted.keys() & saved.keys(), key=_params_first)
             if saved[k] != wanted[k]]
  parts = []
  for what, items in (("differing in shape", changed), ("only in the model", missing),
                      ("only in the checkpoint", extra)):
    if items:
      more = f"; … {len(items) - limit} more" if len(items) > limit else ""
      parts.append(f"arrays {what} ({len(items)}): " + "; ".join(items[:limit]) + more)
  return ". ".join(parts) or None


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class DamagedCheckpointError(ValueError):
  """A checkpoint step's files are missing or corrupt."""

  def __init__(self, directory: str, step: int, problem: str):
    super().__init__(f"checkpoint step {step} in {directory} is damaged: {problem}")
    self.step, self.problem = step, problem


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the temporary folders of saves cut short (a kill, a full disk): they hold no
  step and only take space. Done here, not by orbax's ``cleanup_tmp_directories``,
  whose background cleanup printed a traceback when a run stopped at once."""
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    if _UNFINISHED_SAVE.fullmatch(name):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      logging.warning("removed %s/%s, a save that did not finish", directory, name)


_UNFINISHED_SAVE = re.compile(r"\d+\.orbax-checkpoint-tmp(-\d+)?")


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint step of a run is damaged, or a finished run's are gone (one-line
  message for the user; ``loop.allow_restart`` starts from scratch instead)."""


class Checkpointer:
  """Saves/restores train state + iterator state + config with orbax.

  Args:
    directory: the checkpoints folder (a workdir's ``checkpoints/``).
    keep_last: the newest checkpoints kept.
    best_metric, best_mode, keep_best: also keep the ``keep_best`` checkpoints whose eval
      ``best_metric`` is lowest (``best_mode="min"``) or highest; ``@best`` loads the best.
    async_save: save in a background thread while training goes on.
    read_only: only read (``load_params``): nothing is created or cleaned up.
  """

  def __init__(self, directory: str | os.PathLike[str], *, keep_last: int = 3,
               best_metric: str | None = None, best_mode: str = "min", keep_best: int = 1,
               async_save: bool = True, read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode={best_mode!r}; expected 'min' or 'max'")
    if keep_last < 1:
      raise ValueError(f"keep_last={keep_last} must be >= 1 (resuming needs the latest)")
    policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
    if best_metric is not None:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._rank_value, reverse=best_mode == "min",
          n=keep_best, keep_checkpoints_without_metrics=False))
    # best_fn is also set so that orbax persists each checkpoint's metrics: a
    # resumed run then still knows which earlier checkpoints were best.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=self._rank_value if best_metric else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1)  # orbax warns when it has to set it
    self.directory = os.path.abspath(os.fspath(directory))  # orbax refuses relative paths
    self._read_only = read_only
    self.best_metric = best_metric
    self.restored_eval_owed = False  # set by restore()
    self._best_mode = best_mode
    self._unrecorded = False  # a save whose manifest is not written yet
    if not read_only and jax.process_index() == 0:
      _remove_unfinished_saves(self.directory)
    with orbax_quirks.warnings_off(read_only):  # "Given directory is read only", on every read
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, state: state_lib.TrainState, *, data_state: Any = None,
           config: Mapping[str, Any] | None = None,
           metrics: Mapping[str, float] | None = None, eval_owed: bool = False) -> bool:
    """Saves at ``state.step``; returns False if that step is already saved.

    ``eval_owed``: the step's eval was skipped (a preempted run saves at once); the run
    that restores it reads :attr:`restored_eval_owed` and evaluates before stepping on.
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    self.wait()  # Orbax waits for the previous save anyway; then its manifest is written.
    if metrics is not None and self.best_metric is not None and self.best_metric not in metrics:
      near = difflib.get_close_matches(self.best_metric, list(metrics), n=1)
      raise KeyError(f"best_metric {self.best_metric!r} missing from eval metrics "
                     f"{sorted(metrics)}" + (f": did you mean {near[0]!r}?" if near else ""))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(to_savable(state)),
        data=ocp.args.JsonSave({"per_process": _gather_json(data_state),
                                "eval_owed": bool(eval_owed)}),
        config=ocp.args.JsonSave(dict(config or {})))
    # Orbax writes the metrics as JSON: standard JSON, a NaN as "nan" (_metric_value reads it).
    saved = self._manager.save(step, args=args, force=True,
                               metrics=files.standard_json(dict(metrics))
                               if metrics is not None else None)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)
    self._unrecorded = self._unrecorded or saved
    return saved

  def record_finished_saves(self) -> bool:
    """Writes the manifest of a save that finished since (the training loop calls it at
    each step), so the step a crash resumes from is checked like the older ones; raises
    the error of a background save that failed. Returns whether it wrote (took time)."""
    if not self._unrecorded or self._manager.is_saving_in_progress():
      return False
    self._unrecorded = False
    self._manager.check_for_errors()
    self._write_manifests()
    return True

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _write_manifests(self) -> None:
    """Records the files of every finished step that has no manifest yet."""
    if self._read_only or jax.process_index() != 0 or not integrity.is_local(self.directory):
      return
    for step in self.all_steps():
      step_dir = self._step_dir(step)
      if os.path.isdir(step_dir) and not integrity.has_manifest(step_dir):
        integrity.write_manifest(step_dir)

  def restore(self, template: state_lib.TrainState,
              step: int | None = None) -> tuple[state_lib.TrainState, Any, dict[str, Any]]:
    """Restores ``(state, iterator_state, config)`` at ``step`` (default: latest).

    ``template`` is a state with the target structure, dtypes and shardings
    (e.g. the freshly initialised one).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(to_savable(template))),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    started_by = summary_lib.started_by(os.path.dirname(self.directory))
    restored = self._restore_step(
        step, args, "does not match the model/optimizer being trained (changed architecture "
        "or optimizer?" + (f" this workdir was started by {started_by}" if started_by else "")
        + ")", wanted=array_shapes(to_savable(template)),
        remedy="; to train this model and optimizer, use a new --workdir")
    state = from_savable(restored["state"], template)
    self.restored_eval_owed = bool(restored["data"].get("eval_owed", False))
    per_process = restored["data"]["per_process"]
    if len(per_process) != jax.process_count():
      raise ValueError(f"checkpoint {self.directory}/{step} holds data-iterator states of "
                       f"{len(per_process)} processes; this run has {jax.process_count()}")
    return state, per_process[jax.process_index()], restored["config"]

  def restore_newest_intact(
      self, template: state_lib.TrainState, *, allow_restart: bool = False,
  ) -> tuple[int, state_lib.TrainState, Any, dict[str, Any]] | None:
    """Restores ``(step, state, iterator_state, config)`` of the newest intact step.

    A damaged step (a file missing, resized or changed since it was saved, or a
    restore failing on corrupt files) is skipped with a warning naming the step and the
    file; once an older step restores, the damaged ones are moved to
    ``<directory>.damaged/`` so that training can save those steps again.

    Returns:
      None when there is no checkpoint, or when every step is damaged and
      ``allow_restart`` (the damaged steps are then moved aside: a fresh start).

    Raises:
      NoIntactCheckpointError: every step is damaged and not ``allow_restart``.
    """
    damaged = []
    orbax_quirks.quiet_abandoned_reads()
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored, damage = self.restore(template, step), None
      except DamagedCheckpointError as e:
        damage = e
      # Every process falls back together: damage one process saw (its read failed)
      # would otherwise leave it restoring an older step, or waiting, alone.
      if distributed.in_any_process(damage is not None):
        logging.warning("%s; trying the step before it",
                        damage or f"checkpoint step {step} is damaged in another process")
        damaged.append(step)
      else:
        if damaged:
          logging.warning("resuming from step %d, the newest intact checkpoint", step)
          self._set_aside(damaged)
        return (step, *restored)
      orbax_quirks.discard_abandoned_reads()  # the error, and with it the failed restore, is gone now
    if damaged and not allow_restart:
      raise NoIntactCheckpointError(
          f"no intact checkpoint in {self.directory} (damaged steps: "
          f"{', '.join(map(str, damaged))}, see the warnings above); rerun with "
          "--config.loop.allow_restart=True to start from scratch")
    if damaged:
      logging.warning("no intact checkpoint in %s: starting from scratch "
                      "(loop.allow_restart=True)", self.directory)
      self._set_aside(damaged)
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged steps out of orbax's directory (kept for inspection)."""
    if jax.process_index() == 0:
      aside = epath.Path(self.directory.rstrip("/") + ".damaged")
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target, suffix = aside / str(step), 1
        while target.exists():
          target, suffix = aside / f"{step}.{suffix}", suffix + 1
        epath.Path(self._step_dir(step)).rename(target)
        logging.warning("moved damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("prefjax_checkpoint_set_aside")
    self._manager.reload()

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    """``best_metric`` of a step's saved metrics as a number (a NaN is saved as "nan")."""
    return files.from_standard_json(metrics[self.best_metric])

  def _rank_value(self, metrics: Mapping[str, Any]) -> float:
    """``_metric_value`` for orbax's ``BestN``, which sorts with ``sorted``: a NaN there
    breaks the order and can delete the true best, so it ranks as the worst value, as
    does a step saved without ``best_metric`` (a rerun that changed it)."""
    present = self.best_metric in (metrics or {})
    value = float(self._metric_value(metrics)) if present else math.nan
    if np.isnan(value):
      return math.inf if self._best_mode == "min" else -math.inf
    return value

  def best_step(self) -> int | None:
    """Step of the best kept checkpoint by ``best_metric`` (None without metrics)."""
    if self.best_metric is None:
      raise ValueError("best_step needs a Checkpointer created with best_metric")
    scored = []
    for step in self.all_steps():
      metrics = self._manager.metrics(step)
      value = self._metric_value(metrics) if self.best_metric in (metrics or {}) else None
      if value is not None and not np.isnan(value):  # NaN compares as neither better nor worse
        scored.append((value, step))
    if not scored:
      return None
    sign = 1.0 if self._best_mode == "max" else -1.0  # a tie: the latest, as BestN keeps
    return max(scored, key=lambda vs: (sign * vs[0], vs[1]))[1]

  def restore_params(self, params: PyTree, step: int | None = None) -> PyTree:
    """Restores only the parameters (no optimizer state needed), e.g. for evaluation.

    Args:
      params: pytree of arrays or ``jax.ShapeDtypeStruct`` giving structure,
        dtypes and (optionally) shardings of the saved ``params``.
      step: checkpoint step (default: latest).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {"params": _abstract(params)}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(global_shape=x.shape, dtype=x.dtype,
                                       sharding=x.sharding or default), item)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    wanted = {f"params/{k}": v for k, v in array_shapes(params).items()}
    return self._restore_step(step, args, "params do not match the model", wanted=wanted,
                              subtree="params/")["state"]["params"]

  def _restore_step(self, step: int, args: ocp.args.Composite, mismatch: str, *,
                    wanted: Mapping[str, tuple[int, ...]], subtree: str = "",
                    remedy: str = "") -> Any:
    """``manager.restore`` that tells damaged files (DamagedCheckpointError) from
    a model that does not match the checkpoint (ValueError saying ``mismatch``).

    ``wanted``: the state's array shapes (:func:`array_shapes`), compared with the
    checkpoint's metadata before any array is read, so the error names the arrays
    that differ and no read is left half done. ``subtree``: the restore reads only the
    saved arrays under that prefix (e.g. ``params/``, not the optimizer state).
    """
    if step not in self.all_steps():
      raise FileNotFoundError(f"{self.directory} has no checkpoint step {step}; its steps: "
                              f"{self.all_steps() or 'none'}")
    problem = integrity.find_damage(self._step_dir(step))
    if distributed.in_any_process(problem is not None):  # before orbax's collective reads
      raise DamagedCheckpointError(self.directory, step,
                                   problem or "damaged as another process reads it")
    saved = self.saved_shapes(step)
    differences = None if saved is None else shape_mismatches(saved, wanted, subtree=subtree)
    if differences:
      raise ValueError(f"checkpoint {self.directory}/{step}: {mismatch}: {differences}{remedy}")
    try:
      return self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except
      if integrity.is_damage(e):
        raise DamagedCheckpointError(self.directory, step, integrity.describe(e)) from e
      if not isinstance(e, (ValueError, KeyError)):
        raise
      raise ValueError(f"checkpoint {self.directory}/{step}: {mismatch}: {e}{remedy}") from e

  def resave_with_metrics(self, state: state_lib.TrainState, metrics: Mapping[str, float], *,
                          data_state: Any = None) -> None:
    """Saves ``state``'s step again, with the eval ``metrics`` that rank it for ``best``
    (orbax records a step's metrics only when it is saved). For a step saved with its
    eval owed: ``state`` and ``data_state`` are what was restored from it, and its saved
    config is kept. A stop in between loses only this step (the rerun resumes earlier)."""
    step = int(jax.device_get(state.step))
    config = self.saved_config(step)
    self.wait()
    self._manager.delete(step)
    self.save(state, data_state=data_state, config=config, metrics=metrics)
    self.wait()

  def saved_config(self, step: int) -> dict[str, Any]:
    """The run config saved with ``step``: the one its weights were trained under (a
    rerun that trained on under a changed config saves its own)."""
    args = ocp.args.Composite(config=ocp.args.JsonRestore())
    return dict(self._manager.restore(step, args=args)["config"] or {})

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
    """The shapes of step's saved ``state`` arrays, or None if its metadata cannot be
    read (the restore then reports what is wrong)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
      metadata = handler.metadata(epath.Path(self._step_dir(step)) / "state")
    except Exception:  # pylint: disable=broad-except
      return None
    finally:
      handler.close()
    return array_shapes(getattr(metadata, "tree", metadata))

  def wait(self) -> None:
    """Blocks until every save is durable, and records the saved files."""
    self._manager.wait_until_finished()
    self._unrecorded = False
    self._write_manifests()

  def reached_preemption(self, step: int) -> bool:
    """True at a multi-host preemption sync point (JAX distributed only)."""
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.close()
    self._write_manifests()
