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
``train_dpo`` (DPO / IPO / SLiC × 4 β, 400 steps) and carries D1, D2 and P1; three text
worlds (seeds 0, 1, 2) are run and pooled like the bandit worlds, because one world's
verdicts moved with the sampler's random stream.

Expected runtime (measured 2026-12-01 at b28e202 on this 2-core CPU, load ≈ 1–2): the
bandit part 10 min; each text world ≈ 10 min (38 stages): ≈ 38 min from scratch (28 min
reusing text world 0; peak RSS 1.9 GB). IPO's β grid was then shifted (0.3–10, see
``quick.text_config``) and remeasured reusing every other stage (14 min wall, f198f74).
Expected result: bandit G0–G5, R1, R3, R4, C1–C3 and D3 pass, R2 fails (width 4's RL drop
1.3 SE). Text worlds 0–2 pooled: G2-text, R2-text (RLOO vs w8 falls 7.7 SE after its
peak), R4-text and P1_kl_matched pass; D1 fails on IPO alone (interior maximum, 16.5 SE,
but the quadratic in KL fits it better than d(α − β log d), RMSE 0.063 vs 0.099; DPO and
SLiC: interior maxima, 10.9 and 13.5 SE, log form wins, RMSE 0.023 vs 0.046 and 0.020 vs
0.059); D2 fails on DPO (gold peaks at step 50 and falls 3.4 SE but KL dips after the
peak) and SLiC (last checkpoint best), IPO passes (falls 17 SE while KL rises 14.1 →
17.3); P1 fails (DPO below RLOO by > 1 SE in the 4–8 and 8–16 nat bins); G1-text and
G3-text fail (best-of-256 never reaches the repetitive tail).

``--config.text.world.gold=teacher --config.text.world.repeat_penalty=0`` swaps the text
gold for a random network of character and adjacent-pair frequencies: run once in full
(2026-12-02, ≈ 10 min per text world), every gold curve kept rising and G2-text, R2-text,
IPO's D2 and P1_kl_matched failed too (README, "Design probes"). Until that run, a
from-scratch ``full.py`` crashed when pooling the text worlds (fixed in ``run_stage``).
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
