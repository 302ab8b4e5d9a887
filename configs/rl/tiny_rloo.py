r"""RLOO on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.train_rl --config=configs/rl/tiny_rloo.py --workdir=/tmp/rl_tiny_rloo

Same world, policy, warm start and eval as configs/rl/tiny_ppo.py; RLOO with
16 prompts x 4 samples per step, one on-policy epoch, sequence-level k3 KL
penalty β=0.02, leave-one-out baseline (advantages scaled by their batch std).

EXPECTED (measured on this shared 2-core CPU, seed 0): about 30-60 s wall
including compilation (remeasured 2026-12-01 after the inverse-CDF sampler,
8511f61). Held-out gold rises from -0.26 to about +0.17 (SE 0.06) at step 12,
then falls to about -0.95 at step 30 (exploit fraction 0.04 -> 0.95); proxy
-0.15 -> about +1.89; sequence KL about 12 nats at the end (exact; k3 9.5, remeasured 2026-12-05).
`:quick` = 8 steps (smoke test).
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
  c.loop.num_steps = 30
  if arg == "quick":
    c.loop.num_steps = 8
    c.loop.eval_every = 4
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
