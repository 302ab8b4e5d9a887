r"""The full overoptimization study on CPU: three pooled bandit worlds, plus the DPO family.

Command:
  python -m experiments.reproduce --config=configs/reproduce/full.py --workdir=workdirs/full

Everything in ``configs/reproduce/quick.py`` (same world generator, proxy widths,
data sizes, ensembles, best-of-n and RL grids), on world seeds 0–4, pooled:
each world's prompts are concatenated so that curves average over worlds and the
bootstrap runs over all 320 prompts; the report also lists each world on its own.
Adds the direct-alignment study in the bandit world (DPO / IPO / SLiC across β on
gold-labelled pairs, D1–D3, and the DPO-vs-RL frontier P1).

Expected runtime (2 cores): see the README's "Reproducing the papers".
"""

from __future__ import annotations

import ml_collections

from configs.reproduce import quick


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None, or ``tiny`` (smoke-test sizes, as ``quick.py:tiny`` with 2 worlds)."""
  config = quick.get_config(arg)
  config.bandit.world_seeds = (0, 1) if arg == "tiny" else (0, 1, 2, 3, 4)
  config.bandit.direct.enabled = True
  return config
