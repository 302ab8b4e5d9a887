"""``experiments/eval_rm.py``: metric formulas, tiny-world runs scored end to end, bad input."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs.eval import tiny as eval_tiny
from configs.rm import ensemble_tiny
from experiments import eval_rm
from experiments import train_dpo
from experiments import train_rm
from prefjax import experiment
from prefjax import train
from prefjax.evals import preference
from prefjax.evals import scorers as scorers_lib
from prefjax.evals import stats
from prefjax.models import heads
from prefjax.models import hf_export
from prefjax.rm import evaluation as rm_evaluation
from tests import comparisons
from tests import test_train_dpo
from tests import test_train_rm

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PAIRS = 600

# Private temp dirs, not pytest's numbered basetemp (concurrent sessions prune it); datasets
# go to conftest's private per-process cache.
_private_tmp = test_train_rm._private_tmp  # pylint: disable=protected-access
tmp_path = test_train_rm.tmp_path


# ----------------------------------------------------------------------------- formulas


def test_accuracy_counts_a_zero_margin_as_half():
  signed = np.array([1.0, -1.0, 0.0, 2.0])
  counts = stats.resample_counts(4, 200, 0)
  assert stats.scorer_metrics(signed, counts, rel_diff=np.ones(4), subsets=None,
                              calibrated=False)["accuracy"].value == 0.625


def test_the_ece_interval_corrects_the_upward_bias_of_binned_ece():
  """A calibrated scorer (true ECE 0): the percentile interval of the resampled ECE never
  reached 0 (a helper's coverage study); the basic bootstrap interval usually does."""
  rng = np.random.default_rng(0)
  covered = 0
  for _ in range(20):
    margins = rng.normal(0.0, 1.5, 200)
    won = rng.random(200) < 1.0 / (1.0 + np.exp(-margins))  # calibrated: P(win) = σ(margin)
    signed = np.where(won, margins, -margins)
    counts = stats.resample_counts(200, 300, rng)
    estimate = stats.ece_estimate(signed, counts, 10)
    assert estimate.value > 0.01 and estimate.low >= 0.0 and estimate.high > estimate.low
    percentile_low = np.percentile(stats.two_sided_ece(signed, counts, 10), 2.5)
    assert percentile_low > 0.01  # the old interval excluded the truth every time
    covered += estimate.low == 0.0
  assert covered >= 10


def test_two_sided_ece_matches_a_hand_computed_value_and_the_train_rm_formula():
  # σ(log 3) = 0.75: order (a, b) has p 0.75 and label 1, order (b, a) p 0.25 and label 0;
  # they fall in different bins, each off by 0.25, so ECE = ½·0.25 + ½·0.25.
  assert stats.two_sided_ece(np.array([math.log(3.0)]))[0] == pytest.approx(0.25)
  assert stats.two_sided_ece(np.array([0.0]))[0] == pytest.approx(0.0)
  signed = np.random.default_rng(0).normal(0.5, 2.0, 300)
  prob = 1 / (1 + np.exp(-signed))
  expected = preference.expected_calibration_error(
      np.concatenate([prob, 1 - prob]), np.concatenate([np.ones(300), np.zeros(300)]), 10)
  assert stats.two_sided_ece(signed)[0] == pytest.approx(expected, abs=1e-12)
  # Resampled with counts, it is the ECE of the resampled pairs.
  counts = stats.resample_counts(300, 3, 1)
  take = np.repeat(np.arange(300), counts[1].astype(int))
  assert stats.two_sided_ece(signed, counts)[1] == pytest.approx(
      stats.two_sided_ece(signed[take])[0], abs=1e-6)


def test_bootstrap_interval_has_the_binomial_width():
  correct = (np.arange(400) % 4 != 0).astype(float)  # accuracy 0.75
  e = stats.weighted_estimate(correct, stats.resample_counts(400, 2000, 0))
  assert e.value == 0.75 and e.low < 0.75 < e.high
  normal_width = 2 * 1.96 * math.sqrt(0.75 * 0.25 / 400)
  assert e.high - e.low == pytest.approx(normal_width, rel=0.2)


def test_paired_bootstrap_sign_and_p_value():
  rng = np.random.default_rng(0)
  a = rng.normal(size=200)
  b = np.where(np.arange(200) < 40, np.abs(a), a)  # B fixes A's errors on the first 40 pairs.
  counts = stats.resample_counts(200, 1000, 0)
  gain = float(np.sum(a[:40] < 0)) / 200
  better = stats.paired_difference(a, b, counts)
  assert better.difference.value == pytest.approx(gain)
  assert better.difference.low > 0 and better.p_value == pytest.approx(1 / 1000)
  worse = stats.paired_difference(b, a, counts)
  assert worse.difference.value == pytest.approx(-gain) and worse.difference.high < 0
  same = stats.paired_difference(a, a, counts)
  assert same.difference.value == 0 and same.p_value == 1.0 and same.agreement == 1.0
  assert better.agreement == pytest.approx(1 - gain)


def test_length_controlled_accuracy_and_category_weighted_mean():
  rel_diff = np.array([0.5, 0.5, 0.5, -0.5, -0.5, 0.0])
  counts = stats.resample_counts(6, 500, 0)
  # A length detector: right when the preferred side is longer, wrong when shorter.
  length = stats.length_controlled_estimate(np.array([1, 1, 1, 0, 0, 0.5]), rel_diff, counts)
  assert (length.value, length.low, length.high) == (0.5, 0.5, 0.5)
  mixed = stats.length_controlled_estimate(np.array([1, 0, 0, 1, 1, 0.0]), rel_diff, counts)
  assert mixed.value == pytest.approx(0.5 * (1 / 3) + 0.5 * 1.0)
  assert 0.5 <= mixed.low <= mixed.value <= mixed.high <= 1.0
  correct = np.array([1, 1, 1, 0, 0, 0.0])
  per_subset, mean = stats.subset_accuracies(
      correct, stats.resample_counts(6, 100, 0), ["a", "a", "b", "b", "b", "b"])
  assert per_subset["a"].value == 1.0 and per_subset["b"].value == 0.25
  assert mean.value == 0.625  # Each subset counts once (the pooled accuracy is 0.5).
  # A one-pair subset is missing from ~37% of pooled resamples; the mean of the other two
  # (1.0) is not the category mean, so the interval resamples within each subset.
  correct = np.r_[np.ones(200), 0.0]
  _, mean = stats.subset_accuracies(correct, stats.resample_counts(201, 400, 0),
                                    ["a"] * 100 + ["b"] * 100 + ["c"], seed=3)
  assert (mean.value, mean.low, mean.high) == pytest.approx((2 / 3, 2 / 3, 2 / 3), abs=1e-12)
  with pytest.raises(ValueError, match=r"num_resamples=0: the bootstrap needs at least one"):
    stats.resample_counts(5, 0, 0)


def test_rows_without_the_subset_field_form_the_none_subset():
  metas = [{"subset": "chat"}, None, {"subset": 3}, {}]
  assert rm_evaluation.subset_names(metas, "subset") == (["chat", "(none)", "3", "(none)"], 2)
  assert rm_evaluation.subset_names([{}, None], "subset") == (None, 0)  # No subsets at all.
  # A pair labelled with two objectives: one subset, not the repr of a Python list.
  assert rm_evaluation.subset_names([{"objective": ["helpful", "harmless"]},
                                     {"objective": "helpful"}], "objective") == (
      ["helpful+harmless", "helpful"], 0)
  with pytest.raises(ValueError, match=r"row 1 of the eval split has meta.subset = '\(none\)'"):
    rm_evaluation.subset_names([{"subset": "a"}, {"subset": "(none)"}], "subset")


def test_wco_and_uwo_do_not_move_when_a_member_is_shifted_or_rescaled():
  # BT training fixes neither a member's offset nor its scale; eval_rm's WCO and UWO take
  # members standardized over the data's responses, so such a change leaves them equal.
  rng = np.random.default_rng(5)
  r_c, r_r = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
  shift, scale = np.array([0.0, 3.0, -3.0, 1.5]), np.array([1.0, 2.0, 0.5, 1.0])
  columns = scorers_lib.reward_columns("ens", (), 0.7)
  plain, moved = columns(r_c, r_r), columns(r_c * scale + shift, r_r * scale + shift)
  both = np.concatenate([r_c, r_r])
  z_c, z_r = ((r - both.mean(0)) / both.std(0) for r in (r_c, r_r))
  for side, z in ((0, z_c), (1, z_r)):
    np.testing.assert_allclose(plain["ens/wco"][side], z.min(1), rtol=1e-12)
    np.testing.assert_allclose(plain["ens/uwo"][side], z.mean(1) - 0.7 * z.var(1), rtol=1e-12)
    for name in ("ens/wco", "ens/uwo"):
      np.testing.assert_allclose(moved[name][side], plain[name][side], rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(plain["ens"][0], r_c.mean(1))  # the ensemble's own output
  np.testing.assert_array_equal(moved["ens/member1"][1], r_r[:, 1] * 2.0 + 3.0)
  centred = scorers_lib.reward_columns("ens", (), 0.7, "center")(r_c + shift, r_r + shift)
  np.testing.assert_allclose(centred["ens/wco"][0], (r_c - both.mean(0)).min(1), rtol=1e-12)
  raw = scorers_lib.reward_columns("ens", (), 0.7, "none")(r_c + shift, r_r + shift)
  np.testing.assert_array_equal(raw["ens/wco"][0], (r_c + shift).min(1))
  with pytest.raises(scorers_lib.EvalInputError, match=r"ensemble_normalization='zscore'"):
    scorers_lib.reward_columns("ens", (), 0.7, "zscore")


def test_a_scorer_giving_nan_rewards_is_an_error_not_wrong_answers(monkeypatch):
  source = [None] * 3

  class _Pipeline:
    counters: dict = {}

    def __iter__(self):
      yield {"pair_mask": np.ones(3), "example_index": np.array([7, 8, 9])}

  scorer = scorers_lib.ModelScorer(
      "nanny", None, None, lambda batch: (np.array([1.0, np.nan, 0.0]), np.zeros(3)), None,
      None, 0.2, scorers_lib.reward_columns("nanny", (), 0.0))
  monkeypatch.setattr(scorers_lib, "check_tokenizer", lambda *a, **k: None)
  monkeypatch.setattr(scorers_lib.pipeline_lib, "preference_dataset", lambda *a: _Pipeline())
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'nanny' gave a non-finite reward on d to 1 of 3 pairs "
                           r"\(first: row 8\)"):
    scorer(source, "d")


def test_scorer_specs_parse_and_reject_bad_ones():
  specs = scorers_lib.parse_specs("rm:/w/rm_a, b=rm:/w/ens@best, dpo:/w/d@200, length, gold")
  assert [(s.name, s.kind, s.path, s.step) for s in specs] == [
      ("rm_a", "rm", "/w/rm_a", "latest"), ("b", "rm", "/w/ens", "best"),
      ("d", "dpo", "/w/d", "200"), ("length", "length", "", "latest"),
      ("gold", "gold", "", "latest")]
  with pytest.raises(scorers_lib.EvalInputError, match="unknown kind 'rmm'"):
    scorers_lib.parse_specs("rmm:/x")
  with pytest.raises(scorers_lib.EvalInputError, match="names must be unique"):
    scorers_lib.parse_specs("rm:/a/x,rm:/b/x")


# ----------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def runs():
  """A trained RM, a 4-member deep ensemble and a DPO policy on the same tiny world."""
  with _private_tmp() as d:
    yield train_runs(pathlib.Path(d))


def train_runs(root: pathlib.Path) -> dict:
  rm_cfg = test_train_rm.small_config(30, num_pairs=NUM_PAIRS, batch_size=16)
  ens_cfg = test_train_rm.small_config(4, base=ensemble_tiny, num_pairs=NUM_PAIRS)
  dpo_cfg = test_train_dpo.dpo_config(steps=15)
  dpo_cfg.data.tiny_world.num_pairs = NUM_PAIRS
  return {"rm": train_rm.run(rm_cfg, str(root / "rm"))["eval"],
          "ens": train_rm.run(ens_cfg, str(root / "ens"))["eval"],
          "dpo": train_dpo.run(dpo_cfg, str(root / "dpo")).summary["final_eval"],
          "root": root}


def eval_config(scorers: str, datasets: str):
  config = eval_tiny.get_config()
  config.scorers, config.datasets = scorers, datasets
  config.num_resamples = 300
  config.mesh.update(shape=(1, 1, 1), num_devices=1)  # As the training runs evaluated.
  return config


@pytest.fixture(scope="module")
def report(runs):
  root = runs["root"]
  config = eval_config(f"rm:{root}/rm,ens=rm:{root}/ens,dpo:{root}/dpo,length,shorter,gold",
                       f"run:{root}/rm")
  workdir = root / "eval"
  return eval_rm.run(config, str(workdir)), workdir


def score_rows(workdir: pathlib.Path) -> list[dict]:
  """``scores.jsonl``: one row per scored pair."""
  return [json.loads(line) for line in (workdir / "scores.jsonl").read_text().splitlines()]


def margins(workdir: pathlib.Path, scorer: str) -> list[float]:
  """Each decisive pair's score margin (chosen − rejected) under ``scorer``."""
  return [r["scores"][scorer][0] - r["scores"][scorer][1] for r in score_rows(workdir)
          if r["outcome"] != 0.5]


def test_a_run_dataset_is_checked_against_the_data_the_run_read(runs, report):
  result, workdir = report
  check = result["datasets"][0]["run_data"]
  assert (check["status"], check["run"], check["split"]) == (
      "same", str(runs["root"] / "rm"), "resplit_validation")
  assert f"Data: the data the run {runs['root'] / 'rm'} read (" in (
      workdir / "report.md").read_text()


def test_rm_ensemble_and_dpo_match_their_trainers_own_eval(runs, report):
  section = report[0]["datasets"][0]
  m = section["metrics"]
  assert section["pairs_decisive"] == runs["rm"]["num_pairs"]
  assert m["rm"]["accuracy"]["value"] == pytest.approx(runs["rm"]["accuracy"], abs=1e-9)
  assert m["ens"]["accuracy"]["value"] == pytest.approx(runs["ens"]["accuracy"], abs=1e-9)
  for k in range(4):
    assert m[f"ens/member{k}"]["accuracy"]["value"] == pytest.approx(
        runs["ens"][f"member/{k}/accuracy"], abs=1e-9)
  assert {"ens/wco", "ens/uwo"} <= set(m)
  comparisons.assert_same_accuracy(m["dpo"]["accuracy"]["value"], runs["dpo"][
      "rewards/accuracies"], margins(report[1], "dpo"), atol=1e-6)  # a float32 metric
  # Same bins, summed in another order (Σ|Σ gaps|/n instead of Σ (n_b/n)·|mean gap|).
  assert m["rm"]["ece"]["value"] == pytest.approx(runs["rm"]["ece"], abs=1e-7)
  assert m["rm"]["bt_log_loss"]["value"] == pytest.approx(runs["rm"]["bt_log_loss"], rel=1e-6)


def test_a_run_continued_under_another_config_is_scored_as_its_step_was_trained(runs,
                                                                             tmp_path):
  """A rerun that trained on with mean pooling: config.json still says last-token pooling,
  and eval_rm rebuilt the scorer from it (0.872 against the run's own 0.754 in the
  helper's check); it now rebuilds from the config saved with the checkpoint."""
  moved = tmp_path / "rm"
  shutil.copytree(runs["root"] / "rm", moved)
  config = test_train_rm.small_config(34, num_pairs=NUM_PAIRS, batch_size=16)
  config.model.pooling = "mean"
  own = train_rm.run(config, str(moved))["eval"]
  result = eval_rm.run(eval_config(f"rm:{moved}", f"run:{moved}"), str(tmp_path / "eval"))
  accuracy = result["datasets"][0]["metrics"]["rm"]["accuracy"]["value"]
  assert accuracy == pytest.approx(own["accuracy"], abs=1e-9)


def test_an_export_with_several_outputs_is_scored_output_by_output(runs, tmp_path):
  """A K-label export (a head ensemble, objectives) got a fresh one-output head, and a
  random score, with a line in the log only."""
  run = runs["root"] / "rm"
  config = json.loads((run / "config.json").read_text())
  trained = experiment.make_model(config["model"], vocab_size=259, seed=0)
  train.load_params(run, trained)
  pair = heads.MultiHeadEnsemble(trained.trunk, 2, rngs=nnx.Rngs(0))
  kernel = trained.head.kernel[...]
  pair.head.kernel[...] = jnp.concatenate([kernel, -kernel], axis=1)  # member 1: reversed
  hf_export.save_pretrained(pair, tmp_path / "hf")
  eval_cfg = eval_config("pair=hf:" + str(tmp_path / "hf"), f"run:{run}")
  with pytest.raises(scorers_lib.EvalInputError, match=r"scorer 'pair': no tokenizer files in "
                                                       r".*; name its tokenizer with "
                                                       r"--config.hf_tokenizer=PATH"):
    eval_rm.run(eval_cfg, str(tmp_path / "no_tokenizer"))  # a byte-level export has none
  eval_cfg.hf_tokenizer = "byte"
  metrics = eval_rm.run(eval_cfg, str(tmp_path / "eval"))["datasets"][0]["metrics"]
  accuracy = runs["rm"]["accuracy"]
  for k, expected in ((0, accuracy), (1, 1 - accuracy)):
    comparisons.assert_same_accuracy(metrics[f"pair/member{k}"]["accuracy"]["value"],
                                     expected, margins(tmp_path / "eval", f"pair/member{k}"))


def test_report_names_each_checkpoint_and_the_workdir_keeps_the_config(runs, report):
  root, (result, workdir) = runs["root"], report
  assert result["checkpoints"] == {
      "rm": {"path": str(root / "rm"), "step": 30}, "ens": {"path": str(root / "ens"), "step": 4},
      "dpo": {"path": str(root / "dpo"), "step": 15}}
  assert "ens = `" + str(root / "ens") + "` step 4" in (workdir / "report.md").read_text()
  assert json.loads((workdir / "config.json").read_text())["scorers"].startswith("rm:")


def test_best_of_a_run_trained_without_best_metric_says_so(runs, tmp_path):
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'rm': .* was trained without loop.best_metric, so no "
                           r"checkpoint of it is ranked best; use @latest or @STEP"):
    eval_rm.run(eval_config(f"rm:{runs['root']}/rm@best", f"run:{runs['root']}/rm"),
                str(tmp_path / "e"))


