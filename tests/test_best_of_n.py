"""best_of_n binary: unbiased curves on the tiny world, normalisation, outputs, reuse."""

import json
import logging
import pathlib
import tempfile

import numpy as np
import pytest

from configs.bon import tiny
from experiments import best_of_n
from prefjax import files
from prefjax import overopt
from prefjax.overopt import bon_report


@pytest.fixture(scope="module")
def bon_run():
  # A private temp dir: concurrent pytest sessions prune each other's tmp_path bases.
  with tempfile.TemporaryDirectory(prefix="prefjax_bon_") as d:
    workdir = pathlib.Path(d)
    config = tiny.get_config("quick")
    config.warm_start.steps = 0  # what these tests check holds for any reference policy
    yield workdir, config, best_of_n.run(config, str(workdir))


def test_proxy_curve_non_decreasing_and_reference_at_zero(bon_run):
  _, config, result = bon_run
  proxy, proxy_se = np.array(result["proxy"]), np.array(result["proxy_se"])
  gold, gold_se = np.array(result["gold"]), np.array(result["gold_se"])
  assert result["n"][0] == 1 and result["n"][-1] == config.bon.num_samples
  assert np.all(np.diff(proxy) >= -1e-12), proxy
  # n = 1 is the reference policy itself: every prompt relative to its own π_ref mean
  # scores 0 there, so the prompt bootstrap has nothing to vary either.
  np.testing.assert_allclose([proxy[0], gold[0], proxy_se[0], gold_se[0]], 0.0, atol=1e-9)
  assert np.all(proxy_se[1:] > 0) and np.all(gold_se[1:] > 0)
  assert proxy[-1] > 5 * proxy_se[-1]  # best-of-64 clearly beats the reference
  np.testing.assert_allclose(result["kl"], overopt.bon_kl(np.array(result["n"])))
  np.testing.assert_allclose(np.square(result["sqrt_kl"]), result["kl"])


