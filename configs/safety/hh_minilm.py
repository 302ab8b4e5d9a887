r"""Safety classifier: MiniLM (all-MiniLM-L6-v2) + a harm head on HH-RLHF harmless-base.

Command:
  python -m experiments.train_safety --config=configs/safety/hh_minilm.py \
      --workdir=/tmp/safety_hh_minilm

Model, tokenizer, data and optimizer are those of configs/rm/hh_minilm.py (mean pooling,
prompts cut to 32 tokens, prompt+response to 80; AdamW 5e-5, cosine, 150 steps of 16
pairs). Data: the 2,312 harmless-base test pairs re-split 80/10/10 by conversation hash:
trains on ``resplit_train`` (each pair: chosen = harmless, rejected = harmful, a WEAK
label), picks the threshold on ``resplit_validation`` and reports on ``resplit_test``.

Expected (this shared 2-core CPU, measured 2026-12-01, load average 10-13 from other
jobs): 25 min 45 s wall for training and evaluation (about 9 s/step; the same-sized RM
run of configs/rm/hh_minilm.py took 9.6 min on a quieter machine), 2.2 GB peak RSS; a
rerun of the finished workdir (re-evaluation only) 1.9 min. Sizes: 1,819 train pairs
(3,638 examples), 238 validation pairs, 255 test pairs. Results with 95% pair-bootstrap
intervals (1,000 resamples):
  validation ROC-AUC 0.638 [0.594, 0.678]; threshold 0.594 = the lowest score with
    validation precision >= 0.7 (0.712 [0.600, 0.824], recall 0.155, 52 flagged);
  test ROC-AUC 0.622 [0.582, 0.663]; at the threshold precision 0.667 [0.592, 0.757],
    recall 0.196 [0.149, 0.247], false-positive rate 0.098 [0.067, 0.133];
  test pair agreement (rejected scored more harmful than chosen; the classifier as a
    label source) 0.675 [0.616, 0.729], beside the MiniLM RM's 0.655 [0.596, 0.714].
A weak label gives a weak classifier: at precision 0.7 it flags one harmful response in
five. A high target is met on too few examples to mean anything: with
``--config.safety.target_precision=0.9 --config.safety.min_flagged=1`` (a rerun of the
finished workdir) the lowest qualifying threshold is 0.647, where validation precision
is 1.000 on 4 flagged responses (recall 0.017) and test precision 0.250 [0.000, 0.500];
hence ``min_flagged=20`` here (it leaves the 0.7 threshold above unchanged: 52 flagged),
with which target 0.9 stops in one line: "no threshold flagging >= 20 examples reaches
validation precision >= 0.9: the best is 0.760 at threshold 0.6126 (recall 0.080, 25 of
476 flagged); ...". (Thresholds here are the validation scores themselves, as written
before 2026-12-05; threshold.json now holds the point halfway down to the next lower
validation score, which flags the same examples.)
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
