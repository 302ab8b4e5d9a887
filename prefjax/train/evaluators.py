"""Evaluators for ``train_loop(..., evaluators=[...])``: ``fn(step, model) -> {name: float}``.

``BatchEvaluator`` is the common case: a per-batch metric function
``eval_fn(model, batch) -> {name: scalar}``, jitted, run over a fresh pass of
eval batches and averaged, weighted by an optional ``num_examples`` (e.g. the
batch's real pairs) or ``num_tokens`` entry, so the average is the split's mean.
The result also holds that entry's total or, without weights, ``num_batches``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from prefjax.train import metrics as metrics_lib
from prefjax.train import sharding as sharding_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

WEIGHT_KEYS = ("num_examples", "num_tokens")


class BatchEvaluator:
  """``evaluator(step, model)`` averaging a jitted ``eval_fn`` over the eval batches.

  Args:
    eval_fn: ``(model, batch) -> {name: scalar}``, traced once per model structure.
    data: an iterable re-iterated at each eval, or a callable returning a fresh one.
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
    totals: dict[str, float] = {}
    weight_sum, batches, weight_key = 0.0, 0, "num_batches"
    for batch in data:
      metrics = metrics_lib.to_python(eval_step(params, extra, self._put(batch)))
      keys = [k for k in WEIGHT_KEYS if k in metrics]
      if len(keys) > 1:
        raise ValueError(f"eval_fn returned both {keys}; one weight per batch")
      weight_key = keys[0] if keys else weight_key
      weight = metrics.pop(weight_key, 1.0)
      for name, value in metrics.items():
        totals[name] = totals.get(name, 0.0) + weight * value
      weight_sum += weight
      batches += 1
    if not batches:
      raise ValueError("the eval data yielded no batches")
    result = {name: total / weight_sum for name, total in totals.items()}
    result[weight_key] = weight_sum
    return result
