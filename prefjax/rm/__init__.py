"""Reward-model training pieces used by ``experiments/train_rm.py`` (and evaluation binaries).

``loss``: the loss_fn built from ``config.loss`` (any ``PREFERENCE_LOSSES``
entry; ensembles with bootstrap weights; multi-objective heads). ``labels``:
objective labels of pairs for multi-objective models. ``evaluation``: the
full-pass evaluator (accuracy, log-loss, two-sided ECE, length baseline,
reliability plots) for ``train_loop(..., evaluators=[...])``.
"""

from prefjax.rm.evaluation import RewardModelEvaluator
from prefjax.rm.evaluation import eval_batches
from prefjax.rm.loss import RewardLoss
from prefjax.rm.loss import make_loss_fn
from prefjax.rm.loss import pair_rewards
from prefjax.rm.loss import reward_columns

__all__ = ["RewardLoss", "RewardModelEvaluator", "eval_batches", "make_loss_fn",
           "pair_rewards", "reward_columns"]
