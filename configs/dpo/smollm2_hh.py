r"""DPO of SmolLM2-135M-Instruct on HH-RLHF harmless-base (chat prompts), for GPU users.

Command:
  python -m experiments.train_dpo --config=configs/dpo/smollm2_hh.py --workdir=/tmp/dpo_smollm2 \
      [--config.loss.name=ipo] [--config.ref.mode=cached]
  (CPU smoke test: configs/dpo/smollm2_hh.py:quick, 2 steps at batch 2.)

Model and tokenizer: the offline SmolLM2-135M-Instruct GGUF (Q4_1, dequantized
to float32 parameters; bfloat16 compute on GPU/TPU). Data: the 2,312
harmless-base test pairs re-split 80/10/10 by conversation hash; trains on
``resplit_train`` (1,827 pairs), evaluates on the first 64 pairs of
``resplit_validation`` (implicit-reward accuracy and the KL to the reference
on 64 sampled responses of up to 64 tokens). The reference is the initial
policy; ``ref.mode=cached`` scores it once per pair and then never loads it. That
scoring comes before the first step, with a progress bar: on this 2-core CPU at
``:quick``'s batch shape about 1.1 s a pair, so about 35 min for ``resplit_train``
(measured on 8 pairs, 2026-12-05); smoke-test it on a slice with
``--config.data.train_split='resplit_train[:8]'``. The table is cached on disk, so it
is paid once per data, tokenizer and reference.

Layout (the fast path, as in ``benchmarks.run``'s ``dpo_step_hh_*`` cases): each pair
is one ``prompt | chosen | rejected`` sequence whose prompt is computed once
(``share_prompt``), packed into 4 rows of 1,024 tokens, up to 16 pairs a step. On
``resplit_train``'s first 40 batches that is 14.6 pairs a step on average (9 at least)
with 80% of the 4,096 slots real (5 rows: 15.6 pairs, 69% real; 8 rows with
``batch_size=24``: 23.6 pairs, 66%); the padded layout needs 32 rows of 427 tokens on
average (13,670 slots; measured 2026-12-05 on the split of builder 1.2.0). The 4 rows
split over 1, 2 or 4 data-parallel devices; on 8, add
``--config.data.pipeline.pack_rows=8 --config.data.pipeline.batch_size=24`` (the
binary stops before the first step when the rows do not split). Multi-process runs and
KTO (whose mismatched pairs are built from padded rows) need the padded layout:
``--config.data.pipeline.mode=padded --config.data.pipeline.share_prompt=False``.

Expected: ``:quick`` on this shared 2-core CPU took 6.5 min wall beside
another 2-thread job (2026-12-02, 5.4 min CPU): 1.5 min to load the GGUF, build HH
and compile, then 2 packed steps of 2 pairs (loss 0.6931 -> 0.6934, as expected at
lr 5e-7) and the eval with sampling (mostly compiling generation). Quiet, with
``model.scan_layers`` (2026-12-02 17:37 UTC): 3.4 min, 52 s to the first step, eval 130 s. The
default run is GPU work:
≈ 1.1 GFLOP per token slot through 135M parameters (the policy's forward+backward
and the reference's forward), ≈ 4.5 TFLOP a step (4,096 slots); at the ~85 GFLOP/s a CPU train
step reaches here that is ≈ 53 s a step, ≈ 3 hours for 200 steps (not run on
CPU). Its result has not been measured.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (2 steps at batch 2: a CPU smoke test)."""
  config = ml_collections.ConfigDict()
  # total_steps follows --config.loop.num_steps (a derived reference: setting total_steps
  # itself leaves num_steps alone).
  num_steps = ml_collections.FieldReference(200)
  config.seed = 0
  config.tokenizer = dict(path="asset:smollm2")
  # scan_layers: the 30 blocks compile as one (rm_step_hh_30layers_scan in benchmarks.run).
  config.model = experiment.model_section(arch="decoder", preset="", path="asset:smollm2",
                                          dtype="", overrides={}, scan_layers=True)
  config.data = experiment.data_section(
      name="hh_rlhf/harmless-base", eval_split="resplit_validation[:64]",
      pipeline=dict(seed=0, batch_size=16, max_length=512, max_prompt_length=256,
                    mode="packed", share_prompt=True, pack_length=1024, pack_rows=4,
                    max_segments_per_row=24, bucket_boundaries=(), prompt_style="chat"))
  config.loss = dict(name="dpo", beta=0.1, kwargs="", nll_alpha=config_dict.placeholder(float))
  config.ref = dict(mode="auto", path="", cache_dir="")
  config.optimizer = configlib.section(
      train.OptimizerConfig, name="adamw", learning_rate=5e-7, schedule="cosine", warmup_steps=20,
      total_steps=num_steps * 1, weight_decay=0.0, grad_clip_norm=10.0)
  config.loop = configlib.section(train.LoopConfig, num_steps=num_steps, log_every=10,
                                  eval_every=100, checkpoint_every=100, seed=0,
                                  async_checkpointing=True, tensorboard=True)
  config.eval = dict(batch_size=16, kl_max_new_tokens=64, kl_temperature=1.0, exact_kl="auto")
  config.mesh = dict(shape=(-1, 1, 1), num_devices=0)
  config.export_hf = False  # True: also write <workdir>/hf, a Hugging Face model directory
  if arg == "quick":
    config.data.pipeline.batch_size = 2
    config.data.pipeline.max_length = 256
    config.data.pipeline.max_prompt_length = 128
    config.data.pipeline.update(pack_length=512, pack_rows=1)
    config.data.eval_split = "resplit_validation[:4]"
    config.eval.batch_size = 4
    config.eval.kl_max_new_tokens = 16
    config.optimizer.warmup_steps = 0
    config.loop.num_steps = 2
    config.loop.log_every = 1
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 0
    config.loop.async_checkpointing = False
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  return config
