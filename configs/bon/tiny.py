r"""Best-of-n on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.best_of_n --config=configs/bon/tiny.py --workdir=/tmp/bon_tiny

The reference policy is the warm-started tiny decoder of configs/rl/tiny_ppo.py;
N samples per held-out prompt are scored by the planted proxy and the gold.

EXPECTED (measured on this shared 2-core CPU, seed 0), `:quick` (16 prompts x
N=64, about 30-50 s wall): proxy rises monotonically to +1.18 ± 0.08 at n=64
(KL bound 3.2 nats); gold rises too, to +0.64 ± 0.17: best-of-64 is too weak an
optimiser to reach the exploit regime that PPO/RLOO reach at KL > 5 nats (the
honest high-score characters still dominate the proxy's top samples).
Default (64 prompts x N=256): a few minutes; not measured.
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