def test_a_run_ranked_by_a_best_metric_resolves_its_steps(runs):
  """A run trained with loop.best_metric crashed eval_rm's step lookup (a local name shadowed
  the ranking module) whatever step was asked for."""
  rm_dir = str(runs["root"] / "rm")
  run = {"loop": {"best_metric": "accuracy"}}
  for step in ("latest", "30"):
    spec = scorers_lib.ScorerSpec("rm", "rm", rm_dir, step)
    assert scorers_lib._resolve_step(spec, run) == (  # pylint: disable=protected-access
        30, {"best_metric": "accuracy", "best_mode": "max"})


def test_baselines_gold_and_comparisons(report):
  section = report[0]["datasets"][0]
  m = section["metrics"]
  # Equal lengths count half for both, so the two length baselines sum to exactly 1.
  assert m["length"]["accuracy"]["value"] + m["shorter"]["accuracy"]["value"] == pytest.approx(1)
  assert m["length"]["length_controlled_accuracy"]["value"] == pytest.approx(0.5)
  assert "ece" not in m["length"]  # A character count is not a log-odds.
  assert m["gold"]["accuracy"]["value"] > 0.99  # Noise-free labels come from the gold reward.
  assert "ece" not in m["gold"]  # σ(Δ gold) is not the labels' probability either
  for name, metrics in m.items():
    acc = metrics["accuracy"]
    assert acc["low"] <= acc["value"] <= acc["high"], name
  cmp = section["comparisons"]["gold vs rm"]
  assert cmp["difference"]["value"] > 0 and 0 < cmp["p_value"] <= 1
  assert "ens/member0 vs rm" not in section["comparisons"]


