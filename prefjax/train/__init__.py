"""Shared training core: train state, jitted step, checkpoints, metric writers, loop.

Typical use from an experiment binary::

  from prefjax import train
  result = train.train_loop(workdir=..., model=model, loss_fn=loss_fn,
                            optimizer=config.optimizer, loop=config.loop,
                            train_iter=it, config=config)
"""

from prefjax.train.checkpoint import Checkpointer
from prefjax.train.checkpoint import DamagedCheckpointError
from prefjax.train.checkpoint import NoIntactCheckpointError
from prefjax.train.checkpoint import load_params
from prefjax.train.evaluators import BatchEvaluator
from prefjax.train.loop import LoopConfig
from prefjax.train.loop import NonFiniteError
from prefjax.train.loop import StopOnSignal
from prefjax.train.loop import TrainResult
from prefjax.train.loop import train_loop
from prefjax.train.metrics import MetricWriter
from prefjax.train.metrics import read_metrics
from prefjax.train.schedules import OptimizerConfig
from prefjax.train.schedules import make_optimizer
from prefjax.train.schedules import make_schedule
from prefjax.train.sharding import batch_shardings
from prefjax.train.sharding import state_shardings
from prefjax.train.state import TrainState
from prefjax.train.state import create_train_state
from prefjax.train.state import merge_model
from prefjax.train.state import params_sha256
from prefjax.train.state import split_model
from prefjax.train.step import jit_train_step
from prefjax.train.step import make_eval_step
from prefjax.train.step import make_train_step
from prefjax.train.step import split_microbatches
from prefjax.train.summary import ConfigMismatchError
from prefjax.train.summary import read_summary
from prefjax.train.summary import write_or_check_config

__all__ = [
    "BatchEvaluator", "Checkpointer", "ConfigMismatchError", "DamagedCheckpointError", "LoopConfig",
    "MetricWriter", "NoIntactCheckpointError", "NonFiniteError", "StopOnSignal",
    "OptimizerConfig", "TrainResult", "TrainState", "batch_shardings", "create_train_state",
    "jit_train_step", "load_params", "make_eval_step", "make_optimizer", "make_schedule", "make_train_step",
    "merge_model", "params_sha256", "read_metrics", "read_summary", "split_microbatches",
    "split_model", "state_shardings", "train_loop", "write_or_check_config",
]
