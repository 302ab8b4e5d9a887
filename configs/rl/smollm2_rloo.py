r"""RLOO of SmolLM2-135M-Instruct on HH-RLHF harmless prompts against a MiniLM reward model.

COMMAND (GPU; first train the proxy and the gold reward models):
  python -m experiments.train_rm --config=configs/rm/hh_minilm.py --workdir=/tmp/rm_proxy
  python -m experiments.train_rm --config=configs/rm/hh_minilm.py --workdir=/tmp/rm_gold \
      --config.seed=1 --config.model.pooling=cls
  python -m experiments.train_rl --config=configs/rl/smollm2_rloo.py --workdir=/tmp/rl_smollm2 \
      --config.proxy.checkpoint=/tmp/rm_proxy --config.gold.checkpoint=/tmp/rm_gold
  (CPU smoke test: configs/rl/smollm2_rloo.py:quick.)

Policy and reference: the offline SmolLM2-135M-Instruct GGUF (dequantized to
float32 parameters; bfloat16 compute on GPU/TPU). Prompts: harmless-base
``resplit_train`` in the chat template, held-out eval on the first 64 prompts of
``resplit_validation``. Proxy: a MiniLM reward model (``train_rm`` workdir);
gold: a second, independently trained reward model standing in for human
judgement, as in the synthetic setup of Gao et al. (arXiv:2210.10760). With an
empty ``checkpoint`` the reward head is random (smoke tests only).
The 49k vocabulary is above ``exact_kl_max_vocab``: the eval logs the k1/k2/k3
KL estimators and the Monte Carlo sequence entropy, not the exact KL.

EXPECTED: `:quick` (1 step, 1 prompt x 2 samples of 4 tokens, 2 eval prompts,
random reward heads) runs end to end on this shared 2-core CPU in about 2 min 10 s
wall (loading, compilation and a 2 GB checkpoint dominate); 1 min 29 s with
``model.scan_layers`` (2026-12-02, quiet). Full-run CPU cost,
not measured: generation with the KV cache costs one 135M forward per token per batch, about
0.27 GFLOP per token, so one RLOO step (8 prompts x 4 samples x 64 new tokens,
plus policy/reference/reward forwards and a backward) is minutes on CPU and
under a second on one H100. Numbers for the full run: not yet measured.
"""

import ml_collections
from ml_collections import config_dict

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = dict(path="asset:smollm2")
  # scan_layers: the 30 blocks compile as one in the train step's forward (benchmarks.run's
  # rm_step_hh_30layers_scan); the sampler's prefill/extend still unroll them.
  c.model = experiment.model_section(arch="decoder", preset="", path="asset:smollm2", head="",
                                     dtype="", overrides={}, scan_layers=True)
  c.world = None
  c.data = dict(name="hh_rlhf/harmless-base", on_bad_row="error", cache_dir="")
  c.prompts = dict(source="dataset", split="resplit_train", eval_split="resplit_validation",
                   num_eval=64, eval_seed=1, max_length=128, style="chat",
                   add_bos=True)  # raw style: as the policy's training data.pipeline.add_bos
  c.warm_start = dict(steps=0, batch_size=0, learning_rate=0.0)
  reward_model = dict(experiment.MODEL_SWITCHES, arch="encoder", preset="",
                      path="asset:minilm", head="reward", ensemble="heads", pooling="mean",
                      dtype="float32", overrides={},
                      score_label="")  # a two-label HF classifier in path: the label's log-odds
  c.proxy = dict(kind="model", name="proxy_minilm", tokenizer=dict(path="asset:minilm"),
                 model=dict(reward_model), checkpoint="", batch_size=32,
                 max_length=0,  # 0: cut as the RM trained (its checkpoint's data.pipeline)
                 aggregation="mean", lam=0.0,
                 # wco/uwo: members standardized on π_ref samples, prompts x samples each
                 reference_prompts=64, reference_samples_per_prompt=4)
  c.gold = dict(kind="model", name="gold_minilm", tokenizer=dict(path="asset:minilm"),
                model=dict(reward_model, pooling="cls"), checkpoint="", max_length=0,
                batch_size=32, aggregation="mean", lam=0.0)
  c.sampling = dict(max_new_tokens=64, temperature=1.0, 
                    top_k=config_dict.placeholder(int),
                    top_p=config_dict.placeholder(float))  # settable for best_of_n
  c.rl = dict(
      algorithm="rloo", prompts_per_step=8, group_size=4, epochs=1,
      num_minibatches=1, clip_eps=0.2, vf_coef=0.1, vf_clip_eps=0.2, entropy_coef=0.0,
      gamma=1.0, lam=0.95, whiten_advantages=True, kl_coef=0.05, kl_estimator="k1",
      adaptive_kl=dict(enabled=False, target=6.0, horizon=10000.0), value_trunk="separate",
      missing_eos_penalty=0.0)  # > 0: subtracted from a response cut at max_new_tokens
  c.optimizer = configlib.section(train.OptimizerConfig, name="adamw", learning_rate=1e-6,
                                 weight_decay=0.0, grad_clip_norm=1.0)
  # eval_at_start: the step-0 eval is the curves' origin (summary "initial").
  c.loop = configlib.section(train.LoopConfig, num_steps=200, log_every=1, eval_every=20,
                             checkpoint_every=20, keep_checkpoints=2, eval_at_start=True)
  c.eval = dict(exact_kl_max_vocab=4096)
  c.mesh = dict(shape=(), num_devices=0)  # () = one device; e.g. (-1, 1, 1) data-parallel
  c.export_hf = False  # True: also write the final policy to <workdir>/hf (Hugging Face)
  c.log_train_gold = False
  if arg == "quick":
    c.loop.num_steps = 1
    c.rl.prompts_per_step = 1
    c.rl.group_size = 2
    c.prompts.num_eval = 2
    c.prompts.max_length = 64
    c.sampling.max_new_tokens = 4
    c.loop.eval_every = 1
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
