r"""The MiniLM HH reward model (configs/rm/hh_minilm.py) on HH harmless ``resplit_test`` and
PandaLM.

Command (after ``python -m experiments.train_rm --config=configs/rm/hh_minilm.py
--workdir=/tmp/rm_hh_minilm``):
  python -m experiments.eval_rm --config=configs/eval/hh_minilm.py --workdir=/tmp/eval_hh_minilm

Override the run with ``--config.scorers=minilm=rm:DIR,length,shorter`` (its latest
checkpoint; ``rm:DIR@best`` needs a run trained with ``--config.loop.best_metric``). Pairs are
cut as each ``rm:`` run was trained (``configs/rm/hh_minilm.py``: prompt 32 tokens from the
left, prompt+response 80); ``config.pipeline`` is left empty so that another RM keeps its
own cuts.

Expected (this 2-core CPU, measured 2026-12-07 on the conversation-disjoint split of
builder 1.2.0, with ``--config.scorers=length,shorter``, 10 s): the baselines, accuracy
[bootstrap 95% CI over prompts], lengths in characters:
  hh_rlhf/harmless-base@resplit_test, 253 pairs from 252 prompts (preferred longer in 49%):
    length-only 0.488 [0.429, 0.551], shorter-wins 0.512 [0.449, 0.571];
  pandalm@test, 894 decisive pairs from 158 prompts (105 ties left out; preferred longer in
  67%; 110 repeat another pair's text):
    length-only 0.674 [0.622, 0.725], shorter-wins 0.326 [0.275, 0.378]
    (drawn by pair, before 2026-12-07: [0.639, 0.711], a third narrower).
The trained MiniLM RM (configs/rm/hh_minilm.py, 150 steps, 2 min 49 s; 3 min 19 s on
2026-12-07 beside other work; this evaluation 37 s; intervals over prompts, 2026-12-07):
  harmless-base@resplit_test: 0.628 [0.567, 0.690], length-controlled 0.626, ECE 0.055;
    minus shorter-wins 0.117 [0.055, 0.183], p = 0.002;
  pandalm@test: 0.427 [0.369, 0.490] ([0.391, 0.464] drawn by pair), length-controlled
    0.491, ECE 0.140. Below chance: the
    harmlessness RM prefers short answers (refusals), agreeing with shorter-wins on 68% of
    pairs, while PandaLM's preferred answer is the longer one in 67%.
On the prompt-hash split before builder 1.2.0 (255 test pairs; an RM trained on 1,819
pairs) the same run gave 0.655 [0.596, 0.714] on HH and 0.388 [0.353, 0.424] on PandaLM:
how far one RM's PandaLM accuracy moves with its training split.
Scoring throughput of a MiniLM RM at these lengths: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ml_collections

from configs.eval import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: unused (None)."""
  if arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; configs/eval/hh_minilm.py has none")
  config = tiny.get_config(arg)
  config.scorers = "minilm=rm:/tmp/rm_hh_minilm,length,shorter"
  config.datasets = "hh_rlhf/harmless-base@resplit_test,pandalm@test"
  config.batch_size = 32
  return config