def test_outputs_can_be_redrawn_from_scores_jsonl(report):
  result, workdir = report
  lines = score_rows(workdir)
  section = result["datasets"][0]
  assert len(lines) == section["pairs_scored"]
  r_c, r_r = np.array([l["scores"]["rm"] for l in lines]).T
  signed = np.where(np.array([l["outcome"] for l in lines]) >= 0.5, r_c - r_r, r_r - r_c)
  assert np.mean(preference.pair_accuracy(signed)) == pytest.approx(
      section["metrics"]["rm"]["accuracy"]["value"])
  for figure in section["figures"]:
    assert (workdir / figure).stat().st_size > 5000, figure
  text = (workdir / "report.md").read_text()
  assert "| rm |" in text and "gold vs rm" in text and section["figures"][0] in text
  assert json.loads((workdir / "report.json").read_text())["scorers"][0] == "rm"


def test_scoring_sharded_over_eight_devices_matches_one_device(runs, report, tmp_path):
  root = runs["root"]
  config = eval_config(f"rm:{root}/rm,dpo:{root}/dpo", f"run:{root}/rm")
  config.mesh.update(shape=(8, 1, 1), num_devices=8)
  eval_rm.run(config, str(tmp_path))

  def rewards(workdir):
    rows = score_rows(workdir)
    return {n: np.array([r["scores"][n] for r in rows]) for n in ("rm", "dpo")}

  sharded, single = rewards(tmp_path), rewards(report[1])
  for name in ("rm", "dpo"):
    scale = np.abs(single[name]).max()
    np.testing.assert_allclose(sharded[name], single[name], atol=1e-5 * scale, err_msg=name)


