r"""Gao et al.'s real-model setting at small scale: SmolLM2-135M on HH-RLHF prompts.

Command (GPU for the default; `:quick` is the CPU smoke run):
  python -m experiments.reproduce --config=configs/reproduce/smollm2_hh.py --workdir=workdirs/hh
  python -m experiments.reproduce --config=configs/reproduce/smollm2_hh.py:quick \
      --workdir=workdirs/hh_quick

Variants: ``:quick`` (CPU smoke run: every stage but DPO, so no D1/D2/P1, with the real
assets at toy sizes; its numbers mean nothing) and ``:tiny`` (the test's: a random tiny
Llama and tiny random encoders on byte tokens in place of SmolLM2 and MiniLM).

What it runs (``experiments/hh_study.py``, through ``experiments/text_study.py``): no
bandit world. (1) gold = all-MiniLM-L6-v2 + a reward head trained by ``train_rm`` on the
HH harmless-base human pairs (``resplit_train``), as ``configs/rm/hh_minilm.py``: the
project's HH reward model, the only pretrained encoder offline, and a different
architecture and tokenizer from the policy; (2) π_ref = SmolLM2-135M-Instruct (GGUF), no
SFT, sampling HH training prompts in the chat template; (3) proxies = randomly initialised
2-layer encoders of widths 32–256 (MiniLM's tokenizer) trained by ``train_rm`` on
gold-labelled pairs of π_ref samples (no smaller pretrained encoder is available offline;
Gao et al.'s proxies were pretrained); (4) ``best_of_n`` against every proxy, RLOO
(``train_rl``) against the smallest and largest, DPO / IPO (``train_dpo``) on the same
pairs; (5) every RL and DPO checkpoint sampled on the same 64 held-out HH prompts
(``resplit_validation``) with one key: gold, proxies, exact sequence KL over the 49k
vocabulary; criteria G1–G3, R2, R4 (suffixed ``-hh``), D1, D2, P1.

Expected runtime and cost.
`:quick` (measured 2026-12-02 on this 2-core CPU, quiet, TFDS and compilation caches
empty): 3 min 58 s wall (study 231 s), 5 min 21 s of CPU time. Stage by stage: gold 27 s,
pairs 22 s, proxies 6 + 6 s, best-of-n 23 + 18 s, RLOO 90 s (its own final eval included),
checkpoint evaluation 31 s: loading SmolLM2 and compiling each binary dominate, not the
arithmetic (2 RL steps, 40 pairs, 4 × 8 best-of-n samples of 12 tokens). On 2026-12-01,
shared with other jobs (load ≈ 6–7), it took 9 min 35 s, peak RSS 10.0 GB; 9 min 40 s at
load ≈ 8, peak RSS 10.7 GB, on 2026-12-06 after the sampler fix (1fc2d9a); 2 min 44 s, peak
RSS 10.0 GB, later that day after the GGUF tokenizer fix, quiet, with the compilation cache warm;
4 min 50 s, peak RSS 11.8 GB, quiet, on 2026-12-08 (give it 12 GB of memory). Its
numbers mean nothing (6 gold steps: HH validation accuracy 0.586; proxies 0.750 / 0.500 on
8 held-out pairs, unchanged by the tokenizer fix; 0.584 and 0.375 / 0.500 before the
sampler fix; 0/5 criteria pass).
The default (not run; no GPU here), estimated from its token counts with SmolLM2 at
≈ 0.27 GFLOP per token forward (2 × 135M) and ×4 for a training token (forward, backward,
the reference's forward):
  generated tokens: pairs 4,200 × 2 × 48 = 0.40M; best-of-n 4 widths × 128 × 256 × 48 =
  6.3M; RLOO 2 × 100 steps × 64 × 48 = 0.61M; checkpoint evaluation 40 × 256 × 48 = 0.49M;
  total ≈ 7.8M tokens ≈ 2.1 PFLOP;
  trained tokens: RLOO 2 × 100 × 64 × 176 = 2.3M, DPO 6 × 100 × 4,096 packed slots (16
  pairs a step sharing their prompts) = 2.5M, ≈ 4.8M × 1.1 GFLOP ≈ 5.3 PFLOP;
  gold (MiniLM, 300 steps) ≈ 6 min on a quiet CPU (configs/rm/hh_minilm.py: 150 steps in
  2 min 49 s), proxies minutes.
  CPU: ≈ 7.4 PFLOP at the ≈ 85 GFLOP/s a train step reaches here ≈ 24 h: about a day.
  One GPU (H100/H200): the arithmetic is ≈ 1–2 min at 100 TFLOP/s; the run is bounded by
  18 binary start-ups (loading SmolLM2 or MiniLM and compiling: ≈ 1 min each), 40
  checkpoint loads for the evaluation and writing 32 checkpoints of 1.8 GB (parameters,
  Adam state; measured in `:quick`): ≈ 40–70 min. The exact-KL evaluation runs its
  256 rows of 176 tokens in chunks of 31 rows (1 GiB of float32 logits a model each,
  `text_world.KL_LOGITS_BYTES`; 8.9 GB a model unchunked). Disk: ≈ 60 GB of checkpoints.
Expected result: not yet measured (no GPU run).
"""

