r"""The full overoptimization study on CPU: five pooled bandit worlds, plus the DPO family.

Command:
  python -m experiments.reproduce --config=configs/reproduce/full.py --workdir=workdirs/full

Everything in ``configs/reproduce/quick.py`` (same world generator, proxy widths,
data sizes, ensembles, best-of-n and RL grids), on world seeds 0–4, pooled:
each world's prompts are concatenated so that curves average over worlds and the
bootstrap runs over all 320 prompts; the report also lists each world on its own.
Adds the direct-alignment study in the bandit world (DPO / IPO / SLiC across β on
gold-labelled pairs, D1–D3, and the DPO-vs-RL frontier P1).

Expected runtime (2 cores, quiet): 12 min 11 s measured, peak RSS 1.9 GB.
Expected result (measured 2026-12-01): G0–G5, R1, R3, R4, C1–C3 and D3 pass; R2 fails
(width 4's RL drop 1.3 SE), D1 fails (DPO/IPO gold across β levels off near the
world's KL ceiling, no 2-SE drop), D2 fails for IPO and SLiC (holds for DPO), P1 fails
(DPO below the exact RL optimum in 7 of 8 KL bins). See the README.
"""

from __future__ import annotations

import ml_collections

from configs.reproduce import quick


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None, or ``tiny`` (smoke-test sizes, as ``quick.py:tiny`` with 2 worlds)."""
  config = quick.get_config(arg)
  config.bandit.world_seeds = (0, 1) if arg == "tiny" else (0, 1, 2, 3, 4)
  config.bandit.direct.enabled = True
  config.text = quick.text_config(enabled=True, tiny=arg == "tiny")
  return config