def test_outputs_written(bon_run):
  workdir, _, result = bon_run
  curves = json.loads((workdir / "report.json").read_text())
  assert curves["n"] == result["n"] and curves["gold"] == pytest.approx(result["gold"])
  report = (workdir / "report.md").read_text()
  assert "| n | KL |" in report and report.count("\n| ") >= len(result["n"]) + 1
  assert (workdir / "figures" / "bon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (workdir / "config.json").exists() and (workdir / "samples.npz").exists()
  assert curves["prompts_with_one_proxy_score"] == 0  # temperature 1: samples differ


def test_prompts_whose_samples_all_score_alike_are_counted_and_warned_of(caplog):
  """A near-greedy sampler (temperature 1e-6) drew one response per prompt, and the report
  drew flat curves against a KL of up to 1.2 nats with no word of it."""
  varied = np.arange(12.0).reshape(3, 4)
  assert best_of_n._prompts_with_one_score(varied) == 0
  alike = np.repeat(varied[:, :1], 4, axis=1)
  alike[0, 2] += 1.0
  assert best_of_n._prompts_with_one_score(alike) == 2
  assert "2 of 3 prompts got one proxy score for all 4 samples" in caplog.text
  members = np.stack([alike, alike + varied], axis=-1)  # [P, N, K]: member 2 varies
  assert best_of_n._prompts_with_one_score(members) == 0


def test_rerun_reuses_samples(bon_run):
  workdir, config, result = bon_run
  assert best_of_n.run(config, str(workdir)) == result
  # A data_report.json another binary left in the workdir (a train_rm run there) is not
  # this run's: its tiny-world prompts read no dataset.
  (workdir / "data_report.json").write_text(json.dumps({"train": {"rows_read": 600}}))
  try:
    assert "data" not in best_of_n.run(config, str(workdir))
  finally:
    (workdir / "data_report.json").unlink()


def test_samples_are_redrawn_when_a_setting_that_shapes_them_changes(bon_run, monkeypatch):
  workdir, config, result = bon_run
  with np.load(workdir / "samples.npz") as f:
    saved = {k: f[k] for k in f.files if k != "config_sha256"}
  draws = []
  monkeypatch.setattr(best_of_n, "sample_and_score",
                      lambda cfg, wd, fp: draws.append(cfg.sampling.temperature) or dict(saved))
  fewer_resamples = config.copy_and_resolve_references()
  fewer_resamples.bon.num_bootstrap = 200  # only the curves' error bars change
  assert best_of_n.run(fewer_resamples, str(workdir))["n"] == result["n"]
  assert draws == []
  cooler = config.copy_and_resolve_references()
  cooler.sampling.temperature = 0.5
  report = best_of_n.run(cooler, str(workdir))
  assert draws == [0.5]
  assert report["sampling"]["temperature"] == 0.5
  assert report["kl_note"].endswith("against the sampler (temperature/top-k/top-p), not the "
                                    "policy")
  assert "temperature 0.5" in (workdir / "report.md").read_text()
  assert json.loads((workdir / "config.json").read_text())["sampling"]["temperature"] == 0.5
  best_of_n.run(cooler, str(workdir))  # now the samples on disk are the cooler ones
  assert draws == [0.5]


def test_a_run_stopped_between_batches_of_prompts_resumes_with_the_same_samples(
    bon_run, tmp_path, monkeypatch):
  """A killed run sampled every prompt again; a long one (hours for SmolLM2) lost it all."""
  monkeypatch.setattr(files, "PARTIAL_SAVE_EVERY_S", 0.0)  # saved after every batch
  workdir, config, result = bon_run
  whole = files.read_npz(workdir / best_of_n.SAMPLES_FILE)
  sample, calls = best_of_n.rollout_lib.sample, []
  def sample_until_the_third_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # stopped while sampling the third batch of 4 prompts
    return sample(*args, **kwargs)
  monkeypatch.setattr(best_of_n.rollout_lib, "sample", sample_until_the_third_batch)
  with pytest.raises(KeyboardInterrupt):
    best_of_n.run(config, str(tmp_path))
  partial = files.read_npz(tmp_path / best_of_n.PARTIAL_FILE)
  assert int(partial["done"]) == 8 and partial["gold"].shape == (8 * 64,)
  calls.clear()
  assert best_of_n.run(config, str(tmp_path)) == result
  assert len(calls) == 2  # the last two batches only
  resumed = files.read_npz(tmp_path / best_of_n.SAMPLES_FILE)
  assert sorted(resumed) == sorted(whole)
  np.testing.assert_array_equal(resumed["lengths"], whole["lengths"])
  for name in ("proxy", "gold"):
    np.testing.assert_allclose(resumed[name], whole[name], rtol=1e-6)
  assert not (tmp_path / best_of_n.PARTIAL_FILE).exists()


def test_samples_are_redrawn_when_the_proxy_model_trained_on(tmp_path):
  """The proxy's checkpoint is part of the samples' fingerprint: a proxy RM extended after
  the samples were scored used to have them reused (proxy 3.70 against 4.85 fresh)."""
  from tests import test_train_core  # pylint: disable=import-outside-toplevel
  from prefjax import train  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def train_rm_stand_in(num_steps):
    train.train_loop(workdir=str(tmp_path / "rm"), model=test_train_core.MLP(nnx.Rngs(0)),
                     loss_fn=test_train_core.mse_loss,
                     optimizer={"name": "sgd", "learning_rate": 0.1},
                     loop=train.LoopConfig(num_steps=num_steps, tensorboard=False),
                     train_iter=iter(test_train_core.make_batches(num_steps, 8)))

  config = tiny.get_config("quick")
  config.proxy = dict(kind="model", checkpoint=str(tmp_path / "rm"))
  train_rm_stand_in(2)
  first = best_of_n.samples_fingerprint(config)
  assert best_of_n.scorer_checkpoints(config)["proxy"]["step"] == 2
  assert best_of_n.samples_fingerprint(config) == first
  train_rm_stand_in(4)
  assert best_of_n.scorer_checkpoints(config)["proxy"]["step"] == 4
  assert best_of_n.samples_fingerprint(config) != first
  config.proxy.checkpoint = f"{tmp_path / 'rm'}@2"  # the step the first samples were scored by
  assert best_of_n.scorer_checkpoints(config)["proxy"]["step"] == 2
  config.proxy.checkpoint = str(tmp_path / "rm")
  # A safety classifier's threshold.json, re-chosen by a train_safety rerun, counts too.
  config.safety = dict(kind="classifier", workdir=str(tmp_path / "rm"), threshold=None)
  (tmp_path / "rm" / "threshold.json").write_text('{"threshold": 0.53}')
  with_safety = best_of_n.samples_fingerprint(config)
  (tmp_path / "rm" / "threshold.json").write_text('{"threshold": 0.526}')
  assert best_of_n.samples_fingerprint(config) != with_safety


@pytest.mark.parametrize("field,value,match", [
    ("sampling.temperature", 0.0, r"sampling.temperature=0.0, top_k=None draws the same "
                                  "response every time"),
    ("sampling.top_k", 1, r"sampling.temperature=1.0, top_k=1 draws the same response"),
    ("bon.num_samples", 1, r"bon.num_samples=1 must be >= 2"),
    ("bon.num_bootstrap", 1, r"bon.num_bootstrap=1 must be >= 2"),
    ("bon.prompts_per_batch", 0, r"bon.prompts_per_batch=0 must be >= 1"),
    ("bon.num_points", 1, r"bon.num_points=1 must be >= 2"),  # one point, at n = 1
    ("sampling.top_p", 1.5, r"sampling.top_p=1.5 must be in \(0, 1\]"),
    ("sampling.max_new_tokens", 0, r"sampling.max_new_tokens=0 must be >= 1"),
    ("warm_start.batch_size", 0, r"warm_start.batch_size=0 must be >= 1"),
])
def test_settings_best_of_n_cannot_measure_stop_before_sampling(tmp_path, field, value, match):
  config = tiny.get_config("quick")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    best_of_n.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_failed_rerun_keeps_the_config_of_the_report_beside_it(bon_run, monkeypatch):
  workdir, config, _ = bon_run
  before = (workdir / "config.json").read_text()
  changed = config.copy_and_resolve_references()
  changed.seed = 99  # samples again, and sampling fails
  def fail(cfg, wd, fp):
    raise OSError("disk full")
  monkeypatch.setattr(best_of_n, "sample_and_score", fail)
  with pytest.raises(OSError, match="disk full"):
    best_of_n.run(changed, str(workdir))
  assert (workdir / "config.json").read_text() == before


def test_curves_against_hand_computed_best_of_n():
  # Two prompts, three samples each; best-of-3 keeps the proxy argmax.
  proxy = np.array([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
  gold = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]])
  samples = {"proxy": proxy, "gold": gold, "lengths": np.ones_like(proxy)}
  config = tiny.get_config("quick")
  config.bon.num_points = 3
  result = best_of_n.curves(samples, config)
  assert result["n"] == [1, 2, 3]
  # Reference means subtracted: proxy 1.5, gold 0.583...
  gold_mean = gold.mean()
  assert result["proxy"][0] == pytest.approx(0.0, abs=1e-12)
  assert result["gold"][0] == pytest.approx(0.0, abs=1e-12)  # float64 normalisation
  # n = 2: the best of each 2-subset; prompt 0 subsets {0,1}->1, {0,2}->2, {1,2}->1.
  best2_gold = [np.mean([-1.0, 0.5, -1.0]), np.mean([0.0, 0.0, 1.0])]
  assert result["gold"][1] == pytest.approx(np.mean(best2_gold) - gold_mean)
  assert result["proxy"][2] == pytest.approx(np.mean([2.0, 3.0]) - proxy.mean())
  assert result["gold"][2] == pytest.approx(np.mean([-1.0, 0.0]) - gold_mean)
  # The gold peaks at n = 1 (the reference) and falls by the paired per-prompt difference:
  # prompt 0 from 0 to -1 - 1/6, prompt 1 from 0 to 0 - 1.
  decline = result["gold_decline"]
  assert decline["peak_n"] == 1
  assert decline["drop_to_max_n"] == pytest.approx(np.mean([1.0 + 1 / 6, 1.0]), rel=1e-12)
  assert decline["peak_n_share"] == {"1": 1.0}
  # A gold curve still rising at the largest n (no decline: 0 ± 0) reads as such.
  rising = best_of_n.curves({**samples, "gold": proxy}, config)
  assert rising["gold_decline"]["drop_to_max_n"] == 0.0 == rising["gold_decline"]["drop_se"]
  assert "the gold is highest at the largest n: no decline" in bon_report.report_markdown(
      {**rising, "scorer_checkpoints": {}})


