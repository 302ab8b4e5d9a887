"""eval_rm on inputs that used to be scored wrongly or to fail without saying why: Hugging
Face exports read unlike their training, directories without a reward head, scorers that
keep no pair, runs of the other kind, datasets whose short labels coincide."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.rm import ensemble_tiny
from experiments import eval_rm
from experiments import train_rm
from prefjax import experiment
from prefjax.data import tokenize
from prefjax.evals import scorers as scorers_lib
from prefjax.models import decoder
from prefjax.models import hf_export
from prefjax.train import summary as summary_lib
from tests import test_eval_rm
from tests import test_train_dpo
from tests import test_train_rm

# Cuts no pipeline default shares: prompts kept to 4 bytes, pairs to 12, no BOS.
TRAINED_TEXT = {"max_length": 12, "max_prompt_length": 4, "add_bos": False}


@pytest.fixture(scope="module")
def cut_run():
  """A tiny RM trained on short cuts without BOS, exported with export_hf."""
  with test_train_rm._private_tmp() as d:  # pylint: disable=protected-access
    config = test_train_rm.small_config(20, num_pairs=200, batch_size=16)
    config.data.pipeline.update(TRAINED_TEXT, bucket_boundaries=())
    config.export_hf = True
    train_rm.run(config, str(pathlib.Path(d) / "rm"))
    yield pathlib.Path(d) / "rm"


def _scores(workdir: pathlib.Path) -> dict[str, dict[int, tuple[float, float]]]:
  out: dict[str, dict[int, tuple[float, float]]] = {}
  for line in (workdir / "scores.jsonl").read_text().splitlines():
    row = json.loads(line)
    for name, (chosen, rejected) in row["scores"].items():
      out.setdefault(name, {})[row["index"]] = (chosen, rejected)
  return out


def test_an_export_is_scored_as_its_run_trained_it(cut_run, tmp_path, caplog):
  """hf: read an export at the pipeline defaults (512 tokens, BOS) whatever the run cut:
  rewards up to 5.6 apart from rm:'s on the same model. The export now records the
  training pipeline's text fields, and hf: reads pairs with them."""
  recorded = json.loads((cut_run / "hf" / "config.json").read_text())["prefjax_pipeline"]
  assert {k: recorded[k] for k in TRAINED_TEXT} == TRAINED_TEXT
  config = test_eval_rm.eval_config(f"rm:{cut_run},exported=hf:{cut_run / 'hf'}",
                                    f"run:{cut_run}")
  config.hf_tokenizer = "byte"
  section = eval_rm.run(config, str(tmp_path / "eval"))["datasets"][0]
  scores = _scores(tmp_path / "eval")
  rm, exported = scores["rm"], scores["exported"]
  assert len(rm) == len(exported) == 23
  np.testing.assert_allclose([exported[i] for i in rm], [rm[i] for i in rm], atol=1e-5)
  # Pairs scored on cut text were counted nowhere; at 12 tokens most of them are cut.
  cut = section["truncated_by_pipeline"]
  assert cut["rm"] == cut["exported"] and 0 < max(cut["rm"].values()) <= 23, cut
  report_md = (tmp_path / "eval" / "report.md").read_text()
  assert (f"rm scored {cut['rm']['truncated_prompt']} pairs with the prompt cut and "
          f"{cut['rm']['truncated_response']} pairs with a response cut to fit its "
          "max_length") in report_md
  config.pipeline = {"max_length": 32, "batch_size": 8}  # batch_size: also set by rm:
  with caplog.at_level(logging.WARNING):
    longer = eval_rm.run(config, str(tmp_path / "eval_longer"))["datasets"][0]
  assert sum(longer["truncated_by_pipeline"].get("rm", {}).values()) < sum(cut["rm"].values())
  changed = [r.getMessage() for r in caplog.records if "reads pairs unlike" in r.getMessage()]
  assert any("scorer 'rm'" in m and "max_length=32 (trained: 12)" in m for m in changed)
  assert any("scorer 'exported'" in m and "export's training pipeline" in m for m in changed)


