"""PPO / RLOO binary on the tiny world: overoptimization, KL logging, resume, CLI.

The tiny world's proxy = gold + 3·(fraction of the exploit character "p"),
while the gold reward gives "p" −1. Optimising the proxy first raises the gold
score (honest high-score characters are learned) and then lowers it as "p"
takes over. Thresholds below are loose versions of the measured curves
(documented in configs/rl/tiny_*.py): gold rises by > 0.1 at its peak (several
standard errors, SE ≈ 0.04), falls by > 0.5 after the peak, and the proxy
gains > 1.5. Measured at the suite's XLA flags (2026-12-07, config.seed 0–5; the
tests run seed 0): PPO gold gain at peak 0.17 / 0.30 / 0.33 / 0.31 / 0.21 / 0.29,
drop after it 0.91 / 1.02 / 1.00 / 1.09 / 0.83 / 1.04, proxy gain 2.03 / 1.93 /
2.02 / 1.94 / 2.15 / 1.95; RLOO 0.58 / 0.12 / 0.35 / 0.26 / 0.17 / 0.29, 1.25 /
0.79 / 0.97 / 0.96 / 0.78 / 1.07, 1.97 / 1.99 / 1.97 / 2.00 / 2.10 / 1.91. The
gold rise is the tightest margin (RLOO seed 1: 0.12). Seed 0 gave the same numbers
under every vector ISA `make test-isa` emulates (sse4, avx, avx2, avx512) and on
one core.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.rl import tiny_ppo
from configs.rl import tiny_rloo
from experiments import train_rl
from prefjax import experiment
from prefjax import rewards as reward_fns
from prefjax import train
from prefjax.rl import algorithms
from prefjax.rl import kl_control
from prefjax.rl import rewards
from prefjax.rl import trainer
from prefjax.models import decoder
from prefjax.models import hf_import
from prefjax.rl import setup
from prefjax.rl import rollout as rollout_lib
from prefjax.train import state as state_lib
from tests import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def _evals(workdir):
  return [{k[5:]: v for k, v in r.items() if k.startswith("eval/")} | {"step": r["step"]}
          for r in train.read_metrics(workdir) if "eval/gold" in r]


@pytest.fixture(scope="module")
def scratch():
  # Not tmp_path_factory: concurrent pytest sessions of the same user prune each
  # other's base temp directories (pytest keeps the 3 newest), which would delete
  # these module-long workdirs mid-module.
  with tempfile.TemporaryDirectory(prefix="prefjax_rl_") as d:
    yield pathlib.Path(d)


@pytest.fixture(scope="module")
def ppo_run(scratch):
  workdir = str(scratch / "ppo")
  return workdir, train_rl.run(tiny_ppo.get_config(), workdir)


@pytest.fixture(scope="module")
def rloo_run(scratch):
  workdir = str(scratch / "rloo")
  return workdir, train_rl.run(tiny_rloo.get_config(), workdir)


@pytest.mark.parametrize("run_fixture", ["ppo_run", "rloo_run"])
def test_proxy_rises_and_gold_rises_then_falls(run_fixture, request):
  workdir, summary = request.getfixturevalue(run_fixture)
  evals = _evals(workdir)
  gold = np.array([e["gold"] for e in evals])
  peak = int(np.argmax(gold))
  # Another CPU samples another stream. Over config.seed 0-19 (PPO) and 0-39 (RLOO) the
  # gold's rise to its peak was >= 0.167 / 0.111 and its fall >= 0.83 / 0.78, and the
  # proxy's best eval >= 1.93 / 1.71 above the start (2026-12-08). Not its last eval: at
  # RLOO seed 39 the policy shortened its responses to shed KL penalty over the last
  # steps (length 9 -> 2.4, KL 15 -> 6.5 nats) and the proxy ended at only +1.27.
  assert 0 < peak < len(gold) - 1, gold
  assert gold[peak] - gold[0] > 0.1, gold
  assert gold[peak] - gold[-1] > 0.5, gold
  proxy = np.array([e["proxy"] for e in evals])
  assert proxy.max() - proxy[0] > 1.5, proxy
  # The exploit explains the divergence: the policy ends up emitting mostly "p".
  assert evals[-1]["exploit_fraction"] > 0.5 > evals[0]["exploit_fraction"]
  assert summary["gold_gain_at_peak"] == pytest.approx(gold[peak] - gold[0])
  for name in ("proxy", "gold", "kl", "kl/exact", "entropy", "response_length"):
    assert all(np.isfinite(e[name]) for e in evals), name


@pytest.mark.parametrize("run_fixture", ["ppo_run", "rloo_run"])
def test_kl_estimator_agrees_with_exact_kl(run_fixture, request):
  workdir, _ = request.getfixturevalue(run_fixture)
  evals = _evals(workdir)
  assert evals[0]["kl"] == 0.0 and evals[0]["kl/exact"] == pytest.approx(0.0, abs=1e-5)
  moved = [e for e in evals if e["kl/exact"] > 1.0]
  assert moved, [e["kl/exact"] for e in evals]
  # k1 and k3 are unbiased for the sequence KL and kl_exact is its Rao–Blackwellised
  # form, so they agree within a few standard errors of their per-sample difference.
  # k1's difference is well behaved everywhere; k3's has a heavy right tail
  # (tokens that π_ref likes but a collapsed π rarely samples), so it is checked at
  # the first eval point that moved, before the policy collapses.
  for e in moved:
    assert abs(e["kl/k1"] - e["kl/exact"]) < 4 * e["kl/k1_diff_se"], e
  first = moved[0]
  for est in ("kl", "kl/k3"):  # "kl" is the run's configured estimator
    assert abs(first[est] - first["kl/exact"]) < 4 * first[f"{est}_diff_se"], (est, first)


def test_train_metrics_are_logged(ppo_run):
  workdir, _ = ppo_run
  records = train.read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == list(range(len(steps)))
  last = records[-1]
  for name in ("proxy_score", "gold_score", "kl", "kl_coef", "policy_loss", "value_loss",
               "clip_fraction", "approx_kl", "grad_norm", "response_length"):
    assert np.isfinite(last[name]), name
  assert (pathlib.Path(workdir) / "tensorboard").is_dir()
  png = pathlib.Path(workdir) / "figures" / "rl.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reproduces_uninterrupted_run(rloo_run, scratch):
  workdir, _ = rloo_run
  resumed = scratch / "resumed"
  shutil.copytree(workdir, resumed)
  ckpts = resumed / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps[-1] == 30 and 20 in steps, steps
  # A damaged last checkpoint: the rerun falls back to step 20 and sets 30 aside.
  os.truncate(ckpts / "30" / "state" / "_METADATA", 10)
  train_rl.run(tiny_rloo.get_config(), str(resumed))
  assert (resumed / "checkpoints.damaged" / "30").is_dir()
  original, again = _evals(workdir), _evals(str(resumed))
  assert [e["step"] for e in again] == [e["step"] for e in original]
  for a, b in zip(original[-3:], again[-3:]):
    for name in ("proxy", "gold", "kl", "kl/exact"):
      assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), (name, a["step"])


def test_adaptive_kl_run_logs_controller_trajectory(ppo_run, scratch):
  del ppo_run  # shares its compiled programs
  config = tiny_ppo.get_config("quick")
  config.loop.num_steps = 4
  config.warm_start.steps = 20
  config.rl.adaptive_kl = dict(enabled=True, target=0.5, horizon=200.0)
  config.export_hf = True
  workdir = scratch / "adaptive"
  train_rl.run(config, str(workdir))
  _check_export_is_the_trained_policy(config, workdir)
  records = [r for r in train.read_metrics(workdir) if "kl_coef" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert records[0]["kl_coef"] == pytest.approx(0.02)
  for prev, cur in zip(records, records[1:]):
    error = np.clip(prev["kl"] / 0.5 - 1.0, -0.2, 0.2)
    assert cur["kl_coef"] == pytest.approx(prev["kl_coef"] * (1 + error * 64 / 200.0), rel=1e-6)
  assert records[-1]["kl_coef"] != records[0]["kl_coef"]


def _check_export_is_the_trained_policy(config, workdir):
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  initial = setup.make_policy(config, tokenizer)
  bundle = rollout_lib.build_bundle(nnx.clone(initial), with_value=True)
  train.load_params(workdir, bundle, trainable=rollout_lib.TRAINABLE)
  exported = hf_import.from_pretrained(workdir / experiment.HF_EXPORT_DIR)
  assert type(exported) is type(bundle.policy)  # a causal LM, not a head model
  tokens = np.array([[tokenizer.bos_id, 97, 98, 99, 112, 112]], np.int32)
  np.testing.assert_allclose(exported(tokens), bundle.policy(tokens), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(exported(tokens) - initial(tokens))).max() > 1e-2  # trained


def test_adaptive_kl_controller_matches_ziegler_update():
  ctl = kl_control.AdaptiveKLController(value=0.1, target=6.0, horizon=10000.0)
  # e = clip(12/6 − 1, −0.2, 0.2) = 0.2; β ← 0.1·(1 + 0.2·64/10000).
  assert ctl.update(12.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1e4))
  before = ctl.value
  # e = 5.4/6 − 1 = −0.1.
  assert ctl.update(5.4, 100) == pytest.approx(before * (1 - 0.1 * 100 / 1e4))
  assert kl_control.FixedKLController(0.3).update(100.0, 8) == 0.3
  with pytest.raises(ValueError, match="not finite"):
    ctl.update(float("nan"), 8)
  # A horizon of 10 steps of 64 sequences turned β from 0.05 to -0.014 at the first step.
  with pytest.raises(ValueError, match=r"horizon=10 must exceed 0.2 x the 64 sequences"):
    kl_control.AdaptiveKLController(value=0.05, target=6.0, horizon=10.0).update(1.0, 64)


def _tiny_bundle(with_value):
  policy = decoder.Decoder(decoder.DecoderConfig.tiny_llama(vocab_size=11),
                           rngs=nnx.Rngs(0), dtype=jnp.float32)
  bundle = rollout_lib.build_bundle(policy, with_value=with_value, seed=1)
  # Perturb the policy so that it differs from its frozen reference.
  leaves = nnx.state(bundle.policy, nnx.Param)
  nnx.update(bundle.policy, jax.tree.map(lambda x: x * 1.3, leaves))
  return bundle


def _rows(seed, shape=(8, 7)):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 11, shape).astype(np.int32)
  attention = np.ones(shape, np.int32)
  attention[0, :2] = 0  # a left-padded prompt
  loss_mask = np.zeros(shape, np.int32)
  loss_mask[:, 3:] = 1
  loss_mask[1, 6:] = 0  # a short response
  attention[1, 6:] = 0
  return tokens, attention, loss_mask


def test_token_stats_against_numpy_reference():
  bundle = _tiny_bundle(with_value=True)
  tokens, attention, loss_mask = _rows(0)

  @nnx.jit
  def forward(bundle):
    stats = rollout_lib.token_stats(bundle, tokens, attention, loss_mask, full_vocab=True)
    return (stats, bundle.policy(tokens, attention_mask=attention),
            bundle.reference(tokens, attention_mask=attention),
            bundle.value(tokens, attention_mask=attention))

  stats, logits, ref, values = jax.device_get(forward(bundle))
  logits, ref, values = (np.asarray(x, np.float64) for x in (logits, ref, values))
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  lq = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  for b, t in zip(*np.nonzero(loss_mask)):
    tok = tokens[b, t]
    assert stats.logp[b, t] == pytest.approx(lp[b, t - 1, tok], abs=1e-5)
    assert stats.ref_logp[b, t] == pytest.approx(lq[b, t - 1, tok], abs=1e-5)
    assert stats.values[b, t] == pytest.approx(values[b, t - 1], abs=1e-5)
    p = np.exp(lp[b, t - 1])
    assert stats.exact_kl[b, t] == pytest.approx(np.sum(p * (lp[b, t - 1] - lq[b, t - 1])),
                                                 abs=1e-5)
    assert stats.entropy[b, t] == pytest.approx(-np.sum(p * lp[b, t - 1]), abs=1e-5)
  off = loss_mask == 0
  for field in stats:
    assert np.all(np.asarray(field)[off] == 0.0)


def test_rloo_prepare_leave_one_out_with_sequence_kl():
  bundle = _tiny_bundle(with_value=False)
  tokens, attention, loss_mask = _rows(1)
  graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  scores = np.linspace(-1.0, 2.0, 8).astype(np.float32)
  hp = algorithms.HParams(algorithm="rloo", kl_estimator="k3", whiten_advantages=False)
  beta = 0.25
  batch = algorithms.prepare(graphdef, params, extra, tokens, attention, loss_mask, scores,
                             jnp.float32(beta), hp=hp, group_size=4)
  stats = rollout_lib.token_stats(bundle, tokens, attention, loss_mask)
  log_r = np.asarray(stats.ref_logp, np.float64) - np.asarray(stats.logp, np.float64)
  k3 = ((np.exp(log_r) - 1) - log_r) * loss_mask
  rewards = (scores - beta * k3.sum(1)).reshape(2, 4)
  loo = rewards - (rewards.sum(1, keepdims=True) - rewards) / 3
  adv = np.asarray(batch["advantages"])
  # Relative: the advantages reach |13| and are float32 sums over tokens.
  np.testing.assert_allclose(adv, loo.reshape(-1)[:, None] * loss_mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_ppo_prepare_scores_the_last_token_and_whitens_over_responses(kind):
  """PPO's batch from a rollout: r_t = −β·kl_t, plus the score at each response's last
  token; GAE with V = 0 after it; returns from the raw advantages; advantages whitened
  over response tokens only. ``token_stats`` and ``gae`` are tested alone above and in
  test_losses_policy; this is how ``prepare`` puts them together, in float64."""
  bundle = _tiny_bundle(with_value=True)
  tokens, attention, loss_mask = _rows(2)
  graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  scores = np.linspace(-1.0, 2.0, 8).astype(np.float32)
  beta, gamma, lam = 0.1, 0.95, 0.9
  hp = algorithms.HParams(algorithm="ppo", gamma=gamma, lam=lam, kl_estimator=kind)
  batch = jax.device_get(algorithms.prepare(graphdef, params, extra, tokens, attention,
                                            loss_mask, scores, jnp.float32(beta), hp=hp,
                                            group_size=1))
  stats = rollout_lib.token_stats(bundle, tokens, attention, loss_mask)
  logp, ref, values = (np.asarray(x, np.float64) for x in (stats.logp, stats.ref_logp,
                                                           stats.values))
  log_r = ref - logp
  kl = (-log_r if kind == "k1" else np.expm1(log_r) - log_r) * loss_mask
  advantages = np.zeros_like(kl)
  for b in range(len(tokens)):
    steps = np.flatnonzero(loss_mask[b])
    reward = -beta * kl[b]
    reward[steps[-1]] += scores[b]
    following, running = 0.0, 0.0
    for t in steps[::-1]:
      running = reward[t] + gamma * following - values[b, t] + gamma * lam * running
      advantages[b, t], following = running, values[b, t]
  on = loss_mask > 0
  whitened = np.where(on, (advantages - advantages[on].mean()) / advantages[on].std(), 0.0)
  np.testing.assert_allclose(batch["kl"], kl, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batch["returns"], (advantages + values) * loss_mask,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batch["advantages"], whitened, rtol=1e-4, atol=1e-5)


def test_cli_smoke(scratch):
  tmp_path = scratch / "cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=child_env.one_device_xla_flags())
  cmd = [sys.executable, "-m", "experiments.train_rl", "--config=configs/rl/tiny_rloo.py:quick",
         f"--workdir={tmp_path}", "--config.loop.num_steps=2", "--config.loop.eval_every=2",
         "--config.warm_start.steps=0", "--config.prompts.num_eval=8",
         "--config.rl.prompts_per_step=4"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["final"]["step"] == 2
  assert json.loads((tmp_path / "config.json").read_text())["rl"]["algorithm"] == "rloo"


@pytest.mark.parametrize("value_trunk,extra_trunk", [("separate", True), ("shared", False)])
def test_value_trunk_sharing(value_trunk, extra_trunk):
  policy = decoder.Decoder(decoder.DecoderConfig.tiny_llama(vocab_size=11), rngs=nnx.Rngs(0),
                           dtype=jnp.float32)
  bundle = rollout_lib.build_bundle(policy, with_value=True, value_trunk=value_trunk)
  assert (bundle.value.trunk is bundle.policy) is (not extra_trunk)
  _, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  assert "reference" in extra and "reference" not in params  # frozen, but checkpointed
  assert ("trunk" in params["value"]) is extra_trunk  # a shared trunk is stored once
  if extra_trunk:  # the value head replaces the untied LM head, which nothing would train
    assert "lm_head" in params["policy"] and "lm_head" not in params["value"]["trunk"]
  with pytest.raises(ValueError, match="value_trunk"):
    rollout_lib.build_bundle(policy, with_value=True, value_trunk="tied")


def test_bad_inputs_raise_named_errors():
  world = rewards.world_from_config(dict(seed=0, exploit_weight=3.0))
  proxy = rewards.tiny_world_reward(world, "proxy")
  np.testing.assert_allclose(proxy(["abc"], ["ppg"]),
                             [world.proxy_reward("abc", "ppg")], rtol=1e-6)
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    proxy(["a", "b"], ["c"])
  with pytest.raises(ValueError, match="separator"):
    proxy.fn(texts=["no separator here"])
  with pytest.raises(ValueError, match="unknown field"):
    rewards.world_from_config(dict(exploit_wieght=3.0))
  with pytest.raises(ValueError, match=r"prompt 1 \('x'\) has no tokens"):
    rollout_lib.encode_prompts(["a", "x"], [[1], []], pad_id=0, max_length=4)
  nan_reward = rewards.PairReward(
      reward_fns.ProgrammaticReward(lambda texts: [float("nan")] * len(texts),
                                    inputs="texts", name="broken"),
      lambda p, r: p + r)
  with pytest.raises(ValueError, match="'broken' is not finite for row 0"):
    nan_reward(["a"], ["b"])
  with pytest.raises(ValueError, match="kl_estimator"):
    algorithms.HParams.from_config(dict(algorithm="ppo", kl_estimator="k4"))
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['clip_epsilon'\]"):
    algorithms.HParams.from_config(dict(algorithm="ppo", kl_estimator="k1", clip_epsilon=0.1))
  for config in (tiny_ppo.get_config(), tiny_rloo.get_config()):  # Every key is known.
    assert algorithms.HParams.from_config(config.rl).algorithm == config.rl.algorithm
  # The eval's KL scores samples with the policy's own log-probs: no other sampler.
  from prefjax.rl import evaluation  # pylint: disable=import-outside-toplevel
  prompts = rollout_lib.encode_prompts(["a"], [[1]], pad_id=0, max_length=4)
  evaluation.make_evaluator(prompts, jax.random.key(0), sampling_cfg={"temperature": 1.0})
  with pytest.raises(ValueError, match=r"the RL eval's sampling: temperature=1.0, top_k=None, "
                                       r"top_p=0.9: the KL is estimated"):
    evaluation.make_evaluator(prompts, jax.random.key(0),
                              sampling_cfg={"temperature": 1.0, "top_p": 0.9})


@pytest.mark.parametrize("field, value, message", [
    ("sampling.temperature", 0.5, r"sampling.temperature=0.5, top_k=None, top_p=None: "
                                  r"train_rl samples from the policy itself"),
    ("sampling.temperature", 0.0, "sampling.temperature=0.0"),
    ("sampling.top_p", 0.9, "top_p=0.9"),
    ("rl.kl_coef", -0.1, r"rl.kl_coef=-0.1 must be >= 0"),
    ("rl.group_size", 4, r"rl.group_size=4: ppo samples exactly 1 response\(s\) per prompt"),
    ("rl.epochs", 0, r"rl.epochs=0 must be >= 1"),
    ("rl.missing_eos_penalty", -1.0, r"rl.missing_eos_penalty=-1.0 must be >= 0"),
    ("rl.missing_eos_penalty", float("nan"), r"rl.missing_eos_penalty=nan must be >= 0 and "
                                             r"finite"),
    ("rl.kl_coef", 0.0, r"rl.kl_coef=0.0 with adaptive_kl: the controller scales"),
    ("rl.lam", 2.0, r"rl.lam=2.0 must be in \[0, 1\]"),
    ("rl.gamma", -0.1, r"rl.gamma=-0.1 must be in \[0, 1\]"),
    ("rl.num_minibatches", 3, r"rl.num_minibatches=3: the 64 sequences of a step .* not "
                              r"divisible"),
    ("rl.num_minibatches", 0, r"rl.num_minibatches=0"),
    ("adaptive_kl.horizon", 10.0, r"rl.adaptive_kl.horizon=10 must exceed 0.2 x the 64 "
                                  r"sequences of a step \(12.8\)"),
    ("adaptive_kl.target", -1.0, r"rl.adaptive_kl.target=-1.0 must be > 0"),
    ("rl.clip_eps", 0.0, r"rl.clip_eps=0.0 must be > 0"),
    ("rl.vf_coef", -0.1, r"rl.vf_coef=-0.1 must be >= 0"),
    ("rl.prompts_per_step", 0, r"rl.prompts_per_step=0 must be >= 1"),
    # Each was silently dropped, or failed later naming no field.
    ("rl.entropy_coef", -0.5, r"rl.entropy_coef=-0.5 must be >= 0"),
    ("rl.vf_clip_eps", -1.0, r"rl.vf_clip_eps=-1.0 must be >= 0"),
    ("warm_start.learning_rate", -1.0, r"warm_start.learning_rate=-1.0 must be > 0"),
    ("warm_start.batch_size", 0, r"warm_start.batch_size=0 must be >= 1"),
    ("prompts.max_length", 0, r"prompts.max_length=0 must be >= 1"),
    ("prompts.num_eval", 0, r"prompts.num_eval=0 must be >= 1"),
    ("sampling.max_new_tokens", 0, r"sampling.max_new_tokens=0 must be >= 1"),
    ("proxy.reference_prompts", 0, r"proxy.reference_prompts=0 must be >= 1")])
def test_settings_that_would_bias_the_run_stop_it_before_the_warm_start(
    tmp_path, field, value, message, monkeypatch):
  """temperature 0.5 trained on tempered samples scored by the untempered policy (k1 KL 11.9
  against an exact 4.9); temperature 0 trained on rounding noise; a negative KL coefficient
  or an ignored group size went unnoticed."""
  config = tiny_ppo.get_config("quick")
  section, key = field.split(".")
  (config.rl if section == "adaptive_kl" else config)[section][key] = value
  if field == "rl.kl_coef" and value == 0.0 or section == "adaptive_kl":
    config.rl.adaptive_kl.enabled = True
  monkeypatch.setattr(train_rl.setup, "maybe_warm_start",
                      lambda *a: pytest.fail("the check must come first"))
  with pytest.raises(ValueError, match=message):
    train_rl.run(config, str(tmp_path))


def test_sigterm_saves_at_once_and_skips_that_steps_eval(scratch, monkeypatch):
  config = tiny_rloo.get_config("quick")  # 8 steps, eval every 4.
  config.warm_start.steps = 0  # the signal's handling holds for any reference policy
  workdir = scratch / "sigterm"
  next_rollout = trainer.RolloutIterator.__next__

  def sigterm_during_fourth_rollout(self):
    batch = next_rollout(self)
    if self.step == 4:  # The loop trains step 4 (an eval step), then sees the signal.
      signal.raise_signal(signal.SIGTERM)
    return batch

  monkeypatch.setattr(trainer.RolloutIterator, "__next__", sigterm_during_fourth_rollout)
  result = train_rl.run(config, str(workdir))
  assert result.preempted and int(result.state.step) == 4
  ckpt = train.Checkpointer(workdir / "checkpoints", read_only=True)
  assert ckpt.latest_step() == 4
  ckpt.close()
  assert not (workdir / "summary.json").exists()
  last = train.read_metrics(workdir)[-1]
  assert last["step"] == 4 and "loss" in last and "eval/gold" not in last
  # The rerun evaluates step 4 before stepping on: the curve keeps its point.
  monkeypatch.undo()
  summary = train_rl.run(config, str(workdir))
  assert [e["step"] for e in _evals(workdir)] == [0, 4, 8] and summary["steps"] == 8


def _one_step_config(mesh_shape):
  """PPO with one update per step (so the step's loss is at the initial parameters); the
  tiny config's batch shapes, so the one-device run reuses ppo_run's compiled sampling."""
  config = tiny_ppo.get_config("quick")
  config.loop.num_steps = 1
  config.loop.eval_every = 1
  config.warm_start.steps = 0
  config.rl.epochs = config.rl.num_minibatches = 1
  config.mesh.shape = mesh_shape
  return config


def test_mesh_2x2x2_matches_single_device(ppo_run, scratch):
  """Rollout rewards, KL, loss and gradient norm at the SAME parameters (step 1's update
  and the evals before it), sharded over 8 devices vs one: reduction orders differ,
  so relative 1e-5, not bit-identity."""
  del ppo_run  # shares its compiled programs
  records = {}
  for name, shape in (("single", ()), ("mesh", (2, 2, 2))):
    workdir = scratch / f"mesh_{name}"
    train_rl.run(_one_step_config(shape), str(workdir))
    records[name] = train.read_metrics(workdir)
  single, mesh = records["single"], records["mesh"]
  assert [r["step"] for r in mesh] == [r["step"] for r in single] == [0, 1]
  for name in ("proxy_score", "gold_score", "response_length", "kl", "loss", "policy_loss",
               "value_loss", "grad_norm"):
    assert mesh[1][name] == pytest.approx(single[1][name], rel=1e-5, abs=1e-6), name
  for name in ("eval/proxy", "eval/gold", "eval/kl/exact", "eval/entropy"):
    assert mesh[0][name] == pytest.approx(single[0][name], rel=1e-5, abs=1e-6), name
  assert single[1]["grad_norm"] > 0.01 and single[1]["value_loss"] > 0.01


def test_minibatches_that_do_not_split_over_the_mesh_stop_the_run_first(tmp_path, monkeypatch):
  """The sharding error came after the warm start and the first eval, and spoke of a batch
  size and accum_steps, which an RL config does not have."""
  config = _one_step_config((-1, 1, 1))  # 8 data-parallel devices
  config.rl.prompts_per_step = 6
  monkeypatch.setattr(train_rl.setup, "maybe_warm_start",
                      lambda *a: pytest.fail("the check must come first"))
  with pytest.raises(ValueError, match=r"the 6 sequences of a minibatch .* do not split over "
                                       r"the mesh's 8 data-parallel devices: make "
                                       r"rl.prompts_per_step x rl.group_size a multiple of 8"):
    train_rl.run(config, str(tmp_path))


def test_summary_of_evals_whose_proxy_went_nan(tmp_path):
  """metrics.jsonl holds a NaN as "nan": the summary computes with it as a number."""
  writer = train.MetricWriter(tmp_path, tensorboard=False)
  for step, proxy in ((0, 0.0), (5, float("nan"))):
    writer.log(step, None, {"gold": 0.1 * step, "gold_se": 0.01, "proxy": proxy,
                            "proxy_se": 0.01, "kl": 0.2 * step})
  writer.close()
  summary = train_rl._write_summary(str(tmp_path), {}, 5)
  assert summary["peak_gold"]["step"] == 5 and np.isnan(summary["proxy_gain"])
  written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
  assert written["proxy_gain"] == "nan"


def test_a_wco_ensemble_proxy_is_standardized_on_samples_of_the_policy_before_rl(scratch,
                                                                                 monkeypatch):
  """Coste et al.'s WCO under RL: member statistics from π_ref's samples, kept for reruns."""
  config = tiny_rloo.get_config("quick")
  config.loop.num_steps, config.loop.eval_every = 1, 100  # one eval, at the end
  config.warm_start.steps, config.prompts.num_eval, config.rl.prompts_per_step = 0, 8, 4
  config.proxy = dict(
      kind="model", name="ens", tokenizer=dict(path="byte"), checkpoint="", max_length=32,
      aggregation="wco", lam=0.0, reference_prompts=6, reference_samples_per_prompt=2,
      model=dict(arch="decoder", preset="tiny_llama", head="reward_ensemble:3",
                 dtype="float32", overrides=dict(max_position_embeddings=64)))
  workdir = str(scratch / "wco")
  fitted = []
  fit = rewards.fit_members
  monkeypatch.setattr(rewards, "fit_members", lambda reward, prompts, responses: fitted.append(
      (reward, prompts, responses)) or fit(reward, prompts, responses))
  train_rl.run(config, workdir)
  (proxy, prompts, responses), = fitted
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  train_prompts, _ = setup.make_prompts(config, tokenizer, setup.make_world(config))
  assert prompts == train_prompts(setup.REFERENCE_STREAM, 6).repeat(2).texts
  assert len(responses) == 12
  members = proxy.members(prompts, responses)
  saved = json.loads((pathlib.Path(workdir) / setup.REFERENCE_FILE).read_text())
  np.testing.assert_allclose(saved["mean"], members.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(saved["scale"], members.std(0), rtol=1e-5)
  assert (saved["num_samples"], saved["aggregation"]) == (12, "wco")
  # The RL proxy: the min over members standardized with those statistics.
  texts = (["ab", "ba"], ["cab", "b"])
  wco = rewards.standardized_reward(proxy, "wco", 0.0, reward_fns.RewardNormalizer(
      np.asarray(saved["mean"], np.float32), np.asarray(saved["scale"], np.float32)))
  z = (proxy.members(*texts) - np.asarray(saved["mean"])) / np.asarray(saved["scale"])
  np.testing.assert_allclose(wco(*texts), z.min(1), rtol=1e-5, atol=1e-6)
  # A rerun reads the statistics back instead of sampling and refitting.
  again = setup.standardized_proxy(config, workdir, proxy, "wco", 0.0, policy=None,
                                   prompts=None, tokenizer=None, key=None)
  assert len(fitted) == 1
  np.testing.assert_array_equal(again(*texts), wco(*texts))
  config.loop.num_steps = 2
  os.remove(pathlib.Path(workdir) / setup.REFERENCE_FILE)
  with pytest.raises(RuntimeError, match="proxy_reference.json is missing but .* has "
                                         "checkpoints"):
    train_rl.run(config, workdir)


def test_a_rerun_against_a_reward_model_trained_on_since_is_refused(scratch):
  """A resumed run loaded the proxy RM's latest step: trained on meanwhile, its rewards
  changed mid-run with no warning (a helper's audit: eval/proxy -0.338 against -0.713)."""
  model_cfg = dict(arch="decoder", preset="tiny_llama", head="reward", dtype="float32",
                   overrides=dict(max_position_embeddings=64))
  rm_dir = str(scratch / "changing_rm")

  def train_rm_to(steps):
    tokens = np.random.default_rng(0).integers(3, 259, size=(4, 8)).astype(np.int32)
    train.train_loop(
        workdir=rm_dir, config={}, model=experiment.make_model(model_cfg, vocab_size=259, seed=0),
        loss_fn=lambda model, batch, rng: (jnp.mean((model(batch["tokens"]) - 3.0) ** 2), {}),
        optimizer={"name": "sgd", "learning_rate": 0.05},
        loop=train.LoopConfig(num_steps=steps, checkpoint_every=1, keep_checkpoints=5,
                              tensorboard=False),
        train_iter=iter([{"tokens": tokens}] * steps))
  train_rm_to(2)
  config = tiny_rloo.get_config("quick")
  config.loop.num_steps, config.loop.eval_every = 1, 1
  config.warm_start.steps, config.prompts.num_eval, config.rl.prompts_per_step = 0, 8, 4
  config.proxy = dict(kind="model", name="rm", tokenizer=dict(path="byte"), checkpoint=rm_dir,
                      max_length=32, model=model_cfg)
  workdir = str(scratch / "rl_changing_rm")
  train_rl.run(config, workdir)
  recorded = json.loads((pathlib.Path(workdir) / setup.REWARDS_FILE).read_text())
  assert recorded == {"proxy": train.checkpoint_identity(rm_dir)} and recorded["proxy"]["step"] == 2
  train_rm_to(3)
  config.loop.num_steps = 2
  with pytest.raises(ValueError, match=r"trained against proxy step 2 \(files [0-9a-f]{12}\), "
                                       r"but the config now loads proxy step 3 .*WORKDIR@STEP"):
    train_rl.run(config, workdir)
  config.proxy.checkpoint = f"{rm_dir}@2"  # the run's own step: it goes on
  assert train_rl.run(config, workdir)["steps"] == 2
