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

Expected runtime (measured as one run, 2026-12-01 at 173df60): 31 min 57 s wall, 26 min of
CPU, peak RSS 1.9 GB; the bandit part (21 min of it) ran while other jobs loaded the CPU
(load 7-10; 12 min 11 s quiet), the text world's 38 stages took 10 min at load ≈ 1–2.
Expected result (same run): bandit G0–G5, R1, R3, R4, C1–C3 and D3 pass, R2 fails (width
4's RL drop 1.3 SE). Text world: G2-text, R4-text pass; D1 fails on IPO alone (the
d(α − β log d) fit, RMSE 0.58 vs 0.23 quadratic: IPO at β = 0.03 runs to 161 nats and
−6.8 SD; DPO and SLiC have interior maxima and the log form wins, RMSE 0.007 vs 0.052 and
0.022 vs 0.069); D2 fails (DPO and SLiC peak and fall 3.2 and 4.9 SE, but KL dips after
the peak; IPO falls from step 0); P1 fails (DPO below RLOO by > 1 SE in the 4–8 nat bin);
R2-text fails (RLOO vs w8 falls to −0.05 SD and its last checkpoints climb back to +0.48);
G1-text and G3-text fail (best-of-256 never reaches the repetitive tail). The text world
is one seed: these verdicts moved with the sampler's random stream (before 8511f61 R2-text
and P1 passed and SLiC's D2 drop was 0.8 SE), so read them as weak evidence.
See the README, "Reproducing the papers".
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
  if arg != "tiny":  # three text worlds pooled (one seed's verdicts moved with its stream)
    config.text.world_seeds = (0, 1, 2)
  return config
