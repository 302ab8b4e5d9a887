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

Expected: well under a minute on this 2-core CPU for the tiny scorers (most of it
compiling); the tiny RM at ≈ 0.87 accuracy, the length baselines near 0.5, gold 1.0.
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
  config.pipeline = {}                     # pipeline overrides, e.g. {"max_length": 512}
  config.max_unk_fraction = 0.2            # more unknown tokens than this is an error
  config.uwo_lambda = 1.0                  # UWO variance penalty for ensembles
  config.on_bad_row = "error"              # or "skip" (counted in the report)
  config.hf_tokenizer = ""                 # hf: scorers: tokenizer path ("" = the model dir)
  config.hf_pooling = ""                   # hf: scorers: last | mean | cls ("" = default)
  config.mesh = dict(shape=(-1, 1, 1), num_devices=0)
  return config
