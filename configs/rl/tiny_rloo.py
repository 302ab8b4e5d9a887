r"""RLOO on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.train_rl --config=configs/rl/tiny_rloo.py --workdir=/tmp/rl_tiny_rloo

EXPECTED: (filled in below after measuring)
"""

import ml_collections

from configs.rl import tiny_ppo


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = tiny_ppo.base_config()
  # 16 prompts x 4 samples = 64 sequences per step, one on-policy epoch.
  c.rl.algorithm = "rloo"
  c.rl.prompts_per_step = 16
  c.rl.group_size = 4
  c.rl.epochs = 1
  c.rl.num_minibatches = 1
  c.rl.kl_estimator = "k3"
  c.rl.num_steps = 30
  if arg == "quick":
    c.rl.num_steps = 8
    c.eval_every = 4
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