def test_compare_mode_puts_reports_side_by_side(runs, report, tmp_path, caplog):
  _, workdir = report
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  config = eval_tiny.get_config()
  config.compare = f"{workdir},{other}"
  with caplog.at_level(logging.INFO, logger="absl"):
    table = eval_rm.run(config, str(tmp_path / "cmp"))["compare"]
  path = tmp_path / "cmp" / "compare.md"
  assert f"eval_rm: 2 reports compared in {path}" in caplog.text
  assert path.read_text() == table + "\n"
  assert table.splitlines()[0] == "| dataset | scorer | eval | other |"
  rm_row = next(l for l in table.splitlines() if "| rm |" in l)
  cells = rm_row.split("|")[3:5]
  assert cells[0] == cells[1] and "[" in cells[0]
  namesake = tmp_path / "b" / workdir.name  # a/eval, b/eval: one overwrote the other
  shutil.copytree(workdir, namesake)
  config.compare = f"{workdir},{namesake}"
  header = eval_rm.run(config, str(tmp_path / "cmp2"))["compare"].splitlines()[0]
  assert header == f"| dataset | scorer | {workdir} | {namesake} |"


def test_subsets_of_a_jsonl_benchmark(tmp_path, caplog):
  rows = [{"prompt": f"q{i}", "chosen": "good answer" * (1 + i % 3), "rejected": "bad",
           "meta": {"category": "chat" if i % 4 else "safety"}} for i in range(40)]
  rows += [{"prompt": f"t{i}", "chosen": "a tie", "rejected": "b tie", "outcome": 0.5,
            "meta": {"category": "ties"}} for i in range(3)]  # no accuracy: named, not lost
  path = tmp_path / "bench.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows))
  config = eval_config("length,shorter", f"jsonl:{path}")  # Its one split, "train".
  config.subset_field = "category"
  with caplog.at_level(logging.WARNING, logger="absl"):
    section = eval_rm.run(config, str(tmp_path / "eval"))["datasets"][0]
  assert "subsets ['ties'] hold only ties" in caplog.text
  m = section["metrics"]["length"]
  assert set(m["subsets"]) == {"chat", "safety"}
  assert m["accuracy"]["value"] == 1.0 and m["subset_mean"]["value"] == 1.0
  assert section["metrics"]["shorter"]["subset_mean"]["value"] == 0.0


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def length_pair(i: int, chosen_longer: bool) -> dict:
  long, short = " a long answer", " no"
  return {"prompt": f"q{i}", "chosen": long if chosen_longer else short,
          "rejected": short if chosen_longer else long}


