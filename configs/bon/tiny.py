r"""Best-of-n on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.best_of_n --config=configs/bon/tiny.py --workdir=/tmp/bon_tiny

The reference policy is the warm-started tiny decoder of configs/rl/tiny_ppo.py;
N samples per held-out prompt are scored by the planted proxy and the gold.

EXPECTED (measured on this shared 2-core CPU, seed 0):
  default (64 prompts x N=256, about 30 s wall when the machine is quiet; remeasured
  2026-12-06 after the sampler fix, 1fc2d9a): the proxy rises monotonically to
  +1.47 ± 0.04 at n=256 (KL bound 4.5 nats); the gold rises to +0.56 at n=56 and then
  turns down (+0.39 ± 0.09 at n=256): a drop of 0.18 ± 0.08 from the peak, paired over
  prompts (2.3 SE; over prompt resamples the peak is at n=56 in 78% and n=93 in 13%).
  Before the fix the same run gave +0.42 at n=256, a drop of 0.13 ± 0.07 (1.9 SE, short
  of a 2-SE decline): the verdict moves with the sampled stream, so read it as a mild
  decline. Much milder than PPO/RLOO's collapse at KL > 5 nats, because best-of-n only
  reweights reference samples.
  `:quick` (16 prompts x N=64; 8 s wall with JAX's compilation cache warm; remeasured
  2026-12-06 after the sampler fix): the proxy rises to +1.24 ± 0.10 at n=64 and the
  gold keeps rising, to +0.53 ± 0.18 at n=64 (the peak is at n=64 in 64% of prompt
  resamples): no decline at this size. Before the fix the gold peaked at n=21 (+0.43)
  and ended at +0.25 ± 0.15; 16 prompts' error bars cover both. SEs are of each
  prompt's gain over its own reference mean.

SAFETY FILTER (`:safety`, the default run plus the tiny world's programmatic harm,
the frequency of "g"; candidates with harm >= 0.1 are rejected before the proxy
picks; `:safety_classifier` uses a trained configs/safety/tiny.py classifier from
/tmp/safety_tiny and its threshold.json instead):
  python -m experiments.best_of_n --config=configs/bon/tiny.py:safety --workdir=/tmp/bon_safe
  python -m experiments.best_of_n --config=configs/bon/tiny.py:safety_classifier \
      --workdir=/tmp/bon_safe_clf   # after configs/safety/tiny.py into /tmp/safety_tiny
  Remeasured 2026-12-06 after the sampler fix, 1fc2d9a (37 s wall for the classifier run
  at load average ~8.5), raw means over the 64 prompts at n = 256 without -> with the filter:
  `:safety` (26.4% of samples rejected): harm ("g" frequency) 0.261 -> 0.005, proxy
    1.362 -> 1.235 (cost 0.127), gold 0.133 -> -0.144 ("g" is the gold's favourite
    character, so harmlessness costs gold here too); no fallback at n = 256.
  `:safety_classifier` (threshold 0.525 from threshold.json; 38.2% rejected): true harm
    ("g" frequency) 0.261 -> 0.002, proxy 1.362 -> 1.100 (cost 0.262), gold 0.133 ->
    -0.045; no fallback.
  Before the fix: harm 0.225 -> 0.004 / 0.001, proxy cost 0.120 / 0.222.
"""

import ml_collections
from ml_collections import config_dict

from configs.rl import tiny_ppo


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = tiny_ppo.base_config()
  # What best-of-n does not read, so that an override of it is refused, not ignored.
  del c.rl, c.optimizer, c.loop, c.eval, c.log_train_gold, c.mesh, c.export_hf
  c.prompts.num_eval = 64
  c.bon = dict(num_samples=256, prompts_per_batch=4, num_points=12, num_bootstrap=1000)
  if arg == "quick":
    c.prompts.num_eval = 16
    c.bon.num_samples = 64
  elif arg == "safety":
    c.safety = dict(kind="tiny_world_harm", workdir="", threshold=0.1)
  elif arg == "safety_classifier":
    # threshold: None = threshold.json's; --config.safety.threshold=0.3 sets one.
    c.safety = dict(kind="classifier", workdir="/tmp/safety_tiny",
                    threshold=config_dict.placeholder(float))
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none, 'quick', 'safety' "
                     "or 'safety_classifier'")
  return c
