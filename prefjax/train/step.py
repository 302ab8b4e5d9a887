"""The jitted train step: gradient accumulation, NaN guard, metrics.

:func:`make_train_step` turns a user ``loss_fn(model, batch, rng) -> (loss,
metrics)`` into ``step(state, batch) -> (state, metrics)``. The batch is split
into ``accum_steps`` microbatches scanned with ``lax.scan``; gradients, losses
and metrics are averaged over microbatches, so for a loss that is a mean over
equally sized microbatches the update equals one step on the whole batch.

Losses normalised per microbatch by a data-dependent count (tokens, non-padding
pairs) can report that count as the metric ``loss_weight``: microbatches are
then combined with weights ``w_j / sum(w)`` instead of ``1 / A``, which makes a
weighted/token mean over the whole batch exact under accumulation (a plain
average of per-microbatch token means would over-weight short microbatches). A
metric normalised by its own count (say accuracy over decisive pairs, where ties
do not count) reports that count as ``weight_of/<name>``: it is then pooled with
those weights, and the ``weight_of/`` entries are not logged. Counts are summed, not
averaged: ``loss_weight`` and every metric whose name's last part starts with ``num_``
(``num_pairs``, ``eval/num_tokens``) is the whole batch's total.

Microbatches are taken with a stride (microbatch ``j`` holds rows ``j, j+A,
j+2A, ...``). For a batch sharded over ``("data", "fsdp")`` this keeps every
microbatch spread over all devices, and for padded pair batches (rows
``0..B-1`` chosen, ``B..2B-1`` rejected) it keeps chosen/rejected rows of a
pair together with the chosen-then-rejected layout whenever ``B % A == 0``.
Packed pair batches index rows (``chosen_index``) and cannot be split by rows:
pipelines must then yield batches that already carry the microbatch axis
(``presplit=True``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefjax.parallel import rules
from prefjax.train import state as state_lib

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, Metrics]]
EvalFn = Callable[[nnx.Module, Batch], Metrics]
TrainStep = Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, Metrics]]

LOSS_WEIGHT = "loss_weight"
WEIGHT_OF = "weight_of/"




def split_microbatches(batch: Batch, accum_steps: int) -> Batch:
  """Reshapes every leaf ``[N, ...]`` to ``[accum_steps, N // accum_steps, ...]`` (strided)."""
  index_fields = [k for k in rules.ROW_INDEX_FIELDS if isinstance(batch, Mapping) and k in batch]
  if index_fields:
    raise ValueError(
        f"batch fields {index_fields} index rows of the whole packed batch, so it cannot be "
        f"split into {accum_steps} microbatches by rows; have the pipeline yield presplit "
        "batches [accum_steps, ...] and set presplit_microbatches=True")
  def split(path, x):
    n = x.shape[0] if x.ndim else None
    if n is None or n % accum_steps:
      raise ValueError(
          f"batch field {rules.path_str(path)!r} with shape {x.shape}: leading "
          f"dimension must be divisible by accum_steps={accum_steps}")
    x = x.reshape((n // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree_util.tree_map_with_path(split, batch)


# Written by the train step next to a loss_fn's own metrics (which would be overwritten).
RESERVED_METRICS = frozenset({"loss", "grad_norm", "update_applied", "skipped_steps",
                              "consecutive_skipped", "learning_rate"})


def _check_loss_output(out: Any) -> tuple[jax.Array, Metrics]:
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
    raise TypeError("loss_fn must return (scalar_loss, metrics_dict); got "
                    f"{type(out).__name__}")
  loss, metrics = out
  if jnp.shape(loss) != ():
    raise ValueError(f"loss_fn must return a scalar loss; got shape {jnp.shape(loss)} "
                     "(reduce per-example losses with a (weighted) mean)")
  if taken := sorted(RESERVED_METRICS & set(metrics)):
    raise ValueError(f"loss_fn metrics {taken} are names the train step writes itself; "
                     "rename them")
  for name, value in metrics.items():
    if not isinstance(value, (int, float, np.generic, np.ndarray, jax.Array)):
      raise TypeError(f"loss_fn metric {name!r} must be a scalar array or number; got "
                      f"{type(value).__name__}")
    shape = jnp.shape(value)
    if shape != ():
      raise ValueError(f"loss_fn metric {name!r} must be a scalar; got shape {shape}")
  return jnp.asarray(loss, jnp.float32), {k: jnp.asarray(v, jnp.float32)
                                          for k, v in metrics.items()}


def _grads_one(graphdef, loss_fn, trainable, params, extra, batch, rng):
  """Loss, metrics, new extra state and gradients for one microbatch."""
  def inner(p):
    model = state_lib.merge_model(graphdef, p, extra)
    loss, metrics = _check_loss_output(loss_fn(model, batch, rng))
    new_extra = nnx.to_pure_dict(nnx.split(model, trainable, ...)[2])
    return loss, (metrics, new_extra)
  (loss, (metrics, new_extra)), grads = jax.value_and_grad(inner, has_aux=True)(params)
  return loss, metrics, new_extra, grads


def _is_count(name: str) -> bool:
  """``loss_weight`` and ``num_*`` metrics are counts: summed over microbatches (the others
  are means over them, weighted by ``loss_weight``)."""
  return name == LOSS_WEIGHT or name.split("/")[-1].startswith("num_")


def _accumulate(graphdef, loss_fn, trainable, params, extra, micro, rng, accum_steps,
                micro_sharding):
  """Loss/metrics/grads over the microbatch axis via ``lax.scan``, combined by ``loss_weight``."""
  def body(carry, xs):
    grad_sum, weight_sum, extra = carry
    mb, i = xs
    if micro_sharding is not None:
      mb = jax.lax.with_sharding_constraint(mb, micro_sharding(mb))
    loss, metrics, extra, grads = _grads_one(graphdef, loss_fn, trainable, params, extra, mb,
                                             jax.random.fold_in(rng, i))
    weight = metrics.get(LOSS_WEIGHT, jnp.ones((), jnp.float32))
    grad_sum = jax.tree.map(lambda s, g: s + weight.astype(s.dtype) * g.astype(s.dtype),
                            grad_sum, grads)
    return (grad_sum, weight_sum + weight, extra), (loss, metrics, weight)
  # Sums in float32 at least, in float64 for float64 parameters (x64 mode).
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                       params)
  init = (zeros, jnp.zeros((), jnp.float32), extra)
  (grad_sum, weight_sum, extra), (losses, metrics, weights) = jax.lax.scan(
      body, init, (micro, jnp.arange(accum_steps)))
  # All-zero weights (only padding) give a zero gradient rather than 0/0.
  denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom.astype(g.dtype)).astype(p.dtype), grad_sum,
                       params)
  return (jnp.sum(weights * losses) / denom, _pool_microbatches(metrics, weights, denom), extra,
          grads)