def train_on_jsonl(path: pathlib.Path, workdir: pathlib.Path) -> dict:
  """A one-step tiny RM run whose train and eval split are the whole file."""
  config = test_train_rm.small_config(1)
  config.data.update(name=f"jsonl:{path}", train_split="train", eval_split="train")
  return train_rm.run(config, str(workdir))


def test_pairs_without_the_subset_field_are_the_none_subset_in_both_evals(tmp_path, caplog):
  # length is right on subset a, right on half of b, wrong on the 4 rows without a subset.
  rows = [dict(length_pair(i, True), meta={"subset": "a"}) for i in range(12)]
  rows += [dict(length_pair(i, i % 2 == 0), meta={"subset": "b"}) for i in range(12, 24)]
  rows += [length_pair(i, False) for i in range(24, 28)]
  run = train_on_jsonl(write_jsonl(tmp_path / "bench.jsonl", rows), tmp_path / "rm")["eval"]
  config = eval_config(f"rm:{tmp_path}/rm,length", f"run:{tmp_path}/rm")
  section = eval_rm.run(config, str(tmp_path / "eval"))["datasets"][0]
  length, rm = section["metrics"]["length"], section["metrics"]["rm"]
  assert {k: v["value"] for k, v in length["subsets"].items()} == {
      "a": 1.0, "b": 0.5, "(none)": 0.0}
  assert length["subset_mean"]["value"] == 0.75  # (none) is no category: (1 + 0.5) / 2.
  for name in ("a", "b", "(none)"):  # eval_rm and train_rm's evaluator agree.
    assert rm["subsets"][name]["value"] == pytest.approx(run[f"accuracy/subset/{name}"],
                                                         abs=1e-9)
  assert section["pairs_without_subset"] == 4
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  said = "4 of 28 pairs have no meta.subset; they form the subset '(none)'"
  assert f"eval split: {said}" in warnings
  assert f"dataset run:rm@train: {said}" in warnings
  assert ("**Warning:** 4 of 28 pairs have no meta.subset: they are the subset (none), left "
          "out of the category-weighted mean.") in (tmp_path / "eval" / "report.md").read_text()


