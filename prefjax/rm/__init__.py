"""Reward-model training pieces used by ``experiments/train_rm.py`` (and evaluation binaries).

``loss``: the loss_fn built from ``config.loss`` (any ``PREFERENCE_LOSSES``
entry; ensembles with bootstrap weights; multi-objective heads). ``labels``:
objective labels of pairs for multi-objective models. ``evaluation``: the
full-pass evaluator (accuracy, log-loss, two-sided ECE, length baseline,
reliability plots) for ``train_loop(..., evaluators=[...])``.

Names are imported on first use (``prefjax._lazy``), so importing one
submodule does not pull in the others' dependencies.
"""

from prefjax import _lazy

_EXPORTS = {
    "RewardModelEvaluator": "evaluation",
    "eval_batches": "evaluation",
    "RewardLoss": "loss",
    "make_loss_fn": "loss",
    "pair_rewards": "loss",
    "reward_columns": "loss",
}
_SUBMODULES = ("evaluation", "labels", "loss")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