def test_the_peak_s_spread_over_prompt_resamples():
  """Two prompts peaking at different points: a resample of prompt 0 twice (1/4) peaks at
  index 1; the others (3/4: once each, or prompt 1 twice) at index 2."""
  share = overopt.argmax_spread(np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]), 4000, seed=1)
  np.testing.assert_allclose(share, [0.0, 0.25, 0.75], atol=0.03)


def test_model_rewards_cut_texts_as_training_did_and_refuse_unscaled_aggregations():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from prefjax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from prefjax.data import tokenize  # pylint: disable=g-import-not-at-top
  from prefjax.rl import rewards  # pylint: disable=g-import-not-at-top
  spec = ml_collections.ConfigDict(dict(
      kind="model", tokenizer=dict(path="byte"), checkpoint="", max_length=32,
      aggregation="mean", lam=0.0,
      model=dict(arch="decoder", preset="tiny_llama", head="reward_ensemble:3",
                 dtype="float32", overrides=dict(max_position_embeddings=64))))
  reward = rewards.make_reward(spec, seed=3)
  tok = tokenize.ByteTokenizer()
  prompts, responses = ["abc", "x" * 40], ["def", "world"]
  tokens, mask = rewards.text_encoder(tok, pipeline_lib.PipelineConfig(max_length=32))(
      [p + rewards.MODEL_SEPARATOR + r for p, r in zip(prompts, responses)])
  # The long prompt is cut from the left to 16 tokens, its BOS kept; the response stays whole.
  long_row = tokens[1, :int(mask[1].sum())].tolist()
  assert long_row == [tok.bos_id] + [ord("x")] * 15 + [ord(c) for c in "world"] + [tok.eos_id]
  members = np.asarray(reward.fn.members[0].model(tokens, attention_mask=mask), np.float64)
  assert members.shape == (2, 3)
  np.testing.assert_allclose(reward(prompts, responses), members.mean(1), rtol=1e-5, atol=1e-6)
  for aggregation in ("wco", "uwo"):  # members on arbitrary scales: refused, not wrong
    with pytest.raises(ValueError, match=f"aggregation='{aggregation}' of a 3-member"):
      rewards.make_reward(ml_collections.ConfigDict(dict(spec, aggregation=aggregation)),
                          seed=3)


