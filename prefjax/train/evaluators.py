"""Evaluators for ``train_loop(..., evaluators=[...])``: ``fn(step, model) -> {name: float}``.

``BatchEvaluator`` is the common case: a per-batch metric function
``eval_fn(model, batch) -> {name: scalar}``, jitted, run over a fresh pass of
eval batches and averaged, weighted by an optional ``num_examples`` (e.g. the
batch's real pairs) or ``num_tokens`` entry, so the average is the split's mean.
The result also holds that entry's total or, without weights, ``num_batches``.

Under several processes each one iterates its own rows, and every process must
join every global eval step: a process with fewer batches pads its list with
empty ones (``pair_mask`` / ``loss_mask`` zero), which a weighted ``eval_fn``
counts with weight 0.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from prefjax import parallel
from prefjax.train import metrics as metrics_lib
from prefjax.train import sharding as sharding_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

WEIGHT_KEYS = ("num_examples", "num_tokens")
# Zeroed in the empty batches that even out the processes' batch counts.
EMPTY_MASK_KEYS = ("pair_mask", "loss_mask")


def empty_batch(batch: Any) -> dict[str, Any]:
  """``batch`` with its real-example masks zeroed: a weighted ``eval_fn`` gives it weight 0."""
  masks = [k for k in EMPTY_MASK_KEYS if k in batch]
  if not masks:
    raise ValueError("an eval batch needs one of %s to be padded with empty batches "
                     "across processes; its keys are %s" % (EMPTY_MASK_KEYS, sorted(batch)))
  return {**batch, **{k: np.zeros_like(np.asarray(batch[k])) for k in masks}}


def padded_to(batches: list[Any], counts: Any) -> list[Any]:
  """This process's ``batches`` padded with empty ones to the most in ``counts`` (every
  process's batch count), so every process joins every global eval step."""
  most, fewest = int(np.max(counts)), int(np.min(counts))
  if fewest == 0 < most:  # raised by every process alike: none is left waiting
    raise ValueError(f"a process has no eval batches while another has {most} (batches per "
                     f"process: {np.asarray(counts).tolist()}): give the eval split at "
                     "least one batch per process")
  return batches + [empty_batch(batches[0])] * (most - len(batches))


class JoinedByEveryProcess:
  """Eval batches that every process iterates the same number of times: under several
  processes, this process's ``batches`` padded with empty ones (:func:`padded_to`);
  one process: ``batches`` as they are. Wrap the host batches before anything that
  runs a global computation per batch (e.g. a reference model's log-probs)."""

  def __init__(self, batches: Iterable[Any]):
    self.padded = False
    if jax.process_count() == 1:
      self._batches = batches
      return
    local = list(batches)
    counts = parallel.every_process(len(local))
    self._batches = padded_to(local, counts)
    self.padded = bool(np.min(counts) < np.max(counts))

  def __iter__(self):
    return iter(self._batches)


class BatchEvaluator:
  """``evaluator(step, model)`` averaging a jitted ``eval_fn`` over the eval batches.

  Args:
    eval_fn: ``(model, batch) -> {name: scalar}``, traced once per model structure.
    data: an iterable re-iterated at each eval, or a callable returning a fresh one
      (a :class:`JoinedByEveryProcess` when each batch passes through a global
      computation before the eval step).
    mesh: the training mesh; batches are sharded over its data axes when their
      size divides them, else replicated (None: the default device).
  """

  def __init__(self, eval_fn: step_lib.EvalFn,
               data: Iterable[Any] | Callable[[], Iterable[Any]], *,
               mesh: jax.sharding.Mesh | None = None):
    self._eval_fn, self._data, self._mesh = eval_fn, data, mesh
    self._steps: dict[nnx.GraphDef, Callable[..., Any]] = {}

  def _put(self, batch):
    try:
      return sharding_lib.put_batch(batch, self._mesh)
    except ValueError:
      if jax.process_count() > 1:
        raise
      return jax.device_put(jax.tree.map(np.asarray, batch))

  def __call__(self, step: int, model: nnx.Module) -> dict[str, float]:
    del step
    graphdef, params, extra = state_lib.split_model(model)
    if graphdef not in self._steps:
      self._steps[graphdef] = step_lib.make_eval_step(graphdef, self._eval_fn)
    eval_step = self._steps[graphdef]
    data = self._data() if callable(self._data) else self._data
    if not isinstance(data, JoinedByEveryProcess):
      data = JoinedByEveryProcess(data)
    totals: dict[str, float] = {}
    weight_sum, batches, weight_key = 0.0, 0, "num_batches"
    for batch in data:
      metrics = metrics_lib.to_python(eval_step(params, extra, self._put(batch)))
      keys = [k for k in WEIGHT_KEYS if k in metrics]
      if len(keys) > 1:
        raise ValueError(f"eval_fn returned both {keys}; one weight per batch")
      weight_key = keys[0] if keys else weight_key
      weight = metrics.pop(weight_key, 1.0)
      batches += 1
      if weight == 0:  # no real example (e.g. every process's part empty): 0/0 metrics
        continue
      for name, value in metrics.items():
        totals[name] = totals.get(name, 0.0) + weight * value
      weight_sum += weight
    if not batches:
      raise ValueError("the eval data yielded no batches")
    if data.padded and weight_key == "num_batches":
      raise ValueError("the processes have different numbers of eval batches, so some "
                       "were padded with empty ones: the eval_fn must weight its metrics "
                       f"by one of {WEIGHT_KEYS} (it returned neither)")
    if not weight_sum:
      raise ValueError(f"the eval batches hold no real examples ({weight_key} 0)")
    result = {name: total / weight_sum for name, total in totals.items()}
    result[weight_key] = weight_sum
    return result