def test_a_scorer_that_keeps_no_pair_says_which_and_why(cut_run, tmp_path):
  path = tmp_path / "long.jsonl"
  shared = "the same long opening of both answers, "
  path.write_text("\n".join(json.dumps({"prompt": "Q", "chosen": shared + "yes",
                                        "rejected": shared + "no"}) for _ in range(6)))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'rm' kept none of the 6 pairs of jsonl:long.jsonl@train: "
                           r"its pipeline \(max_length=12.*dropped_identical_after_truncation"):
    eval_rm.run(test_eval_rm.eval_config(f"rm:{cut_run}", f"jsonl:{path}"),
                str(tmp_path / "eval"))


TINY = {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 32}


def _tiny_decoder(vocab_size: int) -> decoder.Decoder:
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=vocab_size, **TINY)
  return decoder.Decoder(cfg, rngs=nnx.Rngs(0))


def test_directories_without_a_loadable_reward_head_are_refused(cut_run, tmp_path):
  """A policy (no head), a deep ensemble's parent folder, and a head whose pooling does not
  fit were scored by a randomly initialised head, or failed naming no member."""
  hf_export.save_pretrained(_tiny_decoder(259), tmp_path / "policy")
  model = experiment.make_model({"arch": "decoder", "preset": "tiny_llama", "head":
                                 "reward_ensemble:2", "ensemble": "deep", "pooling": "last",
                                 "overrides": dict(TINY)},
                                vocab_size=259, seed=0)
  hf_export.save_pretrained(model, tmp_path / "deep")
  (tmp_path / "deep" / "member_1").rename(tmp_path / "deep" / "member_2")
  cases = [(f"hf:{tmp_path / 'policy'}", "", r"holds no reward head .* randomly initialised"),
           (f"hf:{tmp_path / 'deep'}", "", r"holds \['member_0', 'member_2'\], not member_0 "
                                           r"\.\.\. member_1"),
           (f"hf:{cut_run / 'hf'}", "mean", r"'score.weight' reads the last token "
                                                    r"\(pooling='last'\); pooling='mean' would "
                                                    r"not reproduce it")]
  for scorer, pooling, message in cases:
    config = test_eval_rm.eval_config(scorer, f"run:{cut_run}")
    config.hf_tokenizer, config.hf_pooling = "byte", pooling
    with pytest.raises(scorers_lib.EvalInputError, match=message):
      eval_rm.run(config, str(tmp_path / "eval"))


def test_a_deep_ensemble_export_scores_as_its_run_does(tmp_path):
  """Its member_<k>/ folders were refused: only each member alone could be scored."""
  config = test_train_rm.small_config(4, base=ensemble_tiny, num_pairs=200)
  config.export_hf = True
  run = tmp_path / "ens"
  train_rm.run(config, str(run))
  eval_cfg = test_eval_rm.eval_config(f"ens=rm:{run},hf=hf:{run / 'hf'}", f"run:{run}")
  eval_cfg.hf_tokenizer = "byte"
  eval_rm.run(eval_cfg, str(tmp_path / "eval"))
  scores = _scores(tmp_path / "eval")
  columns = ["", "/wco", "/uwo"] + [f"/member{k}" for k in range(4)]
  for column in columns:
    rm, hf = scores[f"ens{column}"], scores[f"hf{column}"]
    assert sorted(rm) == sorted(hf) and len(rm) > 10
    np.testing.assert_allclose([hf[i] for i in rm], [rm[i] for i in rm], atol=1e-4,
                               err_msg=column)