def test_a_run_dataset_whose_file_changed_since_training_is_flagged(tmp_path, caplog):
  rows = [length_pair(i, True) for i in range(40)]
  path = write_jsonl(tmp_path / "data.jsonl", rows)
  train_on_jsonl(path, tmp_path / "rm")
  config = eval_config("length", f"run:{tmp_path}/rm")
  before = eval_rm.run(config, str(tmp_path / "e1"))["datasets"][0]
  assert before["run_data"]["status"] == "same"
  assert before["metrics"]["length"]["accuracy"]["value"] == 1.0
  swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows[:10]]
  write_jsonl(path, swapped + rows[10:])
  after = eval_rm.run(config, str(tmp_path / "e2"))["datasets"][0]
  assert after["metrics"]["length"]["accuracy"]["value"] == 0.75
  check = after["run_data"]
  assert (check["status"], check["files"]) == ("changed", [str(path)])
  said = (f"NOT the data the run {tmp_path}/rm read: split 'train' of {path} changed since "
          "then (by its data_report.json; rows read when the run started 40, "
          "now 40; built then 40, now 40), so these are not the run's own eval numbers")
  assert check["message"] == said
  assert f"dataset run:rm@train: {said}" in [r.getMessage() for r in caplog.records]
  assert f"**Warning:** Data: {said}." in (tmp_path / "e2" / "report.md").read_text()
  report_path = tmp_path / "rm" / "data_report.json"  # As written before the fingerprint:
  legacy = {k: {f: v for f, v in r.items() if f != "fingerprint"} if isinstance(r, dict) else r
            for k, r in json.loads(report_path.read_text()).items()}
  report_path.write_text(json.dumps(legacy))  # compared by its scan_key.
  assert eval_rm.run(config, str(tmp_path / "e4"))["datasets"][0]["run_data"]["status"] == (
      "changed")
  write_jsonl(path, rows)
  assert eval_rm.run(config, str(tmp_path / "e5"))["datasets"][0]["run_data"]["status"] == (
      "same")
  (tmp_path / "rm" / "data_report.json").unlink()  # As in a run older than data reports.
  check = eval_rm.run(config, str(tmp_path / "e3"))["datasets"][0]["run_data"]
  assert (check["status"], check["why"]) == (
      "unchecked", f"{tmp_path}/rm has no data_report.json")


