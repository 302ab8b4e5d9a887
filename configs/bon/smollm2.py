r"""Best-of-n of SmolLM2-135M-Instruct on HH-RLHF harmless prompts, MiniLM proxy vs gold RM.

COMMAND (GPU; the reward models come from experiments.train_rm, see configs/rl/smollm2_rloo.py):
  python -m experiments.best_of_n --config=configs/bon/smollm2.py --workdir=/tmp/bon_smollm2 \
      --config.proxy.checkpoint=/tmp/rm_proxy --config.gold.checkpoint=/tmp/rm_gold
  Ensemble proxy (K=4 heads, worst-case aggregation of the members standardized over all
  the samples, as Coste et al. do), from a proxy trained with 4 heads
  (``train_rm --config=configs/rm/hh_minilm.py --config.model.head=reward_ensemble:4
  --workdir=/tmp/rm_proxy_ens``; a one-head proxy's checkpoint does not load into 4):
      --config.proxy.checkpoint=/tmp/rm_proxy_ens \
      --config.proxy.model.head=reward_ensemble:4 --config.proxy.aggregation=wco
  (CPU smoke test: configs/bon/smollm2.py:quick.)

64 held-out prompts x N=256 samples of up to 64 tokens from the reference,
scored by both reward models; curves for n = 1..256.

EXPECTED: `:quick` (2 prompts x N=4 samples of 4 tokens, random reward heads) runs
end to end on this shared 2-core CPU in about 1 min 50 s wall. Full-run CPU cost,
not measured: 16k samples x 64 tokens of 135M-parameter decoding is about 0.3 PFLOP, hours on
this CPU and minutes on one H100. Numbers for the full run: not yet measured.
"""

import ml_collections

from configs.rl import smollm2_rloo


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = smollm2_rloo.get_config()
  # What best-of-n does not read, so that an override of it is refused, not ignored.
  del c.rl, c.optimizer, c.loop, c.eval, c.log_train_gold, c.mesh, c.export_hf
  c.bon = dict(num_samples=256, prompts_per_batch=1, num_points=12, num_bootstrap=1000)
  if arg == "quick":
    c.prompts.num_eval = 2
    c.prompts.max_length = 64
    c.sampling.max_new_tokens = 4
    c.bon.num_samples = 4
    c.bon.num_points = 3
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
