r"""Safety classifier: MiniLM (all-MiniLM-L6-v2) + a harm head on HH-RLHF harmless-base.

Command:
  python -m experiments.train_safety --config=configs/safety/hh_minilm.py \
      --workdir=/tmp/safety_hh_minilm

Variants: ``:quick`` (4 steps, as ``configs/rm/hh_minilm.py:quick``; an unreachable
precision target keeps the most precise threshold instead of stopping: a smoke test).

Model, tokenizer, data and optimizer are those of configs/rm/hh_minilm.py (mean pooling,
prompts cut to 32 tokens, prompt+response to 80; AdamW 5e-5, cosine, 150 steps of 16
pairs). Data: the 2,312 harmless-base test pairs re-split 80/10/10 by conversation hash:
trains on ``resplit_train`` (each pair: chosen = harmless, rejected = harmful, a WEAK
label), picks the threshold on ``resplit_validation`` and reports on ``resplit_test``.

Expected (measured 2026-12-05 on the conversation-disjoint split of builder 1.2.0, a
quiet 2-core CPU): 3 min 37 s wall for training and evaluation; a rerun of the finished
workdir (re-evaluation only) 11-15 s. Sizes: 1,827 train pairs (3,654 examples), 232
validation pairs, 253 test pairs. **On this split the run stops after training** with
"no threshold flagging >= 20 examples reaches validation precision >= 0.7: the best is
0.654 at threshold 0.6588 (recall 0.073, 26 of 464 flagged); ..." (the checkpoint is
kept). The 0.7 target was reached on the split before 1.2.0 and is not lowered here;
``--config.safety.on_unreachable=max_precision`` (a rerun of the finished workdir)
reports at that best threshold, with 95% pair-bootstrap intervals (1,000 resamples):
  validation ROC-AUC 0.619 [0.575, 0.663]; precision 0.654 [0.500, 0.815], recall 0.073;
  test ROC-AUC 0.586 [0.544, 0.629]; at the threshold precision 0.667 [0.543, 0.793],
    recall 0.095 [0.063, 0.130], false-positive rate 0.047 [0.024, 0.079];
  test pair agreement (rejected scored more harmful than chosen; the classifier as a
    label source) 0.609 [0.549, 0.672], beside the MiniLM RM's 0.628 [0.565, 0.688].
A weak label gives a weak classifier: at precision 0.65 it flags one harmful response in
ten. A high target is met on too few examples to mean anything: with
``--config.safety.target_precision=0.9 --config.safety.min_flagged=1`` the lowest
qualifying threshold is 0.710, where validation precision is 1.000 on 6 flagged
responses (recall 0.026) and test precision 0.667 [0.333, 1.000] at recall 0.016; hence
``min_flagged=20`` here, with which target 0.9 stops in one line as above.
On the split before 1.2.0 (1,819 / 238 / 255 pairs; 25 min 45 s under a load average of
10-13) the 0.7 target was met at threshold 0.594 (validation precision 0.712 on 52
flagged): test ROC-AUC 0.622 [0.582, 0.663], precision 0.667 [0.592, 0.757], recall
0.196, pair agreement 0.675.
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
                       min_flagged=20, num_resamples=1000, eval_batch_size=32,
                       test_split="resplit_test")
  if arg == "quick":
    config.safety.on_unreachable = "max_precision"
  else:
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 50
  return config
