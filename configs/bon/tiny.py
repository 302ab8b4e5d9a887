r"""Best-of-n on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.best_of_n --config=configs/bon/tiny.py --workdir=/tmp/bon_tiny

EXPECTED: (filled in below after measuring)
"""

import ml_collections

from configs.rl import tiny_ppo


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = tiny_ppo.base_config()
  del c.rl, c.optimizer, c.eval_every, c.checkpoint_every, c.exact_kl_max_vocab
  del c.log_train_gold
  c.prompts.num_eval = 64
  c.bon = dict(num_samples=256, prompts_per_batch=4, num_points=12, num_bootstrap=1000)
  if arg == "quick":
    c.prompts.num_eval = 16
    c.bon.num_samples = 64
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