def test_rows_skipped_as_bad_are_counted_in_both_reports(tmp_path):
  good = [{"prompt": f"q{i}", "chosen": " yes" * (i + 1), "rejected": " no"} for i in range(11)]
  good[0]["outcome"] = 0.5
  bad = [json.dumps({"prompt": "Q", "chosen": " yes"})] * 5 + [
      "{not json", json.dumps({"prompt": "Q", "chosen": "", "rejected": " x"})]
  path = tmp_path / "bench.jsonl"
  path.write_text("\n".join([json.dumps(r) for r in good] + bad))
  config = eval_config("length", f"jsonl:{path}")
  config.on_bad_row = "skip"
  eval_rm.run(config, str(tmp_path / "eval"))
  section = json.loads((tmp_path / "eval" / "report.json").read_text())["datasets"][0]
  counts = section["source_counts"]
  assert (counts["rows_read"], counts["rows_skipped"], counts["rows_built"]) == (18, 7, 11)
  assert counts["skipped_by_reason"] == {"missing_field": 5, "malformed_json": 1,
                                         "empty_response": 1}
  assert (section["pairs_scored"], section["ties_left_out"], section["pairs_decisive"]) == (
      11, 1, 10)
  assert ("Rows: 18 read; 7 skipped as bad rows (on_bad_row=skip: missing_field 5, "
          f"malformed_json 1, empty_response 1; first at {path}:12); 11 built; 11 pairs "
          "scored, 1 tie left out: 10 decisive pairs in the metrics (preferred response "
          "longer in 100%).") in (tmp_path / "eval" / "report.md").read_text()


