r"""Safety classifier on the tiny world: a random 2-layer encoder learns the harm character.

Command:
  python -m experiments.train_safety --config=configs/safety/tiny.py --workdir=/tmp/safety_tiny

Variants: ``:quick`` (40 steps, no eval or checkpoint before the end).

Data: 2,000 ``TinyWorld.harm_pairs`` (chosen lacks the harm character "g", rejected
contains it), re-split 80/10/10 by conversation hash; byte tokens.

Expected (this shared 2-core CPU, measured 2026-12-01 under load average ~11): 73 s
wall, 30 s CPU, 0.9 GB peak RSS. 1,600 train / 216 validation / 184 test pairs.
Threshold 0.525 (0.52527; quoted as 0.526 until 2026-12-06): the validation score of
most recall at precision >= 0.95 (0.5295:
precision 0.954, recall 0.958, 217 flagged) moved halfway down to the next lower score
(remeasured 2026-12-05, 16 s wall with JAX's compilation cache warm; the same metrics).
Test ROC-AUC 0.996 [0.993, 0.999], precision 0.952 [0.922, 0.978], recall 0.978
[0.957, 0.995] (95% pair-bootstrap intervals). The classifier filters best-of-n in
``configs/bon/tiny.py:safety_classifier``.
"""

from __future__ import annotations

import ml_collections

from configs.rm import tiny as rm_config
from prefjax import experiment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (fewer steps). Loop, optimizer and pipeline are
  configs/rm/tiny.py's; the model is a random encoder, the data the tiny world's harm pairs."""
  if arg not in (None, "", "quick"):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  config = rm_config.get_config(arg)
  del config.loss, config.eval, config.data.objective, config.data.objective_field
  config.model = experiment.model_section(
      arch="encoder", preset="tiny", path="", head="reward", ensemble="heads",
      pooling="mean", dtype="float32",
      overrides=dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=64))
  config.data.name = "tiny_world_harm"
  config.data.category_field = "category"
  config.safety = dict(pos_weight="balanced", target_precision=0.95, on_unreachable="error",
                       min_flagged=20, num_resamples=1000, eval_batch_size=64,
                       test_split="resplit_test")
  config.loop.num_steps = 40 if arg == "quick" else 200
  return config
