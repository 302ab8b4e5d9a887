r"""MiniLM (all-MiniLM-L6-v2) reward model on HH-RLHF harmless-base (the offline test file).

Command:
  python -m experiments.train_rm --config=configs/rm/hh_minilm.py --workdir=/tmp/rm_hh_minilm

Variants: ``:quick`` (4 steps, no eval or checkpoint before the end: a smoke test),
``:cls`` (CLS pooling instead of the mean).

Data: the 2,312 harmless-base test pairs re-split 80/10/10 by conversation hash;
trains on ``resplit_train`` and evaluates on ``resplit_validation``.

Sequences are short for CPU: prompts cut from the left to 32 tokens (the end of the
last human turn), prompt+response to 80 tokens (the start of the response: refusal
or compliance carries most of the harmlessness signal).

Expected (this 2-core CPU, measured 2026-12-05 on the conversation-disjoint split of
builder 1.2.0, a quiet machine): 150 steps of 16 pairs (1.3 epochs of 1,827 pairs) in
2 min 49 s wall. Validation (232 pairs): accuracy 0.655 (0.634 at step 75; standard
error ±0.031), BT log-loss 0.597, ECE 0.038 (both pair orders), length-only baseline
0.438 (the chosen response is the longer one in only 36% of pairs, so "shorter wins"
scores about 1 - 0.438 = 0.562 on this split: compare against both).
(On the prompt-hash split before 1.2.0, 1,819 / 238 pairs: accuracy 0.634, BT log-loss
0.606, ECE 0.077, length-only 0.424; 9.6 min wall with the test suite beside it.)
"""

from __future__ import annotations

import ml_collections

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default), ``quick`` (a few steps, smoke test) or ``cls`` (CLS pooling)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # total_steps follows --config.loop.num_steps (a derived reference: setting total_steps
  # itself leaves num_steps alone).
  num_steps = ml_collections.FieldReference(150)
  config.tokenizer = dict(path="asset:minilm")
  config.model = experiment.model_section(
      arch="encoder", preset="", path="asset:minilm", head="reward", ensemble="heads",
      pooling="mean", dtype="float32", overrides={},
      score_label="")  # with path a two-label HF classifier: start from the label's log-odds
  config.data = experiment.data_section(
      name="hh_rlhf/harmless-base", objective="", objective_field="objective",
      pipeline=dict(seed=0, batch_size=16, max_length=80, max_prompt_length=32,
                    mode="padded", bucket_boundaries=(48,), add_bos=True))
  config.loss = dict(name="bt", kwargs="", margin=0.0, label_smoothing=0.0, center_coef=0.0,
                     nu=1.0, bootstrap=False, first_member=0)
  config.optimizer = configlib.section(
      train.OptimizerConfig, name="adamw", learning_rate=5e-5, schedule="cosine", warmup_steps=15,
      total_steps=num_steps * 1, weight_decay=0.01, grad_clip_norm=1.0,
      decay_biases_and_norms=True)  # as the numbers above were measured
  config.loop = configlib.section(train.LoopConfig, num_steps=num_steps, log_every=10,
                                  eval_every=75, checkpoint_every=25, seed=0,
                                  async_checkpointing=False)
  config.eval = dict(enabled=True, batch_size=32, num_bins=10, subset_field="subset")
  config.mesh = dict(shape=(-1, 1, 1), ensemble=1, num_devices=0)
  config.export_hf = False  # True: also write <workdir>/hf, a Hugging Face model directory
  if arg == "quick":
    config.loop.num_steps = 4
    config.optimizer.warmup_steps = 1
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 0
  elif arg == "cls":
    config.model.pooling = "cls"
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: quick, cls")
  return config
