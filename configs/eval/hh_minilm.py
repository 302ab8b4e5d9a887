r"""The MiniLM HH reward model (configs/rm/hh_minilm.py) on HH harmless ``resplit_test`` and PandaLM.

Command (after ``python -m experiments.train_rm --config=configs/rm/hh_minilm.py
--workdir=/tmp/rm_hh_minilm``):
  python -m experiments.eval_rm --config=configs/eval/hh_minilm.py --workdir=/tmp/eval_hh_minilm

Override the run with ``--config.scorers=minilm=rm:DIR@best,length,shorter``. Pairs are
cut as the RM was trained (prompt 32 tokens from the left, prompt+response 80).

Expected (this 2-core CPU, measured 2026-12-05 with ``--config.scorers=length,shorter``,
13 s): the baselines, accuracy [bootstrap 95% CI], lengths in characters:
  hh_rlhf/harmless-base@resplit_test, 255 pairs (preferred longer in 45%):
    length-only 0.457 [0.398, 0.520], shorter-wins 0.543 [0.480, 0.602];
  pandalm@test, 894 decisive pairs (105 ties left out; preferred longer in 67%; 110 repeat
  another pair's text and are resampled with it):
    length-only 0.674 [0.639, 0.711], shorter-wins 0.326 [0.289, 0.361].
The trained MiniLM RM (measured 2026-12-01: 150 training steps in 9.6 min wall while the
suite ran beside it; this evaluation 104 s):
  harmless-base@resplit_test: 0.655 [0.596, 0.714], length-controlled 0.643, ECE 0.042;
    minus shorter-wins 0.112 [0.045, 0.177], p = 0.001;
  pandalm@test: 0.388 [0.359, 0.421], length-controlled 0.457, ECE 0.173. Below chance: the
    harmlessness RM prefers short answers (refusals), agreeing with shorter-wins on 71% of
    pairs, while PandaLM's preferred answer is the longer one in 67%.
Scoring throughput of a MiniLM RM at these lengths: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

from configs.eval import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: unused (None)."""
  config = tiny.get_config(arg)
  config.scorers = "minilm=rm:/tmp/rm_hh_minilm,length,shorter"
  config.datasets = "hh_rlhf/harmless-base@resplit_test,pandalm@test"
  config.batch_size = 32
  config.pipeline = dict(max_length=80, max_prompt_length=32, bucket_boundaries=(48,))
  return config
