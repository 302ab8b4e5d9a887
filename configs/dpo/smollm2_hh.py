r"""DPO of SmolLM2-135M-Instruct on HH-RLHF harmless-base (chat prompts), for GPU users.

Command:
  python -m experiments.train_dpo --config=configs/dpo/smollm2_hh.py --workdir=/tmp/dpo_smollm2 \
      [--config.loss.name=ipo] [--config.ref.mode=cached]
  (CPU smoke test: configs/dpo/smollm2_hh.py:quick, 2 steps at batch 2.)

Model and tokenizer: the offline SmolLM2-135M-Instruct GGUF (Q4_1, dequantized
to float32 parameters; bfloat16 compute on GPU/TPU). Data: the 2,312
harmless-base test pairs re-split 80/10/10 by prompt hash; trains on
``resplit_train`` (about 1,850 pairs), evaluates on the first 64 pairs of
``resplit_validation`` (implicit-reward accuracy and the KL to the reference
on 64 sampled responses of up to 64 tokens). The reference is the initial
policy; ``ref.mode=cached`` scores it once per pair and then never loads it.

Expected: ``:quick`` on this shared 2-core CPU took 5 min wall (2 min CPU): 1.5 min
to load the GGUF, build HH and compile, then 2 steps at batch 2 (loss 0.6931 ->
0.6936, as expected at lr 5e-7) and the eval with sampling (2.5 min, mostly
compiling generation). The default run is GPU work: a step is 32 rows (16 pairs)
of ~300 tokens (512 at most) through 135M parameters, ~1.1 GFLOP per token for
the policy's forward+backward and the reference's forward, so 10-18 TFLOP; at
the ~85 GFLOP/s a CPU train step reaches here that is 2-3.5 min a step, 7-11
hours for 200 steps (not run on CPU). Its result has not been measured.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (default) or ``quick`` (2 steps at batch 2: a CPU smoke test)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tokenizer = dict(path="asset:smollm2")
  config.model = dict(arch="decoder", preset="", path="asset:smollm2", dtype="", overrides={})
  config.data = dict(
      name="hh_rlhf/harmless-base", train_split="resplit_train",
      eval_split="resplit_validation[:64]", on_bad_row="error", cache_dir="",
      pipeline=dict(seed=0, batch_size=16, max_length=512, max_prompt_length=256,
                    mode="padded", bucket_boundaries=(128, 256), prompt_style="chat"))
  config.loss = dict(name="dpo", beta=0.1, kwargs="", nll_alpha=config_dict.placeholder(float))
  config.ref = dict(mode="auto", path="", cache_dir="")
  config.optimizer = dict(name="adamw", learning_rate=5e-7, schedule="cosine",
                          warmup_steps=20, total_steps=200, weight_decay=0.0,
                          grad_clip_norm=10.0)
  config.loop = dict(num_steps=200, log_every=10, eval_every=100, checkpoint_every=100,
                     seed=0, async_checkpointing=True, tensorboard=True, allow_restart=False)
  config.eval = dict(batch_size=16, kl_max_new_tokens=64, kl_temperature=1.0, exact_kl="auto")
  config.mesh = dict(shape=(-1, 1, 1))
  if arg == "quick":
    config.data.pipeline.batch_size = 2
    config.data.pipeline.max_length = 256
    config.data.pipeline.max_prompt_length = 128
    config.data.pipeline.bucket_boundaries = ()
    config.data.eval_split = "resplit_validation[:4]"
    config.eval.batch_size = 4
    config.eval.kl_max_new_tokens = 16
    config.optimizer.warmup_steps = 0
    config.optimizer.total_steps = 2
    config.loop.num_steps = 2
    config.loop.log_every = 1
    config.loop.eval_every = 0
    config.loop.checkpoint_every = 0
    config.loop.async_checkpointing = False
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: quick")
  return config
