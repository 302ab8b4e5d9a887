r"""Safety classifier: MiniLM (all-MiniLM-L6-v2) + a harm head on HH-RLHF harmless-base.

Command:
  python -m experiments.train_safety --config=configs/safety/hh_minilm.py \
      --workdir=/tmp/safety_hh_minilm

Model, tokenizer, data and optimizer are those of configs/rm/hh_minilm.py (mean pooling,
prompts cut to 32 tokens, prompt+response to 80; AdamW 5e-5, cosine, 150 steps of 16
pairs). Data: the 2,312 harmless-base test pairs re-split 80/10/10 by prompt hash:
trains on ``resplit_train`` (each pair: chosen = harmless, rejected = harmful, a WEAK
label), picks the threshold on ``resplit_validation`` and reports on ``resplit_test``.

Expected: (filled in below after the measured run)
"""

from __future__ import annotations

import ml_collections

from configs.rm import hh_minilm as rm_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (a few steps, smoke test)."""
  if arg not in (None, "", "quick"):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  config = rm_config.get_config(arg)
  del config.loss, config.eval, config.data.objective, config.data.objective_field
  config.data.category_field = "category"
  config.safety = dict(pos_weight="balanced", target_precision=0.7, on_unreachable="error",
                       num_resamples=1000, eval_batch_size=32, test_split="resplit_test")
  if arg == "quick":
    config.safety.on_unreachable = "max_precision"
  else:
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 50
  return config