def test_an_export_read_with_another_tokenizer_is_refused(cut_run, tmp_path, gpt2_bpe_dir):
  """A GPT-2-vocabulary export read with the byte tokenizer (fewer ids, so no vocabulary
  error) was scored at the wrong EOS, with a log line at most."""
  gpt2 = tokenize.load_tokenizer(gpt2_bpe_dir)
  model = experiment.make_model({"arch": "decoder", "preset": "tiny_llama", "head": "reward",
                                 "pooling": "last", "overrides": dict(TINY)},
                                vocab_size=gpt2.vocab_size, seed=0)
  hf_export.save_pretrained(model, tmp_path / "hf", tokenizer=gpt2, add_bos=False,
                            pipeline={"max_length": 64, "add_bos": False})
  config = test_eval_rm.eval_config(f"hf:{tmp_path / 'hf'}", f"run:{cut_run}")
  config.hf_tokenizer = "byte"
  with pytest.raises(scorers_lib.EvalInputError,
                     match=rf"the tokenizer's EOS id is 258, but .* was trained with "
                           rf"{gpt2.eos_id} \(eos_token_id in its config.json\)"):
    eval_rm.run(config, str(tmp_path / "eval"))


def test_a_run_of_the_other_kind_is_named(cut_run, tmp_path):
  policy_run, sft_run = tmp_path / "dpo", tmp_path / "sft"
  sections = {"tokenizer": {"path": "byte"}, "data": {"name": "tiny_world"}}
  for run, config in ((policy_run, {"model": {"head": None}, "loss": {"name": "dpo"}}),
                      (sft_run, {"model": {"head": ""}, **sections})):  # no loss in SFT
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
  sft = (rf"{sft_run} is a train_sft run \(no reward head, no preference loss\): neither rm: "
         r"nor dpo: can score pairs with it")
  for scorer, message in [(f"rm:{policy_run}", rf"no reward head \(model.head=None: a "
                                               rf"train_dpo run\); .* as dpo:{policy_run}"),
                          (f"dpo:{cut_run}", rf"trained a reward model \(model.head='reward', "
                                             rf"a train_rm run\); score it as rm:{cut_run}"),
                          # Following the rm: error's advice on an SFT run ended in "the
                          # config has no field 'loss'... is --config a config for this binary?"
                          (f"rm:{sft_run}", sft), (f"dpo:{sft_run}", sft)]:
    with pytest.raises(scorers_lib.EvalInputError, match=message):
      eval_rm.run(test_eval_rm.eval_config(scorer, f"run:{cut_run}"), str(tmp_path / "eval"))


