r"""Evaluates tiny-world scorers: a train_rm run, a 4-member ensemble, a DPO policy, baselines.

Command (after training the three runs with their configs' commands):
  python -m experiments.eval_rm --config=configs/eval/tiny.py --workdir=/tmp/eval_tiny \
      --config.scorers=rm:/tmp/rm_tiny,ens=rm:/tmp/rm_ens,dpo:/tmp/dpo_tiny,length,shorter,gold \
      --config.datasets=run:/tmp/rm_tiny

``run:/tmp/rm_tiny`` is the RM run's own validation split (211 tiny-world pairs), so
the ``rm_tiny`` accuracy equals that run's ``eval/accuracy``. Other datasets:
``NAME[@SPLIT]`` (``hh_rlhf/harmless-base@resplit_test``, ``pandalm@test``,
``jsonl:PATH@train``). Compare several evaluations:
  python -m experiments.eval_rm --config=configs/eval/tiny.py --workdir=/tmp/cmp \
      --config.compare=/tmp/eval_a,/tmp/eval_b

Expected (this 2-core CPU, measured 2026-12-01 on a quiet machine; the three runs trained
with the default commands of configs/rm/tiny.py, configs/rm/ensemble_tiny.py and
configs/dpo/tiny.py into /tmp/rm_tiny, /tmp/rm_ens, /tmp/dpo_tiny): 22 s wall (19 s of
scoring and statistics, 0.7 GB peak RSS; 14 s on 2026-12-07). Accuracy [bootstrap 95% CI
over the 208 prompts of the 211 pairs, 2026-12-07] on the 211 pairs:
rm_tiny 0.867 [0.819, 0.914] (= train_rm's eval/accuracy; ECE 0.046), ens 0.900 (its
eval/accuracy; members 0.853 / 0.905 / 0.896 / 0.877, wco 0.915, uwo 0.900 over
standardized members, remeasured 2026-12-05; uwo 0.910 on raw rewards before), dpo_tiny
0.853 (= train_dpo's eval/rewards/accuracies, as on any data of hard, unweighted labels;
README, "Evaluating reward models"), length 0.491, shorter 0.509,
length-controlled 0.500 for both, gold 1.000. Paired bootstrap: ens − rm_tiny = +0.033
[0.005, 0.066], p = 0.036; dpo_tiny − rm_tiny = −0.014 [−0.060, 0.033], p = 0.66 (by pair,
before 2026-12-07: p = 0.046 and 0.65).
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: unused (None)."""
  if arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; configs/eval/tiny.py has none")
  config = ml_collections.ConfigDict()
  config.scorers = "length,shorter,gold"   # [NAME=]KIND[:PATH[@latest|@best|@STEP]], commas
  config.datasets = ""                     # NAME[@SPLIT] or run:WORKDIR[@SPLIT], commas
  config.compare = ""                      # report dirs: write compare.md instead
  config.subset_field = "subset"           # meta key of a per-subset (category) table
  config.num_resamples = 1000              # bootstrap resamples (shared by all scorers)
  config.seed = 0
  config.num_bins = 10                     # ECE / reliability bins
  config.batch_size = 0                    # pairs per batch; 0 = the run's eval.batch_size
  # Pipeline overrides, set as one dict: --config.pipeline='{"max_length": 512}'
  # (--config.pipeline.max_length=512 is refused: the dict declares no fields).
  config.pipeline = {}
  config.max_unk_fraction = 0.2            # more unknown tokens than this is an error
  config.uwo_lambda = 1.0                  # UWO variance penalty for ensembles
  config.ensemble_normalization = "standardize"  # members before WCO/UWO: or center, none
  config.on_bad_row = "error"              # or "skip" (counted in the report)
  config.hf_tokenizer = ""                 # hf: scorers: tokenizer path ("" = the model dir)
  config.hf_pooling = ""                   # hf: scorers: last | mean | cls | pooler ("" = saved)
  config.hf_score_label = ""               # hf: classifiers: LABEL's log-odds, or NAME=LABEL,...
  config.mesh = dict(shape=(-1, 1, 1), num_devices=0)
  return config
