r"""PPO on the tiny world: proxy = gold + a planted exploitable character.

COMMAND:
  python -m experiments.train_rl --config=configs/rl/tiny_ppo.py --workdir=/tmp/rl_tiny_ppo

Policy: a random 2-layer byte-level decoder (hidden 64), first warm-started for
150 supervised steps on uniform random tiny-world responses (so it emits the
16-letter alphabet, the exploit character "p" included, and EOS), then frozen
as the reference. PPO: 64 prompts per step, 2 epochs x 2 minibatches, GAE
(γ=1, λ=0.95), per-token k1 KL penalty β=0.02, separate value model initialised
from the reference. Eval every 3 steps on the same 64 held-out prompts.

EXPECTED (measured on this shared 2-core CPU, seed 0): about 25-70 s wall
including compilation (depends on machine load; 24 s remeasured 2026-12-06 after the
sampler fix, 1fc2d9a, compilation cache warm). Held-out gold rises only from -0.22 to
-0.06 (SE 0.05) at step 6, then falls to -0.96 by step 18 as the exploit character
takes over (exploit fraction 0.04 -> 0.96); proxy -0.10 -> +1.93. Before the fix the
gold rose to +0.18 (SE 0.07) at step 6; seeds 1 and 2 after it rise +0.29 / +0.33
(peak at step 3): the size of the rise is seed noise, the collapse to about -0.95 is
not. k1 KL and the exact KL agree within their SEs.
`:quick` = 8 steps (smoke test).
"""

import ml_collections
from ml_collections import config_dict

from prefjax import configlib
from prefjax import experiment
from prefjax import train


def base_config() -> ml_collections.ConfigDict:
  """Shared by tiny_ppo and tiny_rloo."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = dict(path="byte")
  c.model = experiment.model_section(
      arch="decoder", preset="tiny_llama", path="", head="", dtype="float32",
      overrides=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, max_position_embeddings=64))
  # A world whose proxy optimum is the exploit character: proxy("ppp…") = 3 − 1 = 2
  # beats every honest string (best: 1.30 + 0.5 echo bonus), while gold("ppp…") = −1.
  c.world = dict(seed=0, exploit_char="p", exploit_weight=3.0, exploit_gold_penalty=1.0,
                 echo_bonus=0.5)
  c.prompts = dict(source="tiny_world", num_eval=64, eval_seed=1, max_length=10, style="raw",
                   add_bos=True)  # as the policy's training data.pipeline.add_bos
  c.warm_start = dict(steps=150, batch_size=64, learning_rate=3e-3)
  # A reward model of one's own: --config.proxy.kind=model --config.proxy.checkpoint=WORKDIR
  # (a train_rm run, e.g. of configs/rm/tiny.py; its tokenizer and model come from the run).
  # reference_*: π_ref samples (prompts x samples each) that standardize a model ensemble's
  # members before WCO/UWO (proxy.kind="model", aggregation wco/uwo); unused otherwise.
  c.proxy = dict(kind="tiny_world_proxy", checkpoint="", batch_size=64, aggregation="mean",
                 lam=0.0, reference_prompts=64, reference_samples_per_prompt=4)
  c.gold = dict(kind="tiny_world_gold")  # (fields a study's finished stages are keyed by)
  c.sampling = dict(max_new_tokens=14, temperature=1.0, 
                    top_k=config_dict.placeholder(int),
                    top_p=config_dict.placeholder(float))  # settable for best_of_n
  c.rl = dict(
      algorithm="ppo", prompts_per_step=64, group_size=1, epochs=2,
      num_minibatches=2, clip_eps=0.2, vf_coef=0.1, vf_clip_eps=0.2, entropy_coef=0.0,
      gamma=1.0, lam=0.95, whiten_advantages=True, kl_coef=0.02, kl_estimator="k1",
      adaptive_kl=dict(enabled=False, target=4.0, horizon=10000.0), value_trunk="separate",
      missing_eos_penalty=0.0)  # > 0: subtracted from a response cut at max_new_tokens
  c.optimizer = configlib.section(train.OptimizerConfig, name="adam", learning_rate=1e-3,
                                 grad_clip_norm=1.0)
  # eval_at_start: the step-0 eval is the curves' origin (summary "initial").
  c.loop = configlib.section(train.LoopConfig, num_steps=18, log_every=1, eval_every=3,
                             checkpoint_every=10, keep_checkpoints=2, eval_at_start=True)
  c.eval = dict(exact_kl_max_vocab=4096)
  c.mesh = dict(shape=(), num_devices=0)  # () = one device; e.g. (-1, 1, 1) data-parallel
  c.export_hf = False  # True: also write the final policy to <workdir>/hf (Hugging Face)
  c.log_train_gold = True
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  c = base_config()
  if arg == "quick":
    c.loop.num_steps = 8
    c.loop.eval_every = 4
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; expected none or 'quick'")
  return c
