"""Shared training core: train state, jitted step, checkpoints, metric writers, loop.

Typical use from an experiment binary::

  from prefjax import train
  result = train.train_loop(workdir=..., model=model, loss_fn=loss_fn,
                            optimizer=config.optimizer, loop=config.loop,
                            train_iter=it, config=config)

Names are imported on first use (``prefjax._lazy``), so importing one
submodule does not pull in the others' dependencies.
"""

from prefjax import _lazy

_EXPORTS = {
    "Checkpointer": "checkpoint",
    "DamagedCheckpointError": "checkpoint",
    "NoIntactCheckpointError": "checkpoint",
    "checkpoint_identity": "checkpoint",
    "load_params": "checkpoint",
    "BatchEvaluator": "evaluators",
    "JoinedByEveryProcess": "evaluators",
    "LoopConfig": "loop",
    "best_mode_for": "ranking",
    "NonFiniteError": "loop",
    "StopOnSignal": "loop",
    "TrainResult": "loop",
    "train_loop": "loop",
    "MetricWriter": "metrics",
    "read_metrics": "metrics",
    "OptimizerConfig": "schedules",
    "make_optimizer": "schedules",
    "make_schedule": "schedules",
    "batch_shardings": "sharding",
    "check_batch_shapes": "sharding",
    "data_parallel_size": "sharding",
    "state_shardings": "sharding",
    "TrainState": "state",
    "create_train_state": "state",
    "merge_model": "state",
    "params_sha256": "state",
    "split_model": "state",
    "jit_train_step": "step",
    "make_eval_step": "step",
    "make_train_step": "step",
    "split_microbatches": "step",
    "ConfigMismatchError": "summary",
    "hold_workdir": "summary",
    "read_summary": "summary",
    "write_or_check_config": "summary",
}
_SUBMODULES = (
    "checkpoint", "evaluators", "integrity", "loop", "metrics", "schedules",
    "sharding", "state", "step", "summary",
)

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
