"""The text world's gold and its policy evaluation (common random numbers, exact KL)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import types

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from prefjax import experiment
from prefjax.data import tiny_world
from prefjax.models import decoder
from prefjax.overopt import text_world
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib


def test_repeat_penalty_against_hand_computation():
  world = tiny_world.TinyWorld(seed=0, repeat_threshold=0.25, repeat_penalty=20.0, echo_bonus=0.0)
  plain = tiny_world.TinyWorld(seed=0, echo_bonus=0.0)
  scores = world.char_scores
  # "aaab": f_a = 0.75, f_b = 0.25 -> penalty 20 * 0.5² = 5; b sits exactly at the threshold.
  expected = (3 * scores["a"] + scores["b"]) / 4 - 20.0 * 0.5**2
  assert world.gold_reward("x", "aaab") == pytest.approx(expected, abs=1e-12)
  # No character past a quarter: no penalty, the plain world's value.
  assert world.gold_reward("x", "abcd") == pytest.approx(plain.gold_reward("x", "abcd"), abs=1e-12)


def test_teacher_gold_against_hand_computation():
  world = tiny_world.TinyWorld(seed=3, gold="teacher", teacher_hidden=8, echo_bonus=0.5)
  (w1, b1), (w2, b2), (w3, b3) = world.teacher_layers
  assert w1.shape == (16 + 256, 8) and w2.shape == (8, 8) and w3.shape == (8, 1)
  # "aab" + one byte outside the alphabet: f_a = 2/4, f_b = 1/4; of the 3 adjacent
  # pairs, "aa" and "ab" count 1/3 each and "b~" nothing.
  f, g = np.zeros(16), np.zeros(256)
  f[0], f[1] = 0.5, 0.25
  g[0 * 16 + 0] = g[0 * 16 + 1] = 1 / 3
  x = np.concatenate([8.0 * (f - 1 / 16), 8.0 * (g - 1 / 256)])
  hidden = np.tanh(np.tanh(x @ w1 + b1) @ w2 + b2)
  expected = float(hidden @ w3[:, 0] + b3[0])
  assert world.gold_reward("x", "aab~") == pytest.approx(expected, abs=1e-12)
  assert world.gold_reward("a", "aab~") == pytest.approx(expected + 0.5, abs=1e-12)
  # Order matters: "aba~" has the same characters, other pairs.
  assert world.gold_reward("x", "aba~") != pytest.approx(expected)
  # The teacher is the world's: another seed draws another network, the same seed the same.
  assert tiny_world.TinyWorld(seed=4, gold="teacher", teacher_hidden=8).gold_reward(
      "x", "aab~") != pytest.approx(expected)
  assert tiny_world.TinyWorld(seed=3, gold="teacher", teacher_hidden=8).gold_reward(
      "x", "aab~") == expected
  with pytest.raises(ValueError, match="gold must be one of"):
    tiny_world.TinyWorld(gold="mlp")


def test_gold_scale_and_standardized_trajectory():
  raw = np.array([1.0, 2.0, 3.0, 6.0])
  scale = text_world.GoldScale.fit(raw)
  np.testing.assert_allclose(scale(raw), (raw - 3.0) / np.sqrt(3.5), rtol=1e-12)
  with pytest.raises(ValueError, match="standard deviation"):
    text_world.GoldScale.fit(np.ones(3))
  traj = text_world.Trajectory(np.array([0, 5]), {"gold": np.array([[1.0, 2.0], [4.0, 2.0]]),
                                                  "kl": np.array([[0.0, 0.0], [1.0, 2.0]])})
  out = text_world.standardized(traj, {"gold": scale, "absent": scale})
  # Each prompt's reference score is subtracted: step 0 is exactly 0, step 5 the paired change.
  np.testing.assert_allclose(out.per_prompt["gold"], [[0, 0], [3 / np.sqrt(3.5), 0]], atol=1e-12)
  np.testing.assert_array_equal(out.per_prompt["kl"], traj.per_prompt["kl"])
  with pytest.raises(ValueError, match="different steps"):
    text_world.sweep_arrays([traj, traj._replace(steps=np.array([0, 6]))], "gold")


def _policy(seed: int) -> nnx.Module:
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=259)
  return decoder.Decoder(cfg, rngs=nnx.Rngs(seed))


def test_evaluate_policy_common_random_numbers_and_exact_kl():
  tokenizer = experiment.make_tokenizer({"path": "byte"})
  world = tiny_world.TinyWorld(seed=0)
  gold = rl_rewards.tiny_world_reward(world, "gold")
  texts = ["abc", "hello", "p"]
  prompts = rollout_lib.encode_prompts(texts, [tokenizer.encode(t) for t in texts],
                                       pad_id=tokenizer.pad_id, max_length=8)
  policy, other = _policy(0), _policy(1)
  kwargs = dict(tokenizer=tokenizer, rewards={"gold": gold}, max_new_tokens=6,
                samples_per_prompt=2)
  key = jax.random.key(3)
  same = text_world.evaluate_policy(policy, policy, prompts, key, **kwargs)
  assert same["kl"].shape == (3,) and np.abs(same["kl"]).max() < 1e-5   # π = π_ref
  again = text_world.evaluate_policy(policy, other, prompts, key, **kwargs)
  np.testing.assert_array_equal(again["gold"], same["gold"])    # same key, same samples
  assert (again["kl"] > 0.01).all()
  # The gold reported is the world's gold of the sampled responses, averaged per prompt.
  rollout = rollout_lib.sample(policy, prompts.repeat(2), key, tokenizer=tokenizer,
                               max_new_tokens=6)
  by_hand = np.array([world.gold_reward(p, r) for p, r in zip(rollout.prompts,
                                                             rollout.responses)])
  np.testing.assert_allclose(same["gold"], by_hand.reshape(3, 2).mean(1), rtol=1e-6)  # float32 path


def _exact_kl_float64(policy, reference, rollout) -> np.ndarray:
  """Σ over response tokens t of KL(π ‖ π_ref) at the position that predicts t, in float64."""
  def log_probs(model):
    logits = np.asarray(model(rollout.tokens, attention_mask=rollout.attention_mask), np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
  logp, logq = log_probs(policy), log_probs(reference)
  per_position = (np.exp(logp) * (logp - logq)).sum(-1)   # [B, T]: the next token's KL
  return (per_position[:, :-1] * rollout.loss_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("logits_bytes", [1, 2 * 4 * 14 * 259, 1 << 30])
def test_exact_sequence_kl_in_row_chunks_equals_a_float64_reference(logits_bytes):
  # 1 byte: one row a chunk; 2 rows' logits: chunks of 2 over 5 rows, the last one padded.
  tokenizer = experiment.make_tokenizer({"path": "byte"})
  texts = ["abc", "hello", "p", "zz", "query"]
  prompts = rollout_lib.encode_prompts(texts, [tokenizer.encode(t) for t in texts],
                                       pad_id=tokenizer.pad_id, max_length=8)
  policy, reference = _policy(0), _policy(1)
  rollout = rollout_lib.sample(policy, prompts, jax.random.key(4), tokenizer=tokenizer,
                               max_new_tokens=6)
  assert rollout.tokens.shape == (5, 14)
  kl = text_world.exact_sequence_kl(policy, reference, rollout, logits_bytes=logits_bytes)
  expected = _exact_kl_float64(policy, reference, rollout)
  assert kl.shape == (5,) and (expected > 0.01).all()
  np.testing.assert_allclose(kl, expected, rtol=1e-4)


def _seed_run(seed: int, prompts: int) -> dict:
  rng = np.random.default_rng(seed)
  traj = lambda: text_world.Trajectory(np.array([0, 5]), {
      k: rng.normal(size=(2, prompts)) for k in ("gold", "proxy_w8", "kl")})
  return {"scales": {"gold": text_world.GoldScale(1.0 + seed, 2.0),
                     "proxy_w8": text_world.GoldScale(-seed, 0.5)},
          "bon": {8: {k: rng.normal(size=(prompts, 4)) for k in ("gold", "proxy", "lengths")}},
          "rl": {8: traj()}, "dpo": {("dpo", 0.1): traj()},
          "proxy_stats": [{"width": 8, "accuracy": 0.6 + 0.1 * seed, "wall_s": 10.0}],
          "pairs": {"dataset": f"d{seed}", "num_pairs": 100 + seed,
                    "skipped": {"empty": seed, "identical": 1}},
          "widths": [8], "world": {"seed": seed}}


def test_pool_seeds_concatenates_standardised_prompts():
  runs = [_seed_run(0, 3), _seed_run(1, 5)]
  pooled = text_world.pool_seeds(runs)
  gold = np.concatenate([(r["bon"][8]["gold"] - r["scales"]["gold"].mean)
                         / r["scales"]["gold"].sd for r in runs])
  proxy = np.concatenate([(r["bon"][8]["proxy"] - r["scales"]["proxy_w8"].mean)
                          / r["scales"]["proxy_w8"].sd for r in runs])
  np.testing.assert_allclose(pooled["bon"][8]["gold"], gold)
  np.testing.assert_allclose(pooled["bon"][8]["proxy"], proxy)
  assert pooled["scales"]["gold"](np.array([2.5])) == 2.5  # already in SD units
  for key, name in (("rl", 8), ("dpo", ("dpo", 0.1))):
    traj = pooled[key][name]
    assert traj.per_prompt["kl"].shape == (2, 8)
    np.testing.assert_array_equal(traj.per_prompt["gold"][:, 3:],
                                  runs[1][key][name].per_prompt["gold"])
  assert pooled["proxy_stats"] == [{"width": 8, "accuracy": pytest.approx(0.65),
                                    "wall_s": 10.0}]
  assert pooled["pairs"]["num_pairs"] == 201
  assert pooled["pairs"]["num_pairs_per_world"] == [100, 101]
  assert pooled["pairs"]["skipped"] == {"empty": 1, "identical": 2}
  assert pooled["seeds"] == [0, 1] and text_world.pool_seeds(runs[:1]) == runs[0]
  from prefjax.overopt import text_report  # pylint: disable=import-outside-toplevel
  # Each proxy trained on its own world's pairs: the report said 201.
  assert text_report.pairs_text(pooled["pairs"]).startswith(
      "100–101 gold-labelled pairs of π_ref samples in each of 2 pooled worlds")
  assert text_report.pairs_text(runs[0]["pairs"]).startswith("100 gold-labelled pairs")


def test_each_text_world_seed_draws_its_own_prompts_and_samples(tmp_path):
  """Pooled worlds are concatenated as independent draws; every world used to sample the
  same held-out, pair, best-of-n and RL prompts with the same keys (a review's finding)."""
  from configs.reproduce import quick  # pylint: disable=import-outside-toplevel
  from experiments import text_study  # pylint: disable=import-outside-toplevel

  def world(seed):
    cfg = quick.text_config(enabled=True, tiny=True)
    cfg.world.seed = seed
    return text_study.TextWorld(cfg, str(tmp_path))

  w0, w1, again = world(0), world(1), world(0)
  assert w0.eval_prompts().texts == again.eval_prompts().texts
  assert w0.eval_prompts().texts != w1.eval_prompts().texts
  assert w0.stream_seed(1) != w1.stream_seed(1) and w0.stream_seed(1) != w0.stream_seed(2)
  assert w0.bon_config(8).seed != w1.bon_config(8).seed
  assert w0.rl_config(8).seed != w1.rl_config(8).seed
  assert w0.pairs_key()["stream_seed"] != w1.pairs_key()["stream_seed"]
  # Proxies and DPO runs start from their own initialisation, data order and RNG too.
  for make in (lambda w: w.rm_config(8, "synthetic:d"),
               lambda w: w.dpo_config("dpo", 0.1, "synthetic:d")):
    a, b = make(w0), make(w1)
    assert a.seed == a.loop.seed == a.data.pipeline.seed != b.seed, (a.seed, b.seed)
  unseeded = world(0)
  del unseeded.cfg.world["seed"]
  assert unseeded.stream_seed(7) == 7 and "stream_seed" not in unseeded.pairs_key()


def test_finished_stage_is_reused_for_its_config_and_refused_for_another(tmp_path):
  workdir = str(tmp_path / "study")
  config = ml_collections.ConfigDict(dict(
      steps=4, ref=dict(cache_dir=os.path.join(workdir, "dpo", "ref_cache")), betas=(0.1, 1.0)))
  key = text_world.config_key(config, workdir)
  assert key["ref"]["cache_dir"] == "$WORKDIR/dpo/ref_cache" and key["betas"] == [0.1, 1.0]
  moved = ml_collections.ConfigDict(config.to_dict())
  moved.ref.cache_dir = os.path.join(str(tmp_path / "moved"), "dpo", "ref_cache")
  assert text_world.config_key(moved, str(tmp_path / "moved")) == key

  stage, calls = os.path.join(workdir, "dpo", "run"), []
  first = text_world.run_stage(stage, lambda: calls.append(1) or {"accuracy": 0.5}, key=key)
  again = text_world.run_stage(stage, lambda: calls.append(1), key=key)
  assert calls == [1] and again == first and first["accuracy"] == 0.5
  # What a stage returns is its result alone (pooled across worlds as numbers); the key
  # stays in done.json.
  assert sorted(first) == ["accuracy", "wall_s"] and text_world.recorded_key(stage) == key

  config.steps = 8
  with pytest.raises(text_world.StaleStageError, match=r"steps: 4 -> 8"):
    text_world.run_stage(stage, lambda: calls.append(1), key=text_world.config_key(config, workdir))
  assert calls == [1]


def test_a_best_of_n_stage_is_reused_whatever_its_curve_only_settings(tmp_path):
  """The HH world recorded num_points and num_bootstrap in its best-of-n stages' keys: a
  new curve resolution refused the finished stage and its samples (GPU hours)."""
  stage, calls = str(tmp_path / "bon" / "w16"), []
  recorded = {"bon": {"num_samples": 8, "num_points": 4, "num_bootstrap": 200}}
  text_world.run_stage(stage, lambda: calls.append(1) or {}, key=recorded)
  text_world.run_stage(stage, lambda: calls.append(1), key={"bon": {"num_samples": 8}})
  text_world.run_stage(stage, lambda: calls.append(1), key={**recorded, "bon": {
      "num_samples": 8, "num_points": 12, "num_bootstrap": 1000}})
  assert calls == [1]
  with pytest.raises(text_world.StaleStageError, match=r"num_samples: 8 -> 16"):
    text_world.run_stage(stage, lambda: calls.append(1), key={"bon": {"num_samples": 16}})


def test_a_stage_that_measured_nan_is_reused_with_nan_back(tmp_path):
  """done.json is standard JSON ("nan"); a rerun gets NaN back as a number, and a key
  holding NaN still matches itself."""
  stage, key, calls = str(tmp_path / "proxy"), {"beta": float("nan")}, []
  text_world.run_stage(stage, lambda: calls.append(1) or {"accuracy": float("nan")}, key=key)
  done = json.loads((tmp_path / "proxy" / "done.json").read_text(), parse_constant=pytest.fail)
  assert done["accuracy"] == "nan" and done["key"] == {"beta": "nan"}
  again = text_world.run_stage(stage, lambda: calls.append(1), key=key)
  assert calls == [1] and np.isnan(again["accuracy"])
  assert f"{again['accuracy']:.3f}" == "nan"  # as text_study logs it


@pytest.fixture
def evaluated(monkeypatch):
  """Checkpoint evaluations replaced by a record of what evaluated them: each returns a
  trajectory whose gold is the ``evaluate`` argument itself."""
  calls = []

  def fake_trajectory(run_dir, policy_at, reference, evaluate):
    calls.append(evaluate)
    return text_world.Trajectory(np.array([0, 5]), {"gold": np.full((2, 3), evaluate)})

  monkeypatch.setattr(text_world, "checkpoint_trajectory", fake_trajectory)
  monkeypatch.setattr(text_world, "policy_loader", lambda *a, **k: None)
  return calls


def test_checkpoint_evaluations_are_cached_under_their_key(tmp_path, evaluated):
  run_dir = str(tmp_path)
  key = {"eval": {"num_prompts": 3}, "proxies": {"proxy_w8": text_world.digest({"steps": 4})}}

  def cached(value, key):
    return text_world.cached_trajectory(run_dir, None, None, value, key=key)

  first = cached(1.0, key)
  np.testing.assert_array_equal(cached(2.0, dict(key)).per_prompt["gold"], first.per_prompt["gold"])
  assert evaluated == [1.0]
  retrained = {**key, "proxies": {"proxy_w8": text_world.digest({"steps": 8})}}
  assert cached(3.0, retrained).per_prompt["gold"][0, 0] == 3.0 and evaluated == [1.0, 3.0]
  np.testing.assert_array_equal(cached(4.0, retrained).steps, [0, 5])
  assert evaluated == [1.0, 3.0]


def test_a_stage_whose_binary_was_preempted_is_not_finished(tmp_path):
  """A SIGTERM or Ctrl-C during a stage's binary wrote done.json for the truncated run, so
  every rerun skipped it; the study then went on and exited 0."""
  from experiments import preemption  # pylint: disable=import-outside-toplevel
  stage = str(tmp_path / "rl" / "w8")
  config = ml_collections.ConfigDict({"steps": 4})
  for out in ({"preempted": True}, types.SimpleNamespace(preempted=True)):
    with pytest.raises(text_world.StagePreempted) as stopped:
      text_world.binary_stage(stage, lambda cfg, path, out=out: out, lambda: config,
                              workdir=str(tmp_path))
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE
    assert text_world.stage_run(stage) is None
  calls = []
  text_world.binary_stage(stage, lambda cfg, path: calls.append(1) or {}, lambda: config,
                          workdir=str(tmp_path))
  assert calls == [1] and text_world.stage_run(stage)


def test_an_unfinished_stage_is_refused_under_another_config(tmp_path):
  """A stage killed mid-run and rerun under a changed config resumed its checkpoints
  (kl_coef 0.02 on every step) while done.json and the report recorded the new one."""
  stage = str(tmp_path / "rl" / "w8")
  with pytest.raises(KeyboardInterrupt):  # killed after the binary started
    text_world.run_stage(stage, lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
                         key={"kl_coef": 0.02})
  with pytest.raises(text_world.StaleStageError,
                     match=r"holds an unfinished stage started with a different config "
                           r"\(config.kl_coef: 0.02 -> 0.5\)"):
    text_world.run_stage(stage, lambda: pytest.fail("resumed"), key={"kl_coef": 0.5})
  assert text_world.run_stage(stage, lambda: {"accuracy": 1.0},
                              key={"kl_coef": 0.02})["accuracy"] == 1.0


def test_a_run_trained_again_is_evaluated_again(tmp_path, evaluated):
  """The evaluation cache was keyed by the evaluation alone: a stage trained further after
  its done.json was removed kept the trajectory of its first, shorter run."""
  stage = str(tmp_path / "rl")
  text_world.run_stage(stage, lambda: None, key={"steps": 4})
  cached = lambda value: text_world.cached_trajectory(stage, None, None, value, key={"n": 3})
  cached(1.0)
  cached(2.0)
  os.remove(os.path.join(stage, text_world.DONE_FILE))
  text_world.run_stage(stage, lambda: None, key={"steps": 4})
  assert cached(3.0).per_prompt["gold"][0, 0] == 3.0 and evaluated == [1.0, 3.0]


def test_recorded_key_reads_a_finished_stage(tmp_path):
  stage = str(tmp_path / "proxies" / "w8")
  assert text_world.recorded_key(stage) is None
  text_world.run_stage(stage, lambda: {"accuracy": 0.7}, key={"loop": {"num_steps": 4}})
  assert text_world.recorded_key(stage) == {"loop": {"num_steps": 4}}


def test_bon_curve_measures_each_prompt_against_its_own_reference_mean():
  from prefjax.overopt import text_report  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  proxy = rng.normal(size=(12, 32))
  gold = proxy + rng.normal(size=(12, 32))
  scales = {"proxy_w8": text_world.GoldScale(0.0, 1.0), "gold": text_world.GoldScale(0.0, 1.0)}
  curve = text_report.bon_curve({"proxy": proxy, "gold": gold}, scales, "proxy_w8", 5, 200)
  offsets = rng.normal(scale=3.0, size=(12, 1))  # prompts whose π_ref levels differ
  moved = text_report.bon_curve({"proxy": proxy + offsets, "gold": gold - offsets}, scales,
                                "proxy_w8", 5, 200)
  for field in ("proxy", "gold", "proxy_se", "gold_se"):
    np.testing.assert_allclose(getattr(moved, field), getattr(curve, field), atol=1e-12)
  np.testing.assert_allclose([curve.gold[0], curve.gold_se[0]], 0.0, atol=1e-12)  # n = 1


def test_a_stage_run_again_upstream_makes_the_stages_reading_it_stale(tmp_path):
  proxy, bon = str(tmp_path / "proxies" / "w8"), str(tmp_path / "bon" / "w8")
  key = {"loop": {"num_steps": 4}}
  text_world.run_stage(proxy, lambda: {"accuracy": 0.7}, key=key)
  first_run = text_world.stage_run(proxy)
  assert first_run and "run" not in text_world.run_stage(proxy, lambda: None, key=key)
  calls = []
  text_world.run_stage(bon, lambda: calls.append(1), key={"n": 4}, upstream={"proxy": proxy})
  text_world.run_stage(bon, lambda: calls.append(1), key={"n": 4}, upstream={"proxy": proxy})
  assert calls == [1]
  # The proxy trained again with the same config (its folder deleted): a new run id.
  shutil.rmtree(proxy)
  text_world.run_stage(proxy, lambda: {"accuracy": 0.6}, key=key)
  assert text_world.stage_run(proxy) not in (None, first_run)
  with pytest.raises(text_world.StaleStageError, match=r"upstream\.proxy"):
    text_world.run_stage(bon, lambda: calls.append(1), key={"n": 4}, upstream={"proxy": proxy})
  assert calls == [1]


def test_a_stage_finished_before_upstream_runs_were_recorded_is_reused(tmp_path, caplog):
  proxy, bon = str(tmp_path / "proxy"), str(tmp_path / "bon")
  text_world.run_stage(proxy, lambda: None, key={"steps": 4})
  os.makedirs(bon)
  with open(os.path.join(bon, text_world.DONE_FILE), "w") as f:
    json.dump({"wall_s": 1.0, "key": {"n": 4}}, f)  # as written before upstream keys
  caplog.set_level(logging.WARNING)
  assert text_world.run_stage(bon, lambda: 1 / 0, key={"n": 4},
                              upstream={"proxy": proxy}) == {"wall_s": 1.0}
  assert "without checking those" in caplog.text
  with pytest.raises(text_world.StaleStageError, match=r"n: 4 -> 5"):
    text_world.run_stage(bon, lambda: 1 / 0, key={"n": 5}, upstream={"proxy": proxy})


def test_evaluation_key_follows_the_runs_of_the_proxies_and_the_reference(tmp_path):
  proxy, reference = str(tmp_path / "proxies" / "w8"), str(tmp_path / "sft")
  for path in (proxy, reference):
    text_world.run_stage(path, lambda: None, key={"steps": 4})
  eval_cfg = ml_collections.ConfigDict({"num_prompts": 3})
  key = lambda: text_world.evaluation_key(eval_cfg, 16, proxies={"proxy_w8": proxy},
                                          reference=reference)
  first = key()
  assert first == {"eval": {"num_prompts": 3}, "rewards": ["gold", "proxy_w8"],
                   "max_new_tokens": 16, "reference": text_world.stage_run(reference),
                   "proxies": {"proxy_w8": text_world.stage_run(proxy)}}
  for path in (proxy, reference):  # retrained with the same config: another key
    before = key()
    shutil.rmtree(path)
    text_world.run_stage(path, lambda: None, key={"steps": 4})
    assert key() != before
  # A stage finished before run ids were recorded: its config key's digest.
  with open(os.path.join(proxy, text_world.DONE_FILE), "w") as f:
    json.dump({"wall_s": 1.0, "key": {"steps": 4}}, f)
  assert text_world.stage_identity(proxy) == text_world.digest({"steps": 4})


def test_reference_scales_standardise_gold_and_each_proxy_under_the_reference():
  rng = np.random.default_rng(3)
  samples = {w: {"gold": rng.normal(2.0, 3.0, (4, 8)), "proxy": rng.normal(w, 0.5, (4, 8))}
             for w in (4, 8)}
  scales = text_world.reference_scales(samples)
  assert sorted(scales) == ["gold", "proxy_w4", "proxy_w8"]
  assert scales["gold"] == (samples[4]["gold"].mean(), samples[4]["gold"].std())
  for w in (4, 8):
    standard = scales[f"proxy_w{w}"](samples[w]["proxy"])
    np.testing.assert_allclose([standard.mean(), standard.std()], [0.0, 1.0], atol=1e-12)


def _study_run(seed: int, prompts: int = 24, steps: int = 5) -> dict:
  """A text study's results in SD units: best-of-n samples, RL and DPO trajectories."""
  rng = np.random.default_rng(seed)

  def traj():
    kl = np.cumsum(rng.uniform(0.1, 1.0, size=(steps, prompts)), axis=0)
    kl[0] = 0.0
    d = np.sqrt(kl)
    return text_world.Trajectory(np.arange(steps) * 5, {
        "kl": kl, "gold": d * (1 - 0.5 * d) + 0.1 * rng.normal(size=kl.shape),
        "proxy_w8": d + 0.1 * rng.normal(size=kl.shape), "proxy_w16": d})
  widths = [8, 16, 32]
  return {"scales": {k: text_world.GoldScale(0.0, 1.0)
                     for k in ["gold"] + [f"proxy_w{w}" for w in widths]},
          "bon": {w: {"gold": rng.normal(size=(prompts, 32)),
                      "proxy": rng.normal(size=(prompts, 32)),
                      "lengths": rng.integers(1, 9, size=(prompts, 32))} for w in widths},
          "rl": {8: traj(), 16: traj()},
          "dpo": {(loss, beta): traj() for loss in ("dpo", "ipo") for beta in (0.05, 0.1, 0.5)},
          "proxy_stats": [{"width": w, "accuracy": 0.7, "wall_s": 1.0} for w in widths],
          "pairs": {"dataset": "d", "num_pairs": 100, "skipped": {}},
          "widths": widths, "world": {"seed": seed}}


def test_text_world_seeds_get_their_own_criteria_beside_the_pooled_ones(tmp_path, monkeypatch):
  """Several text-world seeds: reproduce evaluates each seed's criteria (no figures) as the
  pooled ones, and the report sets them side by side."""
  import ml_collections
  from experiments import reproduce
  from experiments import text_study
  from prefjax.overopt import report as report_lib
  from prefjax.overopt import text_report
  runs = {3: _study_run(3), 5: _study_run(5)}
  monkeypatch.setattr(text_study, "run_text_study",
                      lambda cfg, root, progress, world_cls: runs[cfg.world.seed])
  monkeypatch.setattr(text_report, "report_section", lambda *args, **kwargs: [])
  config = ml_collections.ConfigDict({"text": {
      "kind": "text", "world_seeds": (3, 5), "world": {"seed": 0}, "num_bootstrap": 50,
      "bon": {"num_points": 6}, "rl": {"algorithm": "ppo"}}})
  found, figs, _, by_seed = reproduce._with_text_world(config, str(tmp_path), [],
                                                       str(tmp_path / "figures"))
  assert set(by_seed) == {3, 5} and figs
  cfg = config.text
  for seed, criteria in by_seed.items():
    alone, _, _ = text_report.text_criteria(runs[seed], cfg, None, num_bootstrap=50)
    assert [(c.name, c.passed, c.detail) for c in criteria] == [
        (c.name, c.passed, c.detail) for c in alone]
    assert all(c.world == "text" and not c.figure for c in criteria)
  assert [c.name for c in found] == [c.name for c in by_seed[3]]
  report = report_lib.write_report(str(tmp_path), found, None, figs, {},
                                   by_world={"text": by_seed})
  assert set(report["criteria_by_world"]["text"]) == {"3", "5"}
  markdown = (tmp_path / "report.md").read_text()
  section = markdown.split("## The text criteria world by world")[1]
  assert "| criterion | pooled | world 3 | world 5 |" in section
  assert "| G1 | " in section and "| D1 | " in section


def test_a_checkpoint_saved_by_a_signal_off_the_grid_is_not_evaluated(tmp_path):
  """SIGTERM at step 3 of a run checkpointing every 2 saved step 3 too; once the rerun
  finished, the study evaluated it: an extra point on an RL curve, and a DPO sweep whose
  runs then differed in their steps failed on every rerun (a helper's review)."""
  from prefjax import train  # pylint: disable=import-outside-toplevel
  from tests import test_train_core as core  # pylint: disable=import-outside-toplevel
  loop = dict(num_steps=6, log_every=1, eval_every=0, checkpoint_every=2,
              keep_checkpoints=100, tensorboard=False)

  def run(hooks=()):
    return train.train_loop(
        workdir=str(tmp_path), model=core.MLP(nnx.Rngs(0)), loss_fn=core.mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
        train_iter=iter(core.make_batches(6, 16)), hooks=hooks, config={"loop": loop})

  assert run([core._sigterm_at(3)]).preempted  # pylint: disable=protected-access
  assert not run().preempted
  on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert on_disk == [2, 3, 4, 6]
  assert text_world.checkpoint_steps(str(tmp_path)) == [2, 4, 6]
  # A cache evaluated before the filter keeps its extra row on disk, not in what it returns.
  gold = np.arange(10.0).reshape(5, 2)
  np.savez(tmp_path / text_world.TRAJECTORY_FILE, steps=np.array([0, 2, 3, 4, 6]), pp_gold=gold)
  cached = text_world.cached_trajectory(str(tmp_path), None, None, None, key={})
  np.testing.assert_array_equal(cached.steps, [0, 2, 4, 6])
  np.testing.assert_array_equal(cached.per_prompt["gold"], gold[[0, 1, 3, 4]])


def test_dpo_stages_cache_the_reference_of_the_losses_that_read_one(tmp_path):
  """Every DPO stage was set to ref.mode="cached": once a reference-free loss was refused
  that mode, a study with SimPO failed at its stage, after its other stages had run."""
  from configs.dpo import tiny as dpo_tiny  # pylint: disable=import-outside-toplevel
  from prefjax.direct import loss as loss_lib  # pylint: disable=import-outside-toplevel
  for name, mode in (("dpo", "cached"), ("simpo", "none"), ("orpo", "none")):
    config = dpo_tiny.get_config()
    config.loss.name = name
    text_world.cached_reference(config, str(tmp_path))
    assert (config.ref.mode, loss_lib.DirectLoss.from_config(config).ref_mode) == (mode, mode)
