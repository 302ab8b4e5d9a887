r"""Safety classifier on the tiny world: a random 2-layer encoder learns the harm character.

Command:
  python -m experiments.train_safety --config=configs/safety/tiny.py --workdir=/tmp/safety_tiny

Data: 2,000 ``TinyWorld.harm_pairs`` (chosen lacks the harm character "g", rejected
contains it), re-split 80/10/10 by prompt hash; byte tokens.

Expected: (filled in below after the measured run)
"""

from __future__ import annotations

import ml_collections

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (fewer steps)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  num_steps = ml_collections.FieldReference(200)
  config.tokenizer = dict(path="byte")
  config.model = dict(
      arch="encoder", preset="tiny", path="", head="reward", ensemble="heads",
      pooling="mean", dtype="float32",
      overrides=dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=64))
  config.data = experiment.data_section(
      name="tiny_world_harm", category_field="category",
      pipeline=dict(seed=0, batch_size=32, max_length=32, mode="padded",
                    bucket_boundaries=(24,)))
  config.safety = dict(pos_weight="balanced", target_precision=0.95, on_unreachable="error",
                       num_resamples=1000, eval_batch_size=64, test_split="resplit_test")
  config.optimizer = configlib.section(
      train.OptimizerConfig, name="adamw", learning_rate=3e-3, schedule="cosine",
      warmup_steps=10, total_steps=num_steps, weight_decay=0.0, grad_clip_norm=1.0)
  config.loop = configlib.section(train.LoopConfig, num_steps=num_steps, log_every=20,
                                  eval_every=100, checkpoint_every=100, seed=0,
                                  async_checkpointing=False)
  config.mesh = dict(shape=(-1, 1, 1), ensemble=1, num_devices=0)
  if arg == "quick":
    config.loop.num_steps = 40
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 0
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  return config
