"""The training loop: resume-or-init, jitted steps, eval, checkpoints, metrics.

A rerun with the same ``workdir`` resumes from the latest checkpoint: the
step, the RNG key, the optimizer state and the train iterator's position all
continue, so an interrupted run ends bit-identical to an uninterrupted one.

Evaluation, every ``loop.eval_every`` steps and at the end, is big_vision
style: each evaluator is ``fn(step, model) -> {name: float}``, called with the
current model; it may run its own jitted programs, sample, or write files.
Their metrics are logged as ``eval/<name>``. For the common case of a jitted
per-batch metric averaged over a pass of eval batches, wrap it in
``prefjax.train.BatchEvaluator(eval_fn, eval_batches, mesh=mesh)``.

Usage (an experiment binary)::

  result = train_loop(
      workdir=FLAGS.workdir, config=config, model=model, loss_fn=loss_fn,
      optimizer=config.optimizer, loop=config.loop, train_iter=train_iter,
      evaluators=[my_evaluator], tokens_in_batch=lambda b: int(b["attention_mask"].sum()),
      mesh=mesh, partition_rules=decoder.PARTITION_RULES)
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import optax
from absl import logging
from flax import nnx

from prefjax import configlib
from prefjax import parallel
from prefjax.train import checkpoint as checkpoint_lib
from prefjax.train import metrics as metrics_lib
from prefjax.train import ranking
from prefjax.train import schedules
from prefjax.train import sharding as sharding_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from prefjax.train import summary as summary_lib

Hook = Callable[[int, state_lib.TrainState, Mapping[str, jax.Array]], None]
StartHook = Callable[[int, state_lib.TrainState], None]
Evaluator = Callable[[int, nnx.Module], Mapping[str, Any]]
Optimizer = (schedules.OptimizerConfig | Mapping[str, Any] | optax.GradientTransformation
             | tuple[optax.GradientTransformation, optax.Schedule])


# Jitted train steps shared by loop calls with the same model structure, loss function and
# optimizer objects (and shardings): a binary run twice in one process (tests, sweeps)
# compiles its step once. Keys hold only hashable, identity-compared objects.
_STEP_CACHE: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_STEP_CACHE_SIZE = 8


def _hashable(key: Any) -> Any:
  try:
    hash(key)
  except TypeError:
    return None
  return key


class NonFiniteError(FloatingPointError):
  """Too many consecutive non-finite losses/gradients: training aborted."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Loop hyperparameters (``0`` disables an ``*_every`` except at the end).

  Attributes:
    num_steps: total train steps (batches), counted across resumes.
    log_every: write train metrics every this many steps.
    eval_every: run the evaluators every this many steps (and at the end).
    checkpoint_every: save every this many steps (and at the end).
    keep_checkpoints: keep the last N checkpoints.
    best_metric: eval metric name (without ``eval/``) whose best checkpoints are
      also kept; eval steps then always save.
    best_mode: ``min`` or ``max`` for ``best_metric``; by default what its name
      says (``best_mode_for``), an error when the name does not say.
    keep_best: number of best checkpoints kept.
    accum_steps: microbatches per optimizer update.
    presplit_microbatches: batches already carry a leading microbatch axis.
    max_consecutive_nonfinite: abort after this many consecutive skipped steps.
    async_checkpointing: orbax async saves.
    seed: seed of the train-state RNG key, which only a loss that draws random numbers
      reads (the RM's bootstrapped ensembles); ``config.seed`` sets the initialisation
      and the data order, so a seed sweep of the other trainers varies that one.
    on_config_mismatch: ``warn`` or ``error`` when resuming with another config.
    tensorboard: write TensorBoard event files.
    allow_restart: when every checkpoint of the workdir is damaged, start from
      scratch (they are moved to ``checkpoints.damaged/``) instead of stopping; likewise
      when a finished run's checkpoints are gone (``summary.refuse_lost_checkpoints``).
    eval_at_start: a fresh run also evaluates (and logs) at step 0.
  """
  num_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  best_metric: str | None = None
  best_mode: str | None = None
  keep_best: int = 1
  accum_steps: int = 1
  presplit_microbatches: bool = False
  max_consecutive_nonfinite: int = 10
  async_checkpointing: bool = True
  seed: int = 0
  on_config_mismatch: str = "warn"
  tensorboard: bool = True
  allow_restart: bool = False
  eval_at_start: bool = False

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"loop.num_steps={self.num_steps} must be >= 1")
    for name in ("accum_steps", "keep_checkpoints", "keep_best"):
      if getattr(self, name) < 1:
        raise ValueError(f"loop.{name}={getattr(self, name)} must be >= 1")
    for name in ("log_every", "eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"loop.{name}={getattr(self, name)} must be >= 0 (0 turns it off "
                         "except at the end)")
    if self.max_consecutive_nonfinite < 1:
      raise ValueError(f"loop.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must "
                       "be >= 1 (the run stops after that many skipped steps in a row)")
    if self.best_metric is not None:
      object.__setattr__(self, "best_mode", ranking.best_mode_for(self.best_metric,
                                                                     self.best_mode))

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any] | "LoopConfig") -> "LoopConfig":
    return configlib.dataclass_from_mapping(cls, cfg)


def _agreed_signal(signum: int | None) -> int | None:
  """The stop signal of this step: this process's, or under several processes the
  highest any of them received (the same answer in all)."""
  return parallel.highest_in_any_process(signum or 0) or None


@dataclasses.dataclass
class TrainResult:
  """What :func:`train_loop` returns.

  Attributes:
    state: final train state.
    model: the model passed in, updated in place with the final params and
      state (during training its arrays are donated to the train step; after
      an exception it must not be used).
    summary: contents of ``summary.json`` (empty when ``preempted`` before the end).
    preempted: stopped by SIGTERM/SIGINT after saving a checkpoint; also set, with the
      summary full, for a signal during the final eval or save, so that the caller stops
      rather than go on to its work after training.
  """
  state: state_lib.TrainState
  model: nnx.Module
  summary: dict[str, Any]
  preempted: bool = False


def _every(step: int, n: int) -> bool:
  return n > 0 and step % n == 0


def _make_tx(optimizer: Optimizer) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer, None
  if isinstance(optimizer, tuple) and len(optimizer) == 2:
    return optimizer
  return schedules.make_optimizer(optimizer)


class StopOnSignal:
  """SIGTERM / first SIGINT set ``signum``, checked between steps (graceful save + exit);
  a second SIGINT raises KeyboardInterrupt. Handlers are restored on exit."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: stop now.
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.signum = signum

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


class _Trainer:
  """State of one :func:`train_loop` call (see there for the arguments)."""

  def __init__(self, *, workdir, model, loss_fn, optimizer, loop, train_iter, config,
               evaluators, tokens_in_batch, mesh, partition_rules, hooks,
               trainable, sequential_updates=0, start_hooks=()):
    self.workdir, self.loop = str(workdir), LoopConfig.from_mapping(loop)
    self.train_iter, self.tokens_in_batch, self.hooks = train_iter, tokens_in_batch, hooks
    self.start_hooks, self.presplit = start_hooks, (self.loop.presplit_microbatches
                                                     or sequential_updates > 0)
    self.mesh = mesh
    # Processes that read the same rows (an ensemble or tensor axis across them) count
    # them once in the tokens_per_sec summed over processes.
    self.counts_tokens = parallel.first_holder_of_data_shard(mesh)
    self.config = summary_lib.config_to_dict(config)
    tx, schedule = _make_tx(optimizer)
    schedules.updates_at_zero_rate(schedule, self.loop.num_steps * max(sequential_updates, 1))
    self.user_model = model
    self.graphdef, state = state_lib.create_train_state(model, tx, self.loop.seed,
                                                        trainable=trainable)
    state_sh = None
    if mesh is not None:
      state_sh = sharding_lib.state_shardings(state, mesh, partition_rules or ())
      state = jax.device_put(state, state_sh)
    self.state = state
    micro_sh = None
    if mesh is not None and self.loop.accum_steps > 1:
      micro_sh = lambda mb: sharding_lib.micro_batch_shardings(mb, mesh)  # noqa: E731
    self.step_fn = step_lib.make_train_step(
        self.graphdef, loss_fn, tx, schedule=schedule, accum_steps=self.loop.accum_steps,
        presplit=self.loop.presplit_microbatches, micro_sharding=micro_sh,
        trainable=trainable, sequential_updates=sequential_updates)
    self._state_sh = state_sh
    self._step_key = object() if micro_sh is not None else _hashable((
        self.graphdef, loss_fn, tx, schedule, self.loop.accum_steps,
        self.loop.presplit_microbatches, trainable, sequential_updates,
        None if state_sh is None else tuple(jax.tree.flatten(state_sh)[0]))) or object()
    self.evaluators = list(evaluators)
    self.has_eval = bool(self.evaluators)
    self.checkpointer = checkpoint_lib.Checkpointer(
        f"{self.workdir}/checkpoints", keep_last=self.loop.keep_checkpoints,
        best_metric=self.loop.best_metric, best_mode=self.loop.best_mode or "min",
        keep_best=self.loop.keep_best, async_save=self.loop.async_checkpointing)
    self.last_eval: dict[str, float] | None = None
    self.last_eval_step = -1

  # -- data ------------------------------------------------------------------
  def _put_train(self, batch):
    return sharding_lib.put_batch(batch, self.mesh, presplit=self.presplit)

  def _iterator_state(self):
    get_state = getattr(self.train_iter, "get_state", None)
    return get_state() if get_state else None

  def _restore_iterator(self, iterator_state, step: int) -> None:
    set_state = getattr(self.train_iter, "set_state", None)
    if set_state is not None and iterator_state is not None:
      set_state(iterator_state)
      return
    logging.warning("train iterator has no get_state/set_state: skipping %d batches to "
                    "reach the checkpointed position", step)
    for _ in range(step):
      next(self.train_iter)

  # -- resume ----------------------------------------------------------------
  def restore_or_init(self) -> int:
    saved = self.checkpointer.all_steps()
    if not saved and not self.loop.allow_restart:
      summary_lib.refuse_lost_checkpoints(self.workdir, self.checkpointer.directory,
                                          self.loop.checkpoint_every)
    summary_lib.write_or_check_config(self.workdir, self.config,
                                      on_mismatch=self.loop.on_config_mismatch,
                                      saved_nothing=not saved)
    try:
      restored = self.checkpointer.restore_newest_intact(
          self.state, allow_restart=self.loop.allow_restart)
    except BaseException:
      summary_lib.discard_rerun_config(self.workdir)  # nothing trained under it
      raise
    if restored is None:
      summary_lib.start_afresh(self.workdir)
      logging.info("fresh start in %s (%d params)", self.workdir,
                   state_lib.count_params(self.state.params))
      return 0
    latest, self.state, iterator_state, _ = restored
    if self._state_sh is not None:
      self.state = jax.device_put(self.state, self._state_sh)
    self._restore_iterator(iterator_state, latest)
    logging.info("resumed %s at step %d", self.workdir, latest)
    return latest

  # -- steps -----------------------------------------------------------------
  def _train_step(self, batch):
    leaves, treedef = jax.tree.flatten(batch)
    batch_sh = tuple(x.sharding for x in leaves) if self.mesh is not None else None
    key = (self._step_key, treedef, batch_sh)
    if key not in _STEP_CACHE:
      _STEP_CACHE[key] = step_lib.jit_train_step(
          self.step_fn, state_shardings=self._state_sh,
          batch_shardings=jax.tree.unflatten(treedef, batch_sh) if batch_sh else None)
      while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    _STEP_CACHE.move_to_end(key)
    self.state, metrics = _STEP_CACHE[key](self.state, batch)
    return metrics

  def _finish_step(self, step: int, metrics, tokens: float, eval_metrics=None) -> None:
    """Host-side bookkeeping of a completed step (runs one step behind dispatch);
    ``tokens``: its batch's, counted in the ``tokens_per_sec`` of the record it ends."""
    aside = time.time()
    if self.checkpointer.record_finished_saves():  # hashing stays out of the step rates
      self.writer.exclude_from_rates(time.time() - aside)
    self.writer.add_tokens(tokens)
    host = metrics_lib.to_python(metrics)
    if not host["update_applied"]:
      logging.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s): update "
                      "skipped (%d skipped in total)", step, host["loss"], host["grad_norm"],
                      host["skipped_steps"])
    if host["consecutive_skipped"] >= self.loop.max_consecutive_nonfinite:
      self.writer.log(step, host)
      raise NonFiniteError(
          f"{host['consecutive_skipped']} consecutive non-finite steps (up to step {step}; "
          f"its loss={host['loss']}, grad_norm={host['grad_norm']}: a non-finite loss points "
          f"at the loss or the data, a finite one at the gradient); params are from the last "
          f"finite update. Last checkpoint: {self.checkpointer.latest_step()}")
    log_train = _every(step, self.loop.log_every) or step == self.loop.num_steps
    if log_train or eval_metrics is not None:
      self.writer.log(step, host if log_train else None, eval_metrics)
    self._unlogged_train = None if log_train else (step, host)

  def _save(self, eval_metrics=None, eval_owed: bool = False) -> bool:
    """Saves the current step; False if it was already saved."""
    metrics = eval_metrics if self.loop.best_metric else None
    saved = self.checkpointer.save(self.state, data_state=self._iterator_state(),
                                   config=self.config, metrics=metrics, eval_owed=eval_owed)
    # A killed run resumes from this step: TensorBoard must hold what came before it
    # (its writer flushes every 2 minutes; the lines after it are purged on resume).
    self.writer.flush()
    return saved

  def _is_eval_step(self, step: int) -> bool:
    return self.has_eval and (_every(step, self.loop.eval_every) or step == self.loop.num_steps)

  def _buffers_alive(self) -> bool:
    return not any(getattr(x, "is_deleted", lambda: False)()
                   for x in jax.tree.leaves(self.state))

  def run(self) -> TrainResult:
    start_step = self.restore_or_init()
    if start_step >= self.loop.num_steps and os.path.exists(
        os.path.join(self.workdir, summary_lib.SUMMARY_FILE)):
      summary = summary_lib.read_summary(self.workdir)
      if summary.get("final_step", start_step) == start_step:
        logging.info("%s already finished at step %d", self.workdir, start_step)
        if os.path.exists(os.path.join(self.workdir, summary_lib.RERUN_CONFIG_FILE)):
          logging.warning("%s already finished at step %d: nothing was trained under the "
                          "changed config above (raise loop.num_steps to train on under it, "
                          "or use a new --workdir)", self.workdir, start_step)
          summary_lib.discard_rerun_config(self.workdir)
        self.checkpointer.close()
        return TrainResult(self.state, self._model(), summary)
    if start_step > self.loop.num_steps:
      self.checkpointer.close()
      earlier = summary_lib.read_summary(self.workdir, previous=True).get("final_step")
      raise ValueError(
          f"{self.workdir} holds a checkpoint at step {start_step}, past loop.num_steps="
          f"{self.loop.num_steps}" + (f" (it finished at step {earlier}, then a longer run "
          "trained on and stopped)" if earlier else "") + ": rerun with the num_steps of "
          "the run that saved it (or more)")
    if start_step > 0:  # a changed rerun trains on: its diff stays in runs.jsonl
      summary_lib.record_config_change(self.workdir, start_step)
      summary_lib.set_aside_summary(self.workdir)  # a finished run trains on: stale
    self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=start_step,
                                           total_steps=self.loop.num_steps,
                                           tensorboard=self.loop.tensorboard)
    step, pending, consistent, exhausted = start_step, None, True, False
    self._unlogged_train = None
    for hook in self.start_hooks:
      hook(start_step, self.state)
    with StopOnSignal() as stop:
      try:
        if start_step == 0 and self.loop.eval_at_start and self.has_eval:
          self.writer.log(0, None, self._run_eval(0))
        elif start_step > 0 and self.checkpointer.restored_eval_owed and self.has_eval:
          # The preempted run saved this eval step without its eval: the curve keeps it,
          # and so does the ranking for ``@best``.
          eval_metrics = self._run_eval(start_step)
          self.writer.log(start_step, None, eval_metrics)
          if self.loop.best_metric:
            self.checkpointer.resave_with_metrics(self.state, eval_metrics,
                                                  data_state=self._iterator_state())
        # Every process must take the same steps: under several, a signal or the end of
        # one process's data stops them all at the same step (else the others wait in
        # the next step's collectives for good).
        stopping = _agreed_signal(stop.signum)
        while step < self.loop.num_steps and stopping is None:
          consistent = False
          try:
            batch = next(self.train_iter)
          except StopIteration:
            batch = None
          if parallel.in_any_process(batch is None):
            logging.warning("train iterator exhausted after %d steps", step)
            consistent = exhausted = True
            break
          tokens = (float(self.tokens_in_batch(batch))
                    if self.tokens_in_batch is not None and self.counts_tokens else 0.0)
          metrics = self._train_step(self._put_train(batch))
          step, consistent = step + 1, True
          if pending is not None:
            self._finish_step(*pending)
          pending = (step, metrics, tokens)
          for hook in self.hooks:
            hook(step, self.state, metrics)
          if jax.process_count() > 1 and self.checkpointer.reached_preemption(step):
            stop.signum = stop.signum or int(signal.SIGTERM)  # Multi-host preemption notice.
          stopping = _agreed_signal(stop.signum)
          # A stopping run saves at once: its eval waits for the rerun.
          is_eval = stopping is None and self._is_eval_step(step)
          if is_eval or _every(step, self.loop.checkpoint_every) or stopping is not None:
            aside = time.time()  # eval and save time stays out of the logged step rates
            eval_metrics = self._run_eval(step) if is_eval else None
            self.writer.exclude_from_rates(time.time() - aside)
            self._finish_step(*pending, eval_metrics)
            pending = None
            if is_eval and self.loop.best_metric or _every(step, self.loop.checkpoint_every):
              aside = time.time()
              self._save(eval_metrics, eval_owed=not is_eval and self._is_eval_step(step))
              self.writer.exclude_from_rates(time.time() - aside)
        if pending is not None:
          self._finish_step(*pending)
          pending = None
        if exhausted and self._unlogged_train is not None:  # the run's last step
          self.writer.log(*self._unlogged_train)
      except KeyboardInterrupt:
        if consistent and self._buffers_alive():
          logging.warning("interrupted at step %d: saving a checkpoint", step)
          if pending is not None:
            self._finish_step(*pending)
          self._save_stopped(step)
          self.checkpointer.wait()
        self._close()
        raise
      except Exception:
        self._close()  # Lets in-flight async saves finish before the error propagates.
        raise
      finally:
        self.writer.flush()
      # Still under the flag: a signal now cannot cut the last save short.
      if stopping is not None:
        return self._stop_preempted(step)
      result = self._finish(step)
      if _agreed_signal(stop.signum) is not None:  # it came during the final eval or save
        logging.warning("received a signal during the final eval or save: the run finished "
                        "and is saved; stopping before the work after training (a rerun "
                        "with the same workdir does it)")
        result.preempted = True
      return result

  def _close(self) -> None:
    self.checkpointer.close()
    self.writer.close()

  def _run_eval(self, step: int) -> dict[str, float]:
    start = time.time()
    logging.info("eval at step %d: running", step)
    result: dict[str, float] = {}
    model = state_lib.merge_model(self.graphdef, self.state.params, self.state.extra)
    for evaluator in self.evaluators:
      metrics = metrics_lib.to_python(dict(evaluator(step, model)))
      if clash := sorted(set(metrics) & set(result)):
        name = getattr(evaluator, "__name__", type(evaluator).__name__)
        raise ValueError(f"evaluator {name} returned {clash}, which an evaluator before "
                         "it returned too: the second value would replace the first; give "
                         "your evaluator's metrics names of their own")
      result.update(metrics)
    self.last_eval, self.last_eval_step = result, step
    logging.info("eval at step %d took %.1fs", step, time.time() - start)
    return result

  def _save_stopped(self, step: int) -> None:
    """A signal's or Ctrl-C's save: the step's eval, if it had one and it did not run,
    is owed to the rerun. Nothing is trained before step 1, so nothing is saved there:
    the rerun starts afresh (and redoes any warm start)."""
    if step > 0:
      self._save(eval_owed=self._is_eval_step(step) and self.last_eval_step != step)

  def _stop_preempted(self, step: int) -> TrainResult:
    self._save_stopped(step)
    self.checkpointer.wait()
    self.checkpointer.close()
    self.writer.close()
    logging.warning("stopped at step %d after a signal; %s", step, "rerun with the same "
                    "workdir to resume" if step else "nothing was saved before step 1, and a "
                    "rerun with the same workdir starts afresh")
    return TrainResult(self.state, self._model(), {}, preempted=True)

  def _finish(self, step: int) -> TrainResult:
    evaluated_now = self.has_eval and self.last_eval_step != step
    if evaluated_now:
      self.writer.log(step, None, self._run_eval(step))
    final_eval = self.last_eval if self.last_eval_step == step else None
    if not self._save(final_eval) and evaluated_now and self.loop.best_metric:
      # The data ran out on a checkpoint step that had no eval: the loop saved it
      # without metrics, so ``@best`` could not rank it by the eval just run.
      self.checkpointer.resave_with_metrics(self.state, final_eval,
                                            data_state=self._iterator_state())
    self.checkpointer.wait()
    summary = {
        "final_step": step,
        "final_eval": self.last_eval,
        "params_sha256": state_lib.params_sha256(self.state.params),
        "num_params": state_lib.count_params(self.state.params),
        "skipped_steps": int(jax.device_get(self.state.skipped_steps)),
        "wall_time": self.writer.wall_time,
        "best_checkpoint_step": (self.checkpointer.best_step()
                                 if self.loop.best_metric else None),
        "config_changes": summary_lib.config_changes(self.workdir),
    }
    self.checkpointer.close()
    summary_lib.write_summary(self.workdir, summary)
    self.writer.close()
    logging.info("finished at step %d: %s", step, summary)
    return TrainResult(self.state, self._model(), summary)

  def _model(self) -> nnx.Module:
    """The caller's model, updated in place with the trained values (its own arrays
    were donated to the train step)."""
    nnx.update(self.user_model, self.state.params, self.state.extra)
    return self.user_model