def test_datasets_with_one_file_name_keep_their_sections_apart(tmp_path):
  """a/test.jsonl and b/test.jsonl were both labelled jsonl:test.jsonl@train: one
  section's figures overwrote the other's, and their scores shared one label."""
  for folder, longer in (("a", "chosen"), ("b", "rejected")):
    (tmp_path / folder).mkdir()
    rows = [{"prompt": "Q", "chosen": " x", "rejected": " y", "id": str(i)} for i in range(8)]
    for row in rows:
      row[longer] += " and more"
    (tmp_path / folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  a, b = f"jsonl:{tmp_path / 'a' / 'test.jsonl'}", f"jsonl:{tmp_path / 'b' / 'test.jsonl'}"
  report = eval_rm.run(test_eval_rm.eval_config("length", f"{a},{b}"), str(tmp_path / "eval"))
  sections = {d["dataset"]: d["metrics"]["length"]["accuracy"]["value"]
              for d in report["datasets"]}
  assert sections == {f"{a}@train": 1.0, f"{b}@train": 0.0}
  with pytest.raises(scorers_lib.EvalInputError, match=r"given more than once"):
    eval_rm.run(test_eval_rm.eval_config("length", f"{a},{a}"), str(tmp_path / "eval2"))


def test_only_a_bradley_terry_policy_is_scored_for_calibration(monkeypatch):
  """dpo: scores of every direct loss were reported with log-loss, ECE and reliability
  plots of σ(margin), a probability only under the losses that are −log σ(margin)."""
  from prefjax.losses import registry
  probabilistic = {n for n, s in registry.DIRECT_LOSS_SPECS.items() if s.bradley_terry}
  assert {"dpo", "robust", "sigmoid_norm"} <= probabilistic
  assert not probabilistic & {"ipo", "hinge", "kto", "simpo", "orpo"}

  class _Pipeline:  # one batch of two pairs, then done
    counters: dict = {}

    def __init__(self):
      self.batches = [{"pair_mask": np.ones(2), "example_index": np.array([0, 1])}]

    def __iter__(self):
      return self

    def __next__(self):
      if not self.batches:
        raise StopIteration
      return self.batches.pop()

  monkeypatch.setattr(scorers_lib, "check_tokenizer", lambda *a, **k: None)
  monkeypatch.setattr(scorers_lib.pipeline_lib, "preference_dataset", lambda *a: _Pipeline())
  for calibrated in (True, False):
    scorer = scorers_lib.ModelScorer(
        "policy", None, None, lambda batch: (np.array([1.0, 0.5]), np.zeros(2)), None, None,
        0.2, scorers_lib.reward_columns("policy", (), 0.0), calibrated=calibrated)
    assert scorer([None, None], "d").calibrated is calibrated


def test_overrides_a_loaded_model_does_not_take_are_named(tmp_path, caplog):
  """A run's config.json recorded hidden_size=64 for a policy loaded at 16, silently."""
  hf_export.save_pretrained(_tiny_decoder(259), tmp_path / "policy")
  cfg = {"arch": "decoder", "preset": "tiny_llama", "path": str(tmp_path / "policy"),
         "overrides": dict(TINY, hidden_size=64, num_layers=1)}
  with caplog.at_level(logging.WARNING):
    model = experiment.make_model(cfg, vocab_size=259, seed=0)
  assert model.config.hidden_size == 16
  warned = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
  assert len(warned) == 1 and "hidden_size=64 (loaded: 16)" in warned[0]
  assert "num_layers" not in warned[0]  # the overrides that agree are not named


def test_a_failed_rerun_keeps_the_previous_figures_and_a_finished_one_replaces_them(tmp_path):
  """A rerun that failed on its second dataset had already redrawn the first one's
  figures; a rerun with fewer datasets left the dropped ones' figures behind."""
  rows = lambda longer: [dict({"prompt": "Q", "chosen": " x", "rejected": " y"},
                              **{longer: " x and more"}) for _ in range(8)]
  files = {"a": rows("chosen"), "b": rows("rejected"),
           "ties": [dict(r, outcome=0.5) for r in rows("chosen")]}
  for name, data in files.items():
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in data))
  spec = lambda *names: ",".join(f"jsonl:{tmp_path / n}.jsonl" for n in names)  # noqa: E731
  workdir = tmp_path / "eval"
  eval_rm.run(test_eval_rm.eval_config("length", spec("a", "b")), str(workdir))
  figures = workdir / "figures"
  before = {p.name: p.stat().st_mtime_ns for p in figures.iterdir()}
  assert any("b.jsonl" in name for name in before)
  with pytest.raises(scorers_lib.EvalInputError):
    eval_rm.run(test_eval_rm.eval_config("length", spec("a", "ties")), str(workdir))
  assert {p.name: p.stat().st_mtime_ns for p in figures.iterdir()} == before
  eval_rm.run(test_eval_rm.eval_config("length", spec("a")), str(workdir))
  after = {p.name for p in figures.iterdir()}
  assert after and not any("b.jsonl" in name for name in after)
  assert not (workdir / eval_rm.STAGING).exists()


