r"""SFT of a tiny random decoder on the tiny text world's chosen responses (byte tokens).

Command:
  python -m experiments.train_sft --config=configs/sft/tiny.py --workdir=/tmp/sft_tiny

With ``export_hf=True`` (default here) the policy is also written to
``/tmp/sft_tiny/hf``; start DPO from it with
  python -m experiments.train_dpo --config=configs/dpo/tiny.py --workdir=/tmp/dpo_tiny \
      --config.model.path=/tmp/sft_tiny/hf

Expected (measured on this shared 2-core CPU): about 35 s wall (20 s in the train
loop, 300 steps of 32 sequences); held-out response NLL 2.76 / 2.74 / 2.74
nats per token at steps 100 / 200 / 300 (perplexity 15.5; the random init scores
about log(259) = 5.6). ``:quick`` (40 steps) reaches 3.29 (remeasured 2026-12-01).
"""

from __future__ import annotations

import ml_collections

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (fewer steps, for tests)."""
  config = ml_collections.ConfigDict()
  # total_steps follows --config.loop.num_steps (a derived reference: setting total_steps
  # itself leaves num_steps alone).
  num_steps = ml_collections.FieldReference(300)
  config.seed = 0
  config.tokenizer = dict(path="byte")
  config.model = experiment.model_section(
      arch="decoder", preset="tiny_llama", path="", dtype="",
      overrides=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=64))
  config.data = experiment.data_section(
      response_key="chosen",
      pipeline=dict(seed=0, batch_size=32, max_length=32, mode="padded"))
  config.optimizer = configlib.section(
      train.OptimizerConfig, name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=10,
      total_steps=num_steps * 1, weight_decay=0.0, grad_clip_norm=1.0)
  config.loop = configlib.section(train.LoopConfig, num_steps=num_steps, log_every=20,
                                  eval_every=100, checkpoint_every=100, seed=0,
                                  async_checkpointing=False, tensorboard=True)
  config.eval = dict(batch_size=64)
  config.mesh = dict(shape=(-1, 1, 1), num_devices=0)
  config.export_hf = True
  if arg == "quick":
    config.loop.num_steps = 40
    config.loop.eval_every = 20
    config.loop.checkpoint_every = 0
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  return config
