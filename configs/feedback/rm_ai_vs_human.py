r"""MiniLM reward models on the same HH harmless pairs, labelled by SmolLM2 (AI) or by people.

Commands (after ``configs/feedback/label_smollm2.py`` wrote /tmp/label_hh/labels.jsonl):
  python -m experiments.train_rm --config=configs/feedback/rm_ai_vs_human.py:ai \
      --workdir=/tmp/rm_ai --config.data.name=jsonl:/tmp/label_hh/labels.jsonl
  python -m experiments.train_rm --config=configs/feedback/rm_ai_vs_human.py:human \
      --workdir=/tmp/rm_human
  python -m experiments.eval_rm --config=configs/eval/hh_minilm.py --workdir=/tmp/eval_ai_vs_human \
      --config.scorers=ai=rm:/tmp/rm_ai,human=rm:/tmp/rm_human,shorter \
      --config.datasets=hh_rlhf/harmless-base@resplit_test

Both runs: all-MiniLM-L6-v2 with a mean-pooled reward head, 40 steps of 16 pairs (about
6 epochs) of the soft-target Bradley–Terry loss ``bt`` (``outcome`` = the AI probability
for ``:ai``, 1 for the human labels), the sequence cuts of configs/rm/hh_minilm.py. The
training pairs are the ones the labeller judged: the first 100 of harmless-base
``resplit_train`` (``:human`` also keeps the pairs with an empty response, which the
labeller skips). Held-out evaluation: the 255 pairs of ``resplit_test``, by ``eval_rm``.

CPU cost: 40 MiniLM steps of 16 pairs x 80 tokens (22.6M parameters): 8.1 min (ai) and
7.3 min (human) wall on this shared 2-core CPU (load average 7-12; ~9 s a step); eval_rm
1.8 min.

Measured 2026-12-01, accuracy / ECE (both orders) on the 255 held-out ``resplit_test``
pairs [bootstrap 95% CI]:
  ai     0.424 [0.365, 0.479]  ECE 0.082 [0.026, 0.140]  BT log-loss 0.695
  human  0.569 [0.510, 0.627]  ECE 0.119 [0.085, 0.189]  BT log-loss 0.748
  shorter-wins baseline 0.543 [0.480, 0.602]
  human − ai = +0.145 [0.055, 0.228], paired-bootstrap p = 0.002.
The SmolLM2 labels are near ½ (outcomes in [0.50, 0.52]), so the ``ai`` RM barely moves
(train loss 0.6928 vs ln 2 = 0.6931; rewards ± 0.05) and what little it learns is
anti-correlated with the human labels here; the human-label RM reaches 0.569 from 100
pairs (configs/rm/hh_minilm.py, 1,819 pairs: 0.655).
"""

from __future__ import annotations

import ml_collections

from configs.rm import hh_minilm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``ai`` (train on a labels.jsonl; set ``data.name``) or ``human``."""
  config = hh_minilm.get_config()
  config.loop.num_steps = 40
  config.optimizer.warmup_steps = 5
  config.loop.eval_every = 0
  config.loop.checkpoint_every = 40
  config.eval.enabled = False
  if arg == "ai":
    config.data.name = "jsonl:/tmp/label_hh/labels.jsonl"
    config.data.train_split = config.data.eval_split = "train"
  elif arg == "human":
    config.data.train_split = config.data.eval_split = "resplit_train[:100]"
  else:
    raise ValueError(f"unknown variant {arg!r}; known: ai, human")
  return config
