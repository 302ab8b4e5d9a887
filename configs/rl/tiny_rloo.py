r"""RLOO on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.train_rl --config=configs/rl/tiny_rloo.py --workdir=/tmp/rl_tiny_rloo

Same world, policy, warm start and eval as configs/rl/tiny_ppo.py; RLOO with
16 prompts x 4 samples per step, one on-policy epoch, sequence-level k1 KL
penalty β=0.02, leave-one-out baseline (advantages scaled by their batch std).

EXPECTED (measured on this 2-core CPU, Intel Xeon, seed 0, 2026-12-06 after the sampler
fix, 1fc2d9a): 12 s wall with JAX's compilation cache warm on a quiet machine (33 s at
load average ~8.5). Held-out gold rises from -0.22 to +0.36 (SE 0.04) at step 12, then
falls to -0.89 at step 30 (exploit fraction 0.04 -> 0.92); proxy -0.10 -> +1.87; the
exact sequence KL peaks at 16.1 nats at step 21 and the penalty pulls it back to 12.8 at
step 30. Seeds 1 and 2: gold rises +0.12 / +0.35 and ends at -0.91. Before the fix:
gold -0.26 -> +0.16 -> -0.93, proxy +1.78, KL 15.8 -> 8.8. Until 2026-12-05 the penalty was k3,
whose gradient in
the reward is not the KL's (train_rl's docstring): gold peaked at +0.17, ended at -0.95,
proxy +1.89, KL 12 nats at the end, still rising.
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
  c.rl.kl_estimator = "k1"  # k3 in the reward is not KL's gradient (train_rl's docstring)
  c.loop.num_steps = 30
  if arg == "quick":
    c.loop.num_steps = 8
    c.loop.eval_every = 4
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