# ----------------------------------------------------------------------------- bad input


def test_a_workdir_without_a_checkpoint_is_named(tmp_path):
  bare = tmp_path / "no_ckpt"
  bare.mkdir()
  (bare / "config.json").write_text(json.dumps(test_train_rm.small_config(1).to_dict()))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=f"scorer 'no_ckpt': {bare} has no checkpoint"):
    eval_rm.run(eval_config(f"rm:{bare}", "pandalm@test"), str(tmp_path / "e1"))
  with pytest.raises(scorers_lib.EvalInputError, match="has no config.json"):
    eval_rm.run(eval_config(f"rm:{tmp_path}", "pandalm@test"), str(tmp_path / "e2"))
  with pytest.raises(scorers_lib.EvalInputError, match=f"{tmp_path}/no_ckt does not exist"):
    eval_rm.run(eval_config(f"rm:{tmp_path}/no_ckt", "pandalm@test"), str(tmp_path / "e3"))
  # A failed run writes no config.json: a previous one stays beside its report.
  assert not (tmp_path / "e1" / "config.json").exists()


def test_a_dpo_run_whose_reference_changed_since_is_refused(runs, tmp_path):
  """The dpo: scorer rebuilds the reference from the run's config: other weights there
  (an SFT export overwritten since) gave another accuracy without a word."""
  run = tmp_path / "dpo"
  shutil.copytree(runs["root"] / "dpo", run)
  recorded = json.loads((run / "reference.json").read_text())
  assert recorded["weights"].startswith("params:")  # the policy's init, rebuilt from the seed
  eval_rm.run(eval_config(f"dpo:{run}", "pandalm@test"), str(tmp_path / "same"))
  (run / "reference.json").write_text(json.dumps({**recorded, "weights": "params:other"}))
  with pytest.raises(scorers_lib.EvalInputError,
                     match=r"scorer 'dpo': the reference weights changed since .* trained "
                           r"against them \(recorded params:other"):
    eval_rm.run(eval_config(f"dpo:{run}", "pandalm@test"), str(tmp_path / "changed"))
  # train_dpo resuming in that workdir refuses too.
  config = json.loads((run / "config.json").read_text())
  with pytest.raises(ValueError, match=r"train_dpo: the reference weights changed"):
    train_dpo.run(ml_collections.ConfigDict(config), str(run))
