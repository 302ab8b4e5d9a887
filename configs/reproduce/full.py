r"""The full overoptimization study on CPU: five pooled bandit worlds, plus the DPO family.

Command:
  python -m experiments.reproduce --config=configs/reproduce/full.py --workdir=workdirs/full

Everything in ``configs/reproduce/quick.py`` (same world generator, proxy widths,
data sizes, ensembles, best-of-n and RL grids), on world seeds 0–4, pooled:
each world's prompts are concatenated so that curves average over worlds and the
bootstrap runs over all 320 prompts; the report also lists each world on its own.
Adds the direct-alignment study in the bandit world (DPO / IPO / SLiC across β on
gold-labelled pairs, D1–D3, and the DPO-vs-RL frontier P1; kept as ``D1-bandit`` …)
and the text world (``quick.text_config``; ``experiments/text_study.py``), which runs
``train_sft``, ``train_rm`` (proxy widths 8–64), ``best_of_n``, ``train_rl`` (RLOO) and
``train_dpo`` (DPO / IPO / SLiC × 4 β, 400 steps) and carries D1, D2 and P1.

Expected runtime: bandit part 12 min 11 s (2 cores, quiet); text world ≈ 35 min measured
stage by stage on this CPU shared with other jobs (load ≈ 10), not yet as one run.
Expected result (measured 2026-12-01): bandit G0–G5, R1, R3, R4, C1–C3 and D3 pass, R2
fails (width 4's RL drop 1.3 SE). Text world: P1, G2-text, R2-text, R4-text pass; D1 fails
(IPO's d(α − β log d) fit, RMSE 0.93 vs 0.19 quadratic; DPO and SLiC hold), D2 fails
(SLiC's drop 0.8 SE; DPO 6.4 SE and IPO hold), G1-text and G3-text fail (best-of-256 never
reaches the repetitive tail). See the README, "Reproducing the papers".
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