def test_a_reward_from_a_checkpoint_scores_texts_as_eval_rm_scores_its_pairs(cut_run, tmp_path):
  """``rewards.from_checkpoint(WORKDIR)`` rebuilds the run's model, tokenizer and cuts (here
  4-byte prompts, 12-byte pairs, no BOS: none of them defaults) from the run alone."""
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  pairs = [("a long question", "yes", "no"), ("why?", "because", "no idea at all"),
           ("q", "abc", "abd"), ("tell me more", "sure thing", "x")]
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": p, "chosen": c, "rejected": r})
                            for p, c, r in pairs))
  eval_rm.run(test_eval_rm.eval_config(f"rm:{cut_run}", f"jsonl:{path}"), str(tmp_path / "ev"))
  by_eval = _scores(tmp_path / "ev")["rm"]
  assert sorted(by_eval) == [0, 1, 2, 3]
  reward = rl_rewards.from_checkpoint(str(cut_run))
  prompts = [p for p, _, _ in pairs]
  chosen = reward(prompts, [c for _, c, _ in pairs])
  rejected = reward(prompts, [r for _, _, r in pairs])
  np.testing.assert_allclose(np.stack([chosen, rejected], 1),
                             [by_eval[i] for i in range(4)], atol=1e-5)
  assert chosen.dtype == np.float64 and np.ptp(chosen) > 1e-3
  # Cut as trained: the prompt's first bytes beyond its last 4 do not change a reward.
  np.testing.assert_allclose(reward(["XYZW long question"], ["yes"]), chosen[:1], atol=1e-6)
  policy = tmp_path / "policy"
  (policy / "checkpoints" / "1").mkdir(parents=True)
  config = json.loads((cut_run / "config.json").read_text())
  config["model"]["head"] = None  # as train_dpo and train_sft save it
  (policy / "config.json").write_text(json.dumps(config))
  # Named for best-of-n and RL, not with eval_rm's dpo: advice.
  with pytest.raises(ValueError, match=r"reward 'policy' \(checkpoint='.*'\): .* trained no "
                                       r"reward head .*best-of-n and RL score with a train_rm"):
    rl_rewards.from_checkpoint(str(policy))
  with pytest.raises(ValueError, match=r"does not exist: train the reward model there first"):
    rl_rewards.from_checkpoint(str(tmp_path / "missing"))
  config["model"]["head"] = ""  # as train_rl saves it: was "unknown head spec ''"
  (policy / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"trained no reward head \(model.head=''"):
    rl_rewards.from_checkpoint(str(policy))
  # A train_loop call of one's own that saved a partial config: named, not an AttributeError.
  trained = json.loads((cut_run / "config.json").read_text())
  (policy / "config.json").write_text(json.dumps({"model": trained["model"]}))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"config.json has no tokenizer, data: the binaries save every "):
    rl_rewards.from_checkpoint(str(policy))


def test_a_reward_spec_of_a_checkpoint_alone_takes_its_run_s_model_and_tokenizer(cut_run,
                                                                                  tmp_path):
  """``--config.proxy.kind=model --config.proxy.checkpoint=WORKDIR`` in best_of_n and
  train_rl: a spec without tokenizer and model stopped with an error about a missing
  'tokenizer' field of the binary's config."""
  from configs.bon import tiny as bon_tiny  # pylint: disable=import-outside-toplevel
  from experiments import best_of_n  # pylint: disable=import-outside-toplevel
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  texts = (["a long question", "q"], ["yes", "abd"])
  alone = rl_rewards.make_reward(ml_collections.ConfigDict(
      {"kind": "model", "checkpoint": f"{cut_run}@latest", "batch_size": 64}))
  run = json.loads((cut_run / "config.json").read_text())
  spelled_out = rl_rewards.make_reward(ml_collections.ConfigDict(
      {"kind": "model", "checkpoint": str(cut_run), "tokenizer": run["tokenizer"],
       "model": run["model"], "batch_size": 64}))  # the same batch shape: the same program
  np.testing.assert_array_equal(alone(*texts), spelled_out(*texts))
  np.testing.assert_array_equal(alone(*texts), rl_rewards.from_checkpoint(str(cut_run))(*texts))
  assert rl_rewards.reward_name(ml_collections.ConfigDict(
      {"kind": "model", "checkpoint": f"{cut_run}@latest"})) == cut_run.name  # in reports
  home = scorers_lib.ScorerSpec.parse("rm:~/runs/rm@best")
  assert (home.path, home.step, home.name) == (os.path.expanduser("~/runs/rm"), "best", "rm")
  assert np.ptp(alone(*texts)) > 1e-3
  with pytest.raises(ValueError, match=r"kind='model' needs checkpoint \(a train_rm workdir"):
    rl_rewards.make_reward(ml_collections.ConfigDict({"kind": "model", "checkpoint": ""}))
  # The tiny best-of-n config takes it as two overrides; the samples stay the same.
  config = bon_tiny.get_config("quick")
  config.prompts.num_eval, config.bon.num_samples, config.bon.prompts_per_batch = 2, 4, 2
  config.warm_start.steps = 0  # the random policy's samples serve as well
  planted = best_of_n.sample_and_score(config)
  config.proxy.kind, config.proxy.checkpoint = "model", str(cut_run)
  learned = best_of_n.sample_and_score(config)
  np.testing.assert_array_equal(learned["gold"], planted["gold"])
  assert learned["proxy"].shape == (2, 4) and not np.allclose(learned["proxy"], planted["proxy"])
  config.proxy.kind = "tiny_world_proxy"
  with pytest.raises(ValueError, match=r"'tiny_world_proxy' is programmatic: checkpoint="):
    best_of_n.sample_and_score(config)