def train_loop(
    *,
    workdir: str,
    model: nnx.Module,
    loss_fn: step_lib.LossFn,
    optimizer: Optimizer,
    loop: LoopConfig | Mapping[str, Any],
    train_iter: Iterator[Any],
    config: Any = None,
    evaluators: Sequence[Evaluator] = (),
    tokens_in_batch: Callable[[Any], float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    partition_rules: Sequence[tuple[str, jax.sharding.PartitionSpec]] | None = None,
    hooks: Sequence[Hook] = (),
    trainable: nnx.filterlib.Filter = nnx.Param,
    sequential_updates: int = 0,
    start_hooks: Sequence[StartHook] = (),
) -> TrainResult:
  """Trains ``model`` with ``loss_fn`` until ``loop.num_steps``, resuming from ``workdir``.

  Args:
    workdir: output directory (config.json, metrics.jsonl, tensorboard/,
      checkpoints/, summary.json); rerunning with it resumes.
    model: the NNX model; its arrays are donated to the train step, and it
      holds the final values when the loop returns.
    loss_fn: ``(model, batch, rng) -> (scalar_loss, {name: scalar})``.
    optimizer: an :class:`~prefjax.train.schedules.OptimizerConfig` (or mapping),
      an optax transformation, or ``(tx, schedule)``.
    loop: :class:`LoopConfig` or mapping.
    train_iter: iterator of host batches (pytrees of arrays); grain iterators'
      ``get_state``/``set_state`` are checkpointed.
    config: the experiment config written to ``config.json`` and checkpoints.
    evaluators: ``fn(step, model) -> {name: float}``, run in order at every
      eval; ``model`` holds the current parameters (do not keep it: its arrays
      are donated to the next train step). ``BatchEvaluator`` averages a jitted
      per-batch ``eval_fn(model, batch)`` over eval batches. Two evaluators
      returning the same name is an error (one value would replace the other).
    tokens_in_batch: host batch -> token count, for ``tokens_per_sec``.
    mesh: a ``("data", "fsdp", "tensor")`` mesh; None = default device.
    partition_rules: the model's ``PARTITION_RULES``.
    hooks: ``(step, state, metrics)`` callbacks after each dispatched step.
    trainable: NNX filter of the variables to train (default every
      ``nnx.Param``); the rest, e.g. a frozen reference model inside ``model``,
      is carried in ``state.extra``, sharded by the same rules.
    sequential_updates: > 0 when each batch holds that many minibatches
      (leading axis) applied as successive updates within one step (PPO
      epochs; see ``prefjax.train.step.make_train_step``).
    start_hooks: ``(start_step, state)`` callbacks once the state is
      initialised or restored, before the first step (e.g. an on-policy
      iterator that samples with the current parameters).

  Returns:
    A :class:`TrainResult`.
  """
  with summary_lib.hold_workdir(workdir):
    trainer = _Trainer(workdir=workdir, model=model, loss_fn=loss_fn, optimizer=optimizer,
                       loop=loop, train_iter=train_iter, config=config, evaluators=evaluators,
                       tokens_in_batch=tokens_in_batch, mesh=mesh,
                       partition_rules=partition_rules, hooks=hooks, trainable=trainable,
                       sequential_updates=sequential_updates, start_hooks=start_hooks)
    return trainer.run()
