r"""MiniLM reward model with Davidson ties on PandaLM's human test set (ties as outcome 0.5).

Command:
  python -m experiments.train_rm --config=configs/rm/pandalm_ties.py --workdir=/tmp/rm_pandalm

Data: the 999 PandaLM pairs (three annotators each; majority outcome 1, 0 or 0.5 for
a tie) re-split 80/10/10 by conversation hash. Loss: ``ties`` (``bradley_terry_ties``) with
ν = 1 (Davidson 1970), which models P(tie) instead of dropping ties. Accuracy is over
decisive pairs; ties are counted (``num_ties``).

Variants: ``:quick`` (4 steps, no eval or checkpoint before the end: a smoke test), ``:bt``
(the ``bt`` loss instead of ``ties``: a tie's outcome ½ is a soft label that pulls the
margin to 0).

Expected (this 2-core CPU, measured 2026-11-27): 100 steps of 16 pairs (761 train
pairs, 2.1 epochs), 7 min wall (machine partly shared). Validation (111 pairs, 2 of
them ties): accuracy 0.716 (0.743 at step 50), BT log-loss 0.641, ECE 0.131 (both
pair orders). The length-only baseline is 0.734 (the chosen response is longer in
69% of pairs): on PandaLM this small RM does not beat "longer wins", so read its
accuracy against that baseline, not against chance.
"""

from __future__ import annotations

import ml_collections

from configs.rm import hh_minilm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or ``quick``, as in ``configs/rm/hh_minilm.py``; ``bt`` drops the tie model."""
  if arg not in (None, "", "quick", "bt"):
    raise ValueError(f"unknown variant {arg!r}; known: quick, bt")
  config = hh_minilm.get_config(None if arg == "bt" else arg)
  config.data.name = "pandalm"
  config.data.pipeline.update(max_length=128, max_prompt_length=48, bucket_boundaries=(64,))
  config.loss.name = "bt" if arg == "bt" else "ties"
  config.loop.num_steps = 4 if arg == "quick" else 100
  config.loop.eval_every = 0 if arg == "quick" else 50
  return config