def test_reward_model_inputs_stay_within_max_length_where_training_would_drop_them(caplog):
  """A prompt that leaves fewer than ``min_response_length`` tokens: training drops the pair
  (``over_long``); scoring still owes a score, so the response is cut to fit, and counted."""
  from prefjax.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from prefjax.data import tokenize  # pylint: disable=g-import-not-at-top
  from prefjax.rl import rewards  # pylint: disable=g-import-not-at-top
  tok = tokenize.ByteTokenizer()
  config = pipeline_lib.PipelineConfig(max_length=16, max_prompt_length=12,
                                       min_response_length=6)
  with caplog.at_level(logging.WARNING):
    tokens, mask = rewards.text_encoder(tok, config)(
        ["q" * 20 + rewards.MODEL_SEPARATOR + "r" * 21, "ab" + rewards.MODEL_SEPARATOR + "cd"])
  assert mask.sum(axis=1).tolist() == [16, 6]  # 12 prompt + 4 response tokens; uncut row
  assert tokens[0, 12:16].tolist() == [ord("r")] * 4
  assert "1 of 2 texts cut to fit" in caplog.text
  assert "1 kept under min_response_length 6 tokens of response" in caplog.text


def test_best_of_n_aggregates_ensemble_members_standardized_on_its_samples():
  """WCO / UWO of a model ensemble: members standardized over all reference samples first,
  since BT training leaves each member's offset and scale arbitrary."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from prefjax.rl import rewards  # pylint: disable=g-import-not-at-top
  members = np.array([[0.0, 10.0, -3.0], [1.0, 30.0, -2.0], [2.0, 20.0, -4.0],
                      [3.0, 40.0, -1.0]])
  z = (members - members.mean(0)) / members.std(0)
  np.testing.assert_allclose(rewards.standardized_aggregate(members, "wco", 0.0), z.min(1),
                             rtol=1e-6)
  np.testing.assert_allclose(rewards.standardized_aggregate(members, "uwo", 0.5),
                             z.mean(1) - 0.5 * z.var(1), rtol=1e-6, atol=1e-7)
  config = tiny.get_config("quick")
  config.warm_start.steps = 0
  config.proxy = ml_collections.ConfigDict(dict(
      kind="model", name="ens", tokenizer=dict(path="byte"), checkpoint="", max_length=32,
      aggregation="wco", lam=0.0,
      model=dict(arch="decoder", preset="tiny_llama", head="reward_ensemble:3",
                 dtype="float32", overrides=dict(max_position_embeddings=64))))
  spec, aggregation, _ = rewards.split_aggregation(config.proxy)
  assert (spec.aggregation, aggregation) == ("mean", "wco")
  # The report names the aggregation (mean, WCO and UWO curves shared the label 'ens').
  assert best_of_n.proxy_name(config.proxy) == "wco(ens)"
  other = lambda **kw: ml_collections.ConfigDict(dict(config.proxy, **kw))  # noqa: E731
  assert best_of_n.proxy_name(other(aggregation="uwo", lam=0.5)) == "uwo[λ=0.5](ens)"
  assert best_of_n.proxy_name(other(aggregation="mean")) == "ens"
  assert rewards.aggregated_name("uwo", 0.5, "ens") == "uwo[λ=0.5](ens)"  # train_rl's too
  samples = best_of_n.sample_and_score(config)
  proxy = samples["proxy"]
  assert proxy.shape == samples["gold"].shape and np.isfinite(proxy).all()
  assert proxy.mean() <= 1e-9  # the min of members of mean 0 over the samples
  config.proxy.model.head = "reward"  # one model: no members to aggregate
  with pytest.raises(ValueError, match="is not an ensemble"):
    best_of_n.sample_and_score(config)