from __future__ import annotations

import ml_collections

from prefjax import experiment


def _text(variant: str | None) -> ml_collections.ConfigDict:
  text = ml_collections.ConfigDict()
  text.enabled, text.kind, text.num_bootstrap = True, "hh", 1000
  text.data = dict(name="hh_rlhf/harmless-base")
  # scan_layers as configs/rl/smollm2_rloo.py and configs/dpo/smollm2_hh.py set it (the study
  # replaces their model section with this one): the 30 blocks compile as one in the train steps.
  text.policy = dict(tokenizer=dict(path="asset:smollm2"),
                     model=dict(experiment.MODEL_SWITCHES, arch="decoder", preset="",
                                path="asset:smollm2", dtype="", overrides={},
                                scan_layers=True),
                     prompt_length=128, style="chat")
  text.sampling = dict(max_new_tokens=48)
  encoder = dict(experiment.MODEL_SWITCHES, arch="encoder", preset="", path="asset:minilm",
                 head="reward", ensemble="heads", pooling="mean", dtype="float32", overrides={})
  text.gold = dict(tokenizer=dict(path="asset:minilm"), model=encoder, steps=300,
                   batch_size=16, max_length=80, learning_rate=5e-5, seed=1)
  text.proxy = dict(tokenizer=dict(path="asset:minilm"), widths=(32, 64, 128, 256),
                    num_layers=2, steps=600, batch_size=32, max_length=80, learning_rate=1e-3,
                    seed=0)
  text.pairs = dict(num_pairs=4000, num_test=200, seed=0, chunk=512)
  text.bon = dict(num_prompts=128, num_samples=256, num_points=12, prompts_per_batch=8)
  text.rl = dict(widths=(32, 256), algorithm="rloo", kl_coef=0.02, steps=100, eval_every=25,
                 prompts_per_step=16, group_size=4, learning_rate=3e-6)
  # Three β: D1 compares two 2-parameter fits through the reference, so it needs three
  # points of its own (with two, both fit exactly: direct_criteria.D1_MIN_BETAS).
  text.dpo = dict(losses=("dpo", "ipo"), betas=(0.1, 0.3, 1.0), steps=100, eval_every=25,
                  batch_size=16, learning_rate=1e-6)
  text.eval = dict(num_prompts=64, samples_per_prompt=4, seed=1)
  if variant in ("quick", "tiny"):
    text.num_bootstrap = 100
    text.policy.prompt_length = 64
    text.sampling.max_new_tokens = 12
    text.gold.update(steps=6, batch_size=8)
    text.proxy.update(widths=(16, 32), num_layers=1, steps=8, batch_size=8)
    text.pairs.update(num_pairs=32, num_test=8)
    text.bon.update(num_prompts=4, num_samples=8, num_points=4, prompts_per_batch=4)
    text.rl.update(widths=(32,), steps=2, eval_every=1, prompts_per_step=2, group_size=2)
    text.dpo.losses = ()  # DPO is the default run's (GPU); `:tiny` checks its wiring
    text.eval.update(num_prompts=4, samples_per_prompt=2)
  if variant == "tiny":
    text.policy.update(tokenizer=dict(path="byte"), prompt_length=40)
    text.policy.model.update(preset="tiny_llama", path="", dtype="float32", overrides=dict(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
        max_position_embeddings=64))
    tiny_encoder = dict(encoder, preset="tiny", path="", overrides=dict(num_layers=1))
    text.gold.update(tokenizer=dict(path="byte"), model=tiny_encoder, max_length=48,
                     learning_rate=1e-3)
    text.proxy.update(tokenizer=dict(path="byte"), max_length=48, steps=4)
    text.sampling.max_new_tokens = 6
    text.dpo.update(losses=("dpo",), betas=(0.1, 1.0), steps=2, eval_every=1, batch_size=4)
  return text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the GPU run), ``quick`` (CPU smoke run) or ``tiny`` (the test's)."""
  if arg not in (None, "", "quick", "tiny"):
    raise ValueError(f"unknown variant {arg!r}; use none, 'quick' or 'tiny'")
  config = ml_collections.ConfigDict()
  config.bandit = None  # this study has no bandit world
  config.text = _text(arg or None)
  return config
