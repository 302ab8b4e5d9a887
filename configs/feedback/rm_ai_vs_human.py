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
labeller skips). Held-out evaluation: the 253 pairs of ``resplit_test``, by ``eval_rm``.

CPU cost: 40 MiniLM steps of 16 pairs x 80 tokens (22.6M parameters): 46 s and 44 s wall
for the two runs on a quiet 2-core CPU (2026-12-06; 8.1 and 7.3 min on 2026-12-01 under a
load average of 7-12); eval_rm 17 s; the labelling before them 56 s.

Measured 2026-12-06 (all four commands rerun after the GGUF tokenizer fix; the same
accuracies as on 2026-12-05) on the conversation-disjoint split of builder 1.2.0, with
labels from the judge that keeps a cut conversation's first third and its end; accuracy /
ECE (both orders) on the 253 held-out ``resplit_test`` pairs [bootstrap 95% CI; ECE's is
the basic bootstrap interval]:
  ai     0.478 [0.415, 0.538]  ECE 0.026 [0.000, 0.051]  BT log-loss 0.694
  human  0.549 [0.490, 0.609]  ECE 0.110 [0.046, 0.151]  BT log-loss 0.731
  shorter-wins baseline 0.512 [0.453, 0.573]
  human − ai = +0.071 [−0.016, 0.158], paired-bootstrap p = 0.11: not significant.
Rerun 2026-12-07 (all four commands, 3 min 38 s; intervals over the 252 prompts of the 253
pairs): the same accuracies and ECEs; ai [0.417, 0.538], human [0.486, 0.611], shorter-wins
[0.449, 0.571], human − ai +0.071 [−0.008, 0.161], p = 0.10.
The SmolLM2 labels are near ½ (P(A) in [0.464, 0.519]), so the ``ai`` RM barely moves
(train loss ln 2 at step 40), while the human-label RM reaches 0.549 from 100 pairs
(configs/rm/hh_minilm.py, 1,827 pairs: 0.628). Neither is distinguishable from
shorter-wins. The difference moved with the data and the judge: +0.145 [0.055, 0.228],
p = 0.002 on the split before 1.2.0, +0.091 (p = 0.046) on the new split with the judge
that cut conversations from their end.
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