def test_a_reward_says_once_how_many_texts_it_cut(cut_run, caplog):
  """A prompt longer than the RM's training cut was scored on its last bytes unsaid."""
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  reward = rl_rewards.from_checkpoint(str(cut_run))
  with caplog.at_level(logging.WARNING, logger="absl"):
    reward(["q", "q"], ["a", "b"])
    assert not caplog.records
    reward(["q", "a long question indeed", "q"], ["a", "b", "c"])
    reward(["a long question indeed"], ["a"])
  assert [r.getMessage() for r in caplog.records] == [
      "reward model: 1 of 3 texts cut to fit (max_length 12, prompt limit 4, as the model "
      "trained); their cut parts do not count"]


def test_the_readme_example_scores_two_responses_with_a_trained_run(cut_run):
  from tests import test_readme_examples  # pylint: disable=import-outside-toplevel
  from prefjax.rl import rewards as rl_rewards  # pylint: disable=import-outside-toplevel
  code = test_readme_examples._example("rewards.from_checkpoint")  # pylint: disable=protected-access
  ns, printed = test_readme_examples._run(code.replace('"/tmp/rm_tiny"', repr(str(cut_run))))  # pylint: disable=protected-access
  scores = rl_rewards.from_checkpoint(str(cut_run))(ns["prompts"], ns["responses"])
  assert scores.shape == (2,) and scores.dtype == np.float64  # "float64 [2]"
  assert printed.strip() == str(scores) and np.isfinite(scores).all()


