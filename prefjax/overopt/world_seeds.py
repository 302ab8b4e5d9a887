"""Each pooled world's own random draws.

A study that pools several world seeds (``text_world.pool_seeds``, ``curves.pool_worlds``)
concatenates their per-prompt values and bootstraps over them as independent prompts, so
every random draw of a world must be its own: held-out and training prompts, sampling and
evaluation keys, model initialisation, data order and train-state RNG. ``stream_seed``
folds the world's seed into a setting's seed for that; a world without a seed (the HH
world) keeps the setting's seed, and so its stage keys (``stream_key``) as before.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def world_seed(study_cfg: Mapping[str, Any]) -> int | None:
  """``study_cfg.world.seed``, or None for a world without one."""
  return (study_cfg.get("world") or {}).get("seed")


def stream_seed(seed: int, world: int | None) -> int:
  """``seed`` for world ``world``'s own draws (``seed`` itself when ``world`` is None)."""
  if world is None:
    return int(seed)
  return int(np.random.SeedSequence((int(seed), int(world))).generate_state(1)[0] >> 1)


def stream_key(seed: int, world: int | None) -> dict[str, int]:
  """A stage key's record of :func:`stream_seed` (nothing without a world seed)."""
  return {} if world is None else {"stream_seed": stream_seed(seed, world)}


def own_seeds(config: Any, seed: int) -> None:
  """Sets a binary config's model initialisation (``seed``), train-state RNG
  (``loop.seed``) and data order (``data.pipeline.seed``), where it has them, to ``seed``."""
  config.seed = int(seed)
  if "seed" in config.get("loop", {}):
    config.loop.seed = int(seed)
  if "seed" in config.get("data", {}).get("pipeline", {}):
    config.data.pipeline.seed = int(seed)
