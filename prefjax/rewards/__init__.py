"""Reward functions: gold/proxy reward wrappers, ensembles and normalisation.

* ``RewardFn``: tokens and/or texts -> ``[N]`` (or ``[N, K]`` for ensembles).
* ``ProgrammaticReward`` (gold functions), ``ModelReward`` (reward models),
  ``EnsembleReward`` (K members + aggregation), ``NormalizedReward``.
* ``aggregate(rewards[..., K], method, lam)`` with ``mean``, ``wco``, ``uwo``.
* ``RewardNormalizer``: shift (and scale) so the reference policy scores 0.
"""

from prefjax.rewards.aggregate import AGGREGATIONS
from prefjax.rewards.aggregate import aggregate
from prefjax.rewards.aggregate import ensemble_mean
from prefjax.rewards.aggregate import uncertainty_weighted
from prefjax.rewards.aggregate import worst_case
from prefjax.rewards.base import NormalizedReward
from prefjax.rewards.base import ProgrammaticReward
from prefjax.rewards.base import RewardFn
from prefjax.rewards.base import check_rewards
from prefjax.rewards.ensemble import EnsembleReward
from prefjax.rewards.model import ModelReward
from prefjax.rewards.normalize import RewardNormalizer

__all__ = [
    "AGGREGATIONS", "EnsembleReward", "ModelReward", "NormalizedReward",
    "ProgrammaticReward", "RewardFn", "RewardNormalizer", "aggregate", "check_rewards",
    "ensemble_mean", "uncertainty_weighted", "worst_case",
]