def _pool_microbatches(metrics: Metrics, weights: jax.Array, denom: jax.Array) -> Metrics:
  """Counts summed; a metric with a ``weight_of/`` entry averaged with those weights (0
  when they are all 0, as one batch without such items reports); the rest by ``weights``."""
  pooled = {}
  for name, values in metrics.items():
    own = metrics.get(WEIGHT_OF + name)
    if _is_count(name) or name.startswith(WEIGHT_OF):
      pooled[name] = jnp.sum(values, axis=0)
    elif own is not None:
      total = jnp.sum(own, axis=0)
      pooled[name] = jnp.sum(own * values, axis=0) / jnp.where(total > 0, total, 1.0)
    else:
      pooled[name] = jnp.sum(weights * values, axis=0) / denom
  return pooled


def _sequential(graphdef, loss_fn, trainable, tx, params, opt_state, extra, minibatches, rng,
                num_updates):
  """One optimizer update per slice of the leading axis, in order (``lax.scan``)."""
  def body(carry, xs):
    params, opt_state, extra, finite = carry
    mb, i = xs
    loss, metrics, extra, grads = _grads_one(graphdef, loss_fn, trainable, params, extra, mb,
                                             jax.random.fold_in(rng, i))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    finite = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return (params, opt_state, extra, finite), (loss, metrics, grad_norm)
  init = (params, opt_state, extra, jnp.ones((), bool))
  (params, opt_state, extra, finite), (losses, metrics, norms) = jax.lax.scan(
      body, init, (minibatches, jnp.arange(num_updates)))
  metrics = {k: jnp.mean(v) for k, v in metrics.items()}
  return jnp.mean(losses), metrics, jnp.mean(norms), finite, params, opt_state, extra


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _update_if(finite: jax.Array, tx: optax.GradientTransformation, grads, opt_state, params):
  """``(params, opt_state)`` after one update when ``finite``, else unchanged.

  A conditional rather than a select after the update: the select is one more pass over
  params and both moments, and keeps old and new buffers alive together (RM step on CPU:
  60-90 MB less peak memory, see benchmarks/RESULTS.md).
  """
  def apply(operands):
    grads, opt_state, params = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def keep(operands):
    _, opt_state, params = operands
    return params, opt_state
  return jax.lax.cond(finite, apply, keep, (grads, opt_state, params))


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
    presplit: bool = False,
    micro_sharding: Callable[[Batch], Any] | None = None,
    trainable: nnx.filterlib.Filter = nnx.Param,
    sequential_updates: int = 0,
) -> TrainStep:
  """Builds the (unjitted) train step; see :func:`jit_train_step`.

  Args:
    graphdef: static model structure from :func:`state_lib.create_train_state`.
    loss_fn: ``(model, batch, rng) -> (scalar_loss, {name: scalar})``; the loss
      should be a mean over examples so accumulation matches a big batch. A
      ``loss_weight`` metric (e.g. the microbatch's token count) weights the
      microbatches (see the module docstring).
    tx: optax transformation.
    schedule: learning-rate schedule for the ``learning_rate`` metric.
    accum_steps: number of microbatches per optimizer update.
    presplit: the batch already has a leading microbatch axis of size
      ``accum_steps``.
    micro_sharding: optional ``microbatch -> shardings`` constraint applied
      inside the scan (keeps microbatches spread over the data axes).
    trainable: the NNX filter the state was created with.
    sequential_updates: when > 0, every batch leaf carries a leading axis of
      this many minibatches, applied as successive optimizer updates within
      the step (PPO-style epochs over one rollout); the step is skipped as a
      whole when any of them is non-finite, and metrics (``grad_norm``
      included) are their means. Excludes ``accum_steps`` > 1.

  Returns:
    ``step(state, batch) -> (state, metrics)``. Metrics: the user metrics (means over
    microbatches; ``loss_weight`` and ``num_*`` counts summed), ``loss``, ``grad_norm`` (before clipping), ``learning_rate`` (of this
    update), ``update_applied`` (0 when skipped), ``skipped_steps`` and
    ``consecutive_skipped``. A non-finite loss or gradient skips the update
    (params, optimizer and extra state unchanged) and is counted.
  """
  if accum_steps < 1:
    raise ValueError(f"accum_steps={accum_steps} must be >= 1")
  if sequential_updates and (accum_steps > 1 or presplit):
    raise ValueError("sequential_updates excludes gradient accumulation (accum_steps > 1)")

  def train_step(state: state_lib.TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if sequential_updates:
      return _sequential_step(state, batch, rng)
    if accum_steps == 1 and not presplit:
      loss, metrics, extra, grads = _grads_one(graphdef, loss_fn, trainable, state.params,
                                               state.extra, batch, rng)
    else:
      micro = batch if presplit else split_microbatches(batch, accum_steps)
      loss, metrics, extra, grads = _accumulate(graphdef, loss_fn, trainable, state.params,
                                                state.extra, micro, rng, accum_steps,
                                                micro_sharding)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = _update_if(finite, tx, grads, state.opt_state, state.params)
    return _finish(state, loss, metrics, grad_norm, finite, params, opt_state, extra,
                   state.applied_steps)

  def _sequential_step(state, batch, rng):
    loss, metrics, grad_norm, finite, params, opt_state, extra = _sequential(
        graphdef, loss_fn, trainable, tx, state.params, state.opt_state, state.extra, batch,
        rng, sequential_updates)
    params, opt_state = _select(finite, (params, opt_state), (state.params, state.opt_state))
    return _finish(state, loss, metrics, grad_norm, finite, params, opt_state, extra,
                   state.applied_steps * sequential_updates)

  def _finish(state, loss, metrics, grad_norm, finite, params, opt_state, extra, updates_done):
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    consecutive = jnp.where(finite, 0, state.consecutive_skipped + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=params, opt_state=opt_state,
        extra=_select(finite, extra, state.extra),
        skipped_steps=skipped, consecutive_skipped=consecutive)
    metrics = {k: v for k, v in metrics.items() if not k.startswith(WEIGHT_OF)}
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   update_applied=finite.astype(jnp.float32),
                   skipped_steps=skipped, consecutive_skipped=consecutive)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(updates_done), jnp.float32)
    return new_state, metrics

  return train_step


def jit_train_step(
    train_step: TrainStep,
    *,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    donate: bool = True,
) -> TrainStep:
  """``jax.jit`` with state donation and, when given, in/out shardings."""
  kwargs = {}
  if state_shardings is not None:
    kwargs = dict(in_shardings=(state_shardings, batch_shardings),
                  out_shardings=(state_shardings, None))
  return jax.jit(train_step, donate_argnums=(0,) if donate else (), **kwargs)


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: EvalFn) -> Callable[..., Metrics]:
  """Jitted ``(params, extra, batch) -> metrics`` for ``eval_fn(model, batch)``."""
  def eval_step(params, extra, batch):
    metrics = eval_fn(state_lib.merge_model(graphdef, params, extra), batch)
    if not isinstance(metrics, Mapping):
      raise TypeError(f"eval_fn must return a metrics dict; got {type(metrics).__name__}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  return jax.jit(eval_step)
