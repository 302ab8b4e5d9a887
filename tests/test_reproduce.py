"""The overoptimization study end to end at smoke-test size, and its criteria on known curves."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs.reproduce import full
from experiments import reproduce
from prefjax.overopt import bon
from prefjax.overopt import criteria
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import fits

CRITERIA = ("G0", "G1", "G2", "G3", "G5", "R1", "R2", "R3", "R4", "C1", "C2", "C3",
            "D1", "D2", "D3", "P1", "P1_kl_matched", "P1_rloo", "P1_kl_matched_rloo",
            # The text world carries R2, D1, D2 and P1; the bandit world's are kept beside.
            "R2-bandit", "D1-bandit", "D2-bandit", "P1-bandit", "P1_kl_matched-bandit",
            "G1-text", "G2-text", "G3-text", "R4-text")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reproduce"))
  # Two pooled worlds and the direct-alignment sweeps: every stage of the study, tiny.
  return workdir, reproduce.run(full.get_config("tiny"), workdir)


def test_report_schema_figures_and_g0(tiny_run):
  workdir, report = tiny_run
  with open(os.path.join(workdir, "report.json")) as f:
    on_disk = json.load(f)
  assert set(CRITERIA) <= set(on_disk["criteria"])
  for name, entry in on_disk["criteria"].items():
    assert {"pass", "value", "threshold", "figure", "world"} <= set(entry), name
    assert isinstance(entry["pass"], bool)
    assert os.path.getsize(os.path.join(workdir, entry["figure"])) > 5_000, name
  assert on_disk["world_seeds"] == [0, 1] and on_disk["wall_s"] > 0
  assert set(on_disk["per_world"]) == {"0", "1"}
  assert {"bon_drop_z", "rl_drop_z", "rl_peak_beta"} <= set(on_disk["per_world"]["0"]["w4"])
  assert "experiments.reproduce" in on_disk["command"]
  # G0 must hold at any size: exact best-of-n, the unbiased estimator and Monte Carlo agree.
  assert on_disk["criteria"]["G0"]["pass"], on_disk["criteria"]["G0"]
  markdown = open(os.path.join(workdir, "report.md")).read()
  for name in CRITERIA:
    assert f"### {name} — " in markdown
  assert markdown.count("![") >= len(CRITERIA)
  assert report["criteria"].keys() == on_disk["criteria"].keys()
  # One verdict per criterion, from the world that carries it (the text world carries D1).
  assert on_disk["verdicts"]["D1"]["carried_by"] == "text"
  assert on_disk["verdicts"]["D1"]["pass"] == on_disk["criteria"]["D1"]["pass"]
  assert on_disk["verdicts"]["R2"]["by_world"] == {
      "bandit": on_disk["criteria"]["R2-bandit"]["pass"], "text": on_disk["criteria"]["R2"]["pass"]}
  assert on_disk["verdicts"]["G1"]["carried_by"] == "bandit"
  assert "## Verdict by criterion" in markdown


def test_verdicts_name_the_carrying_world():
  from prefjax.overopt import report as report_lib
  found = [criteria.Criterion("R2", False, 0, 0, ""),
           criteria.Criterion("R2-text", True, 0, 0, "", world="text"),
           criteria.Criterion("D1", True, 0, 0, "", world="text"),
           criteria.Criterion("D1-bandit", False, 0, 0, "", world="bandit (first world)"),
           criteria.Criterion("G1-hh", False, 0, 0, "", world="hh"),
           criteria.Criterion("P1_rloo", False, 0, 0, "", world="text")]
  v = report_lib.verdicts(found)
  assert v["R2"] == {"carried_by": "bandit", "pass": False,
                     "by_world": {"bandit": False, "text": True}}
  assert v["D1"]["carried_by"] == "text" and v["D1"]["pass"]
  assert v["G1"] == {"carried_by": "hh", "pass": False, "by_world": {"hh": False}}
  line = report_lib.verdict_line(found)
  assert line == ("1/3 criteria pass in the world carrying them (failed: R2, G1); "
                  "extra tests: 0/1 pass (failed: P1_rloo)")
  table = report_lib.verdict_table(found)
  assert "| R2 | bandit | FAIL | text: PASS |" in table
  assert "| P1_rloo (extra) | text | FAIL | – |" in table


def test_rerun_reuses_trained_proxies(tiny_run, monkeypatch):
  workdir, report = tiny_run
  from prefjax.overopt import bandit
  monkeypatch.setattr(bandit, "train_proxies",
                      lambda *a, **k: pytest.fail("proxies retrained on rerun"))
  again = reproduce.run(full.get_config("tiny"), workdir)
  for name in CRITERIA:  # Same proxies and seeds: the same numbers, bit for bit.
    assert again["criteria"][name]["value"] == report["criteria"][name]["value"], name


def _curve(d: np.ndarray, gold: np.ndarray, *, noise: float = 0.01, prompts: int = 32,
           seed: int = 0) -> bon.Curve:
  rng = np.random.default_rng(seed)
  per_prompt = gold[None] + noise * rng.standard_normal((prompts, len(d)))
  per_kl = np.broadcast_to(d**2, per_prompt.shape)
  proxy = np.broadcast_to(2.0 * d, per_prompt.shape)  # keeps rising, like a proxy under BoN
  return bon.summarize(np.arange(len(d)), per_kl, proxy, per_prompt, num_bootstrap=200)


def _setting(label: str, alpha: float, beta: float) -> curves_lib.SettingCurves:
  d = np.linspace(0.0, 3.0, 25)
  curve = _curve(d, d * (alpha - beta * d))
  fit = fits.fit_bon(np.sqrt(curve.kl), curve.gold, per_prompt_gold=curve.per_prompt_gold,
                     num_bootstrap=50)
  return curves_lib.SettingCurves(label, curve, curve, [curve], fit,
                                  fits.fit_rl(np.sqrt(curve.kl), curve.gold, num_bootstrap=50))


def test_size_criteria_on_known_curves():
  # Larger "proxies" overoptimise less: β falls and the peak rises with size.
  good = [_setting(f"w{w}", 1.0, b) for w, b in ((4, 0.5), (8, 0.4), (16, 0.3), (32, 0.2))]
  assert criteria.g3([4, 8, 16, 32], good, "").passed
  assert not criteria.g3([4, 8, 16, 32], good[::-1], "").passed
  assert criteria.g2(good, "").passed
  declining = criteria.g1(good[:2], "")
  assert declining.passed, declining.detail          # peak at d = 1, then falls to d = 3
  flat = [_setting("w4", 1.0, 0.01)]                  # peak beyond the last point
  assert not criteria.g1(flat, "").passed


def test_ensemble_criteria_on_known_curves():
  single = _setting("single", 1.0, 0.5)
  better = {k: _setting(k, 1.0, 0.05) for k in ("mean", "wco", "uwo")}
  assert criteria.c1(single, better, "").passed
  assert not criteria.c1(single, {k: single for k in better}, "").passed
  growth = {"mean": np.full((16, 3), 0.5), "uwo": np.full((16, 3), 0.1)}
  growth["mean"] += np.random.default_rng(0).normal(0, 0.01, (16, 3))
  assert criteria.c3(growth, "").passed
  assert not criteria.c3({"mean": growth["uwo"], "uwo": growth["mean"]}, "").passed


def test_estimator_criterion_is_bonferroni_corrected():
  check = {"ns": [1, 2, 4], "z_unbiased_vs_exact": 2.9, "z_mc_vs_exact": 0.5,
           "max_kl_minus_bound": 0.0}
  ok = criteria.g0([], [check, check], "")
  assert ok.passed and ok.value["comparisons"] == 12
  assert ok.threshold["max_abs_z"] == pytest.approx(3.34, abs=0.01)  # Φ⁻¹(1 − 0.01/24)
  assert not criteria.g0([], [dict(check, z_mc_vs_exact=3.5)], "").passed
  assert not criteria.g0([], [dict(check, max_kl_minus_bound=1e-3)], "").passed


def test_p1_expectation_names_each_worlds_rl_reference():
  from prefjax.overopt import report as report_lib
  assert "PPO" in report_lib.expected("P1", "text")
  assert "exact KL-regularised optimum" in report_lib.expected("P1-bandit", "bandit (first world)")
  assert "RLOO" in report_lib.expected("P1_rloo", "text")


def test_p1_compares_with_ppo_when_the_world_ran_it():
  from prefjax.overopt import text_report
  assert text_report.p1_reference(["rloo", "ppo"]) == "ppo"
  assert text_report.p1_reference(["rloo"]) == "rloo"