def test_the_scoring_bar_ends_full_and_counts_the_pairs_the_pipeline_dropped(caplog):
  """The PandaLM bar ended at 995/999 when the pipeline dropped 4 pairs. (Under pytest
  stderr is no terminal: the bar is a log line, as in a batch job's log.)"""
  batches = [{"pair_mask": np.ones(3)}, {"pair_mask": np.array([1.0, 0.0])}]
  with caplog.at_level(logging.INFO, logger="absl"):
    assert len(list(scorers_lib._progress(iter(batches), 6, "rm"))) == 2  # pylint: disable=protected-access
  (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rm: ")]
  assert line.startswith("rm: 6/6 pairs (") and line.endswith(" 2 dropped by the pipeline")


def test_compare_reads_a_report_with_an_unmeasured_accuracy(tmp_path):
  """report.json holds a NaN as "nan" (standard JSON); compare reads it back as a number."""
  nan_ci = {"value": float("nan"), "low": float("nan"), "high": float("nan")}
  for run, acc in (("a", nan_ci), ("b", {"value": 0.75, "low": 0.5, "high": 1.0})):
    summary_lib.write_json(tmp_path / run / "report.json",
                           {"datasets": [{"dataset": "d", "metrics": {"rm": {"accuracy": acc}}}]})
  text = (tmp_path / "a" / "report.json").read_text()
  assert json.loads(text, parse_constant=pytest.fail)["datasets"][0]["metrics"]["rm"][
      "accuracy"]["value"] == "nan"
  config = ml_collections.ConfigDict({"compare": f"{tmp_path / 'a'},{tmp_path / 'b'}"})
  table = eval_rm.compare(config, str(tmp_path))
  assert table.splitlines()[-1] == "| d | rm | – | 0.750 [0.500, 1.000] |"


def test_a_dpo_run_of_a_loss_not_registered_here_says_how_to_register_it(tmp_path):
  run = tmp_path / "custom_dpo"
  (run / "checkpoints" / "30").mkdir(parents=True)
  config = test_train_dpo.dpo_config().to_dict()
  config["loss"]["name"] = "users_own_loss"  # registered by the run's --imports module
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'custom_dpo': unknown direct loss 'users_own_loss'.*pass "
                           r"--imports=MODULE to the binary\), as for its training$"):
    eval_rm.run(test_eval_rm.eval_config(f"dpo:{run}", "pandalm@test"), str(tmp_path / "eval"))
  for modules in (["my_lab.losses"], [], ["my_lab.losses", "my_lab.extra"]):
    summary_lib.append_run_record(str(run), {"imports": modules})
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"as for its training \(its runs.jsonl records "
                           r"--imports=my_lab.extra,my_lab.losses\)$"):
    eval_rm.run(test_eval_rm.eval_config(f"dpo:{run}", "pandalm@test"), str(tmp_path / "eval"))


def test_a_tokenizer_that_cannot_read_the_data_is_named(tmp_path, minilm_dir):
  path = tmp_path / "emoji.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": "🙂🙃" * 5, "chosen": "🎉" * 8,
                                        "rejected": "🔥" * 8}) for _ in range(10)))
  rm = experiment.make_model({"arch": "encoder", "path": str(minilm_dir), "head": "reward",
                              "pooling": "mean"}, vocab_size=30522, seed=0)
  tokenizer = experiment.make_tokenizer({"path": str(minilm_dir)})
  hf_export.save_pretrained(rm, tmp_path / "hf", tokenizer=tokenizer)
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'minilm': tokenizer hf:.* cannot read dataset "
                           r"'jsonl:.*emoji.jsonl@train': 100% of the tokens"):
    eval_rm.run(test_eval_rm.eval_config(f"minilm=hf:{tmp_path / 'hf'}", f"jsonl:{path}@train"),
                str(tmp_path / "eval"))


def test_bad_rows_of_a_dataset_are_listed_with_their_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setenv("PREFJAX_CACHE_DIR", str(tmp_path / "cache"))
  path = tmp_path / "bench.jsonl"
  good = json.dumps({"prompt": "Q", "chosen": " yes", "rejected": " no"})
  path.write_text("\n".join([good, json.dumps({"prompt": "Q", "chosen": " yes"}), good]))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=rf"(?s)dataset 'jsonl:{path}@train': .*1 bad row\(s\) of 3 read.*"
                           rf"{path}:2: missing_field.*--config.on_bad_row=skip"):
    eval_rm.run(test_eval_rm.eval_config("length", f"jsonl:{path}@train"), str(tmp_path / "eval"))


def test_a_missing_dataset_is_one_line_on_the_command_line(tmp_path):
  cmd = [sys.executable, "-m", "experiments.eval_rm", "--config=configs/eval/tiny.py",
         f"--workdir={tmp_path}", "--config.scorers=length",
         f"--config.datasets=jsonl:{tmp_path}/missing.jsonl@train"]
  proc = subprocess.run(cmd, cwd=test_eval_rm.REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: EvalInputError: dataset 'jsonl:{tmp_path}/missing.jsonl@train': ")
  assert "Traceback" not in proc.stderr

