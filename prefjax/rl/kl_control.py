"""KL-coefficient controllers for RL against a frozen reference policy.

* ``FixedKLController``: β stays at its initial value.
* ``AdaptiveKLController``: the proportional controller of Ziegler et al.,
  "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593
  (Section 2.2):  e_t = clip((KL_t − KL_target)/KL_target, −0.2, 0.2),
  β_{t+1} = β_t·(1 + K_β·e_t). The paper fixes K_β = 0.1; this controller uses
  K_β = n_t / horizon, n_t the number of samples (sequences) in the step, as
  the paper's released code (openai/lm-human-preferences) and TRL do.

Controllers are tiny host-side objects whose whole state is ``value`` (β), so
a run saves it in its checkpoint and a resumed run continues bit-identically.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FixedKLController:
  """β = ``value`` forever."""
  value: float

  def update(self, kl: float, num_samples: int) -> float:
    del kl, num_samples
    return self.value


@dataclasses.dataclass
class AdaptiveKLController:
  """Ziegler et al. (2019) proportional controller towards ``target`` nats per sequence.

  Attributes:
    value: the current β.
    target: KL_target (nats per sequence, same unit as the ``kl`` passed to ``update``).
    horizon: the controller horizon H in samples; larger is slower.
  """
  value: float
  target: float
  horizon: float

  def __post_init__(self):
    if self.target <= 0 or self.horizon <= 0:
      raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got "
                       f"target={self.target}, horizon={self.horizon}")

  def update(self, kl: float, num_samples: int) -> float:
    """Updates β from the step's mean sequence KL; returns the new β."""
    check_horizon(self.horizon, num_samples)
    if not np.isfinite(kl):
      raise ValueError(f"AdaptiveKLController: KL is not finite ({kl})")
    error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
    self.value = float(self.value * (1.0 + error * num_samples / self.horizon))
    return self.value


def check_horizon(horizon: float, num_samples: int) -> None:
  """β is multiplied by 1 + e·n/H with |e| ≤ 0.2: H ≤ 0.2·n can make it 0 or negative, a
  reward for moving away from the reference."""
  if not horizon > 0.2 * num_samples:
    raise ValueError(f"rl.adaptive_kl.horizon={horizon:g} must exceed 0.2 x the {num_samples} "
                     f"sequences of a step ({0.2 * num_samples:g}): the controller multiplies "
                     "the KL coefficient by 1 + e·n/horizon with |e| <= 0.2, which would make "
                     "it 0 or negative")


def make_kl_controller(cfg) -> FixedKLController | AdaptiveKLController:
  """From a config with ``kl_coef`` and optional ``adaptive_kl`` (``target``, ``horizon``)."""
  adaptive = cfg.get("adaptive_kl") if hasattr(cfg, "get") else None
  if adaptive and adaptive.get("enabled", False):
    return AdaptiveKLController(float(cfg["kl_coef"]), float(adaptive["target"]),
                                float(adaptive["horizon"]))
  return FixedKLController(float(cfg["kl_coef"]))
