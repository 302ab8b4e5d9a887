"""The overoptimization study end to end at smoke-test size, and its criteria on known curves."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs.reproduce import full
from configs.reproduce import quick
from experiments import reproduce
from prefjax.overopt import bon
from prefjax.overopt import criteria
from prefjax.overopt import curves as curves_lib
from prefjax.overopt import figures
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
  assert "(bandit (first world))" in markdown and " world world)" not in markdown
  assert markdown.count("![") >= len(CRITERIA)
  assert report["criteria"].keys() == on_disk["criteria"].keys()
  # One verdict per criterion, from the world that carries it (the text world carries D1).
  assert on_disk["verdicts"]["D1"]["carried_by"] == "text"
  assert on_disk["verdicts"]["D1"]["pass"] == on_disk["criteria"]["D1"]["pass"]
  assert on_disk["verdicts"]["R2"]["by_world"] == {
      "bandit": on_disk["criteria"]["R2-bandit"]["pass"], "text": on_disk["criteria"]["R2"]["pass"]}
  assert on_disk["verdicts"]["G1"]["carried_by"] == "bandit"
  assert "## Verdict by criterion" in markdown
  # Each world's criteria on its own curves: G1 reads the world's drop that per_world shows.
  bandit_names = {"G0", "G1", "G2", "G3", "G5", "R1", "R2", "R3", "R4", "C1", "C2", "C3"}
  assert set(on_disk["criteria_by_world"]) == {"bandit"}  # one text world: nothing to split
  assert set(on_disk["criteria_by_world"]["bandit"]) == {"0", "1"}
  for seed in ("0", "1"):
    own = on_disk["criteria_by_world"]["bandit"][seed]
    # Named as the pooled bandit criteria are: the text world carries R2, so the bandit's
    # is R2-bandit here too (a script joining the two on "R2" read the text world's).
    assert set(own) == (bandit_names - {"R2"}) | {"R2-bandit"}
    assert set(own) <= set(on_disk["criteria"])
    assert own["G1"]["value"][0]["drop"] == pytest.approx(
        on_disk["per_world"][seed]["w4"]["bon_drop"], rel=1e-9)
  assert "## The bandit criteria world by world" in markdown
  assert "| G1 | " in markdown.split("world by world")[1]


def test_world_table_and_line_set_each_world_beside_the_pooled_verdict():
  from prefjax.overopt import report as report_lib
  crit = lambda name, ok, world="bandit": criteria.Criterion(name, ok, None, None, "", "", world)
  found = [crit("G1", True), crit("G2", True), crit("R2-bandit", True), crit("R2", False, "text"),
           crit("D1", True)]  # D1: the first world only, not evaluated world by world
  by_world = {0: [crit("G1", True), crit("G2", False), crit("R2", True)],
              3: [crit("G1", True), crit("G2", False), crit("R2", False)]}
  assert report_lib.world_table(found, by_world) == [
      "| criterion | pooled | world 0 | world 3 |", "|---|---|---|---|",
      "| G1 | PASS | PASS | PASS |", "| G2 | PASS | FAIL | FAIL |", "| R2 | PASS | PASS | FAIL |"]
  assert report_lib.world_line(found, by_world) == (
      "1 of the 3 bandit criteria that pass pooled pass in each of the 2 worlds; failing in "
      "some world: G2 (world 0, 3), R2-bandit (world 3)")


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


def test_the_ensembles_train_on_the_sizes_sweeps_number_of_pairs(tiny_run):
  """They took ProxyConfig's default (10,000) whatever sizes.num_pairs said: 500 in tiny."""
  _, report = tiny_run
  by_setting = {(p["world"], p["setting"]): p for p in report["proxies"]}
  for world in (0, 1):
    single, ensemble = by_setting[world, "w16"], by_setting[world, "w16_noise0"]
    assert single["num_pairs"] == ensemble["num_pairs"] == 500
    assert single["gold_accuracy"] == ensemble["gold_accuracy"]  # the same proxies


def test_the_proxy_cache_is_keyed_by_the_code_that_trains_the_proxies(monkeypatch, tmp_path):
  """Keyed by bandit.py alone, an edit of the proxies' network (policy_net.py), loss or
  train step served the proxies the old code trained."""
  import inspect
  from prefjax import files
  from prefjax.overopt import policy_net, study
  before = files.source_digest(*study.PROXY_SOURCES)
  edited = tmp_path / "policy_net.py"
  edited.write_text(open(inspect.getfile(policy_net)).read() + "\n# edited\n")
  getfile = inspect.getfile
  monkeypatch.setattr(inspect, "getfile",
                      lambda m: str(edited) if m is policy_net else getfile(m))
  assert files.source_digest(*study.PROXY_SOURCES) != before


def test_rerun_reuses_trained_proxies(tiny_run, monkeypatch):
  workdir, report = tiny_run
  from prefjax.overopt import bandit
  monkeypatch.setattr(bandit, "train_proxies",
                      lambda *a, **k: pytest.fail("proxies retrained on rerun"))
  again = reproduce.run(full.get_config("tiny"), workdir)
  for name in CRITERIA:  # Same proxies and seeds: the same numbers, bit for bit (NaN too).
    np.testing.assert_equal(again["criteria"][name]["value"],
                            report["criteria"][name]["value"], err_msg=name)


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
                                  fits.fit_rl(np.sqrt(curve.kl), curve.gold,
                                              per_prompt_gold=curve.per_prompt_gold,
                                              num_bootstrap=50))


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


def test_fit_figure_draws_each_beta_in_its_own_units(tmp_path, monkeypatch):
  """Best-of-n's β (per nat) and RL's (per √nat) shared one axis labelled "β"."""
  drawn = []
  monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
  settings = [_setting(f"w{w}", 1.0, b) for w, b in ((4, 0.5), (8, 0.3))]
  figures.fit_coefficients([4, 8], settings, str(tmp_path / "f.png"), xlabel="width", title="t")
  panels = {ax.get_ylabel(): ax for ax in drawn[0].axes}
  assert list(panels) == ["α (gain per √nat)", "best-of-n β (per nat, in d(α − β·d))",
                          "RL β (per √nat, in d(α − β·ln d))"]
  plotted = lambda ax: [line.get_ydata() for line in ax.lines  # one per method, labelled
                        if not line.get_label().startswith("_")]
  bon_beta = plotted(panels["best-of-n β (per nat, in d(α − β·d))"])
  rl_beta = plotted(panels["RL β (per √nat, in d(α − β·ln d))"])
  assert len(bon_beta) == len(rl_beta) == 1 and len(plotted(panels["α (gain per √nat)"])) == 2
  np.testing.assert_allclose(bon_beta[0], [s.fit_bon.beta for s in settings])
  np.testing.assert_allclose(rl_beta[0], [s.fit_rl.beta for s in settings])


def test_fit_figure_bars_span_the_interval_even_when_it_excludes_the_estimate(
    tmp_path, monkeypatch):
  """A percentile interval can miss its estimate; |ci − value| then drew a wrong bar."""
  drawn = []
  monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
  settings = [_setting(f"w{w}", 1.0, b) for w, b in ((4, 0.5), (8, 0.3))]
  settings[0] = settings[0]._replace(fit_bon=settings[0].fit_bon._replace(beta_ci=(0.6, 0.9)))
  figures.fit_coefficients([4, 8], settings, str(tmp_path / "f.png"), xlabel="width", title="t")
  ax = {ax.get_ylabel(): ax for ax in drawn[0].axes}["best-of-n β (per nat, in d(α − β·d))"]
  (bars,) = ax.containers
  (segments,) = bars.lines[2]
  spans = np.array([np.sort(seg[:, 1]) for seg in segments.get_segments()])
  np.testing.assert_allclose(spans, [(0.6, 0.9), settings[1].fit_bon.beta_ci])


def test_learned_policy_figure_labels_each_lambda_and_keeps_its_markers_inside(
    tmp_path, monkeypatch):
  """λ = 0.3 sat on the left frame, unlabelled, its markers half clipped (ticks at 0.5, 1)."""
  drawn = []
  monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
  rows = [dict(lam=lam, closed_form_kl=kl, learned_kl=kl, closed_form_gold=g, learned_gold=g)
          for lam, kl, g in ((1.0, 3.4, 1.2), (0.3, 7.9, 1.8))]
  figures.learned_policy(rows, str(tmp_path / "lp.png"))
  for ax in drawn[0].axes:
    low, high = ax.get_xlim()
    assert low < 0.3 * 0.8 and high > 1.0 * 1.2, (low, high)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.3", "1"]


def test_the_criteria_bootstrap_as_many_resamples_as_the_config_asks():
  """bandit.num_bootstrap reached the fits and figures, but G1, R2, C1 and C3 drew 1000
  resamples whatever it said. (A drop's SE is now its per-prompt SD over √P, so G1 and R2
  show the resamples in their critical z; C1's decline z draws none, and its gain's SE is
  ``paired_difference``'s, which C3 shows.)"""
  good = [_setting(f"w{w}", 1.0, b) for w, b in ((4, 0.5), (8, 0.4))]
  growth = {"mean": np.random.default_rng(0).normal(0.5, 0.1, (16, 3)),
            "uwo": np.full((16, 3), 0.1)}
  for num in (30, 400):
    ses = [[r["critical_z"] for r in criteria.g1(good, "", num_bootstrap=num).value],
           [r["critical_z"] for r in criteria.r2(good, "", num_bootstrap=num).value],
           criteria.c3(growth, "", num_bootstrap=num).value["se"]]
    assert ses == [[r["critical_z"] for r in criteria.g1(good, "", num_bootstrap=num).value],
                   [r["critical_z"] for r in criteria.r2(good, "", num_bootstrap=num).value],
                   criteria.c3(growth, "", num_bootstrap=num).value["se"]]  # seeded
    if num == 30:
      few = ses
  for a, b in zip(few, ses):
    assert a != b


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
  # A NaN z (a world of one prompt) fails wherever it is: max() skipped a later NaN.
  nan = dict(check, z_mc_vs_exact=float("nan"))
  assert not criteria.g0([], [check, nan], "").passed
  assert not criteria.g0([], [nan, check], "").passed


def test_p1_expectation_names_each_worlds_rl_reference():
  from prefjax.overopt import report as report_lib
  assert "PPO" in report_lib.expected("P1", "text")
  assert "exact KL-regularised optimum" in report_lib.expected("P1-bandit", "bandit (first world)")
  assert "RLOO" in report_lib.expected("P1_rloo", "text")


def test_p1_compares_with_ppo_when_the_world_ran_it():
  from prefjax.overopt import text_report
  assert text_report.p1_reference(["rloo", "ppo"]) == "ppo"
  assert text_report.p1_reference(["rloo"]) == "rloo"


# --------------------------------------------------------------------------- config checks


def _with(config, **fields):
  """``config`` with dotted fields replaced: ``_with(c, **{"bandit.smallest": 0})``."""
  for path, value in fields.items():
    *parents, last = path.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[last] = value
  return config


@pytest.mark.parametrize("module,variants", [
    ("quick", (None, "tiny")), ("full", (None, "tiny")),
    ("smollm2_hh", (None, "quick", "tiny"))])
def test_config_check_accepts_every_shipped_config_and_variant(module, variants):
  import importlib
  from prefjax.overopt import study_config
  get_config = importlib.import_module(f"configs.reproduce.{module}").get_config
  for variant in variants:
    study_config.check(get_config(variant))
    study_config.check(_with(get_config(variant), **{"text.enabled": True}))


def test_direct_study_needs_as_many_betas_as_d1_compares_fits_on():
  """Two β were accepted ("D1 fits them with the reference"); D1 is not evaluable on them."""
  from configs.reproduce import quick
  from prefjax.overopt import study_config
  config = _with(quick.get_config("tiny"),
                 **{"bandit.direct.enabled": True, "bandit.direct.num_betas": 2})
  with pytest.raises(ValueError, match=r"bandit.direct.num_betas must be an integer >= 3 \(D1"):
    study_config.check(config)


@pytest.mark.parametrize("field,value,message", [
    ("bandit.smallest", 0, r"bandit.smallest must be an integer in \[1, 3\]"),
    ("bandit.smallest", -1, r"bandit.smallest must be an integer in \[1, 3\]"),
    ("bandit.smallest", 10, r"bandit.smallest must be an integer in \[1, 3\]"),
    ("bandit.data.n_fixed", -5, r"bandit.data.n_fixed must be an integer in \[1, 200\]"),
    ("bandit.data.n_fixed", 201, r"bandit.data.n_fixed must be an integer in \[1, 200\]"),
    ("bandit.world_seeds", (), r"bandit.world_seeds needs at least 1 value"),
    ("bandit.sizes.widths", (), r"bandit.sizes.widths needs at least 1 value"),
    ("bandit.sizes.widths", (16, 4), r"bandit.sizes.widths must be in increasing order"),
    ("bandit.bon.num_ns", 0, r"bandit.bon.num_ns must be an integer >= 3"),
    ("bandit.rl.beta_min", -1.0, r"bandit.rl.beta_min must be a finite number > 0"),
    ("bandit.rl.beta_max", 0.001, r"bandit.rl.beta_max must be a finite number > 0.01"),
    ("bandit.seeds", 0, r"bandit.seeds must be an integer >= 1"),
    ("bandit.num_bootstrap", 1, r"bandit.num_bootstrap must be an integer >= 2"),
    ("bandit.ensembles.uwo_lambda", -1.0, r"bandit.ensembles.uwo_lambda must be .* >= 0"),
    ("bandit.ensembles.label_noise", (0.5,), r"bandit.ensembles.label_noise must hold .*"
                                             r"in \[0.0, 0.5\)"),
    ("bandit.data.num_pairs", (500,), r"bandit.data.num_pairs needs at least 2 values"),
    ("bandit.estimator.ns", (1, 128), r"bandit.estimator.ns must hold integers in \[1, 64\]"),
    ("bandit.world.num_prompts", 1, r"bandit.world.num_prompts must be >= 2"),
    ("bandit.world.tail_df", 2.0, r"bandit.world.tail_df=2.0 must be > 2"),
    ("bandit.proxy.batch_size", 300, r"bandit.proxy.batch_size=300 exceeds num_pairs=200 "
                                     r"\(the proxies of bandit.data"),
    ("bandit.learned_policy.policy.steps", 0, r"bandit.learned_policy.policy: .*steps=0"),
    ("text.bon.num_points", 0, r"text.bon.num_points must be an integer >= 3"),
    ("text.rl.widths", (32,), r"text.rl.widths must be among text.proxy.widths \(8, 16\)"),
    ("text.proxy.widths", (16, 8), r"text.proxy.widths must"),  # G1-text reads the first two
    ("text.dpo.eval_every", 5, r"text.dpo.eval_every must be an integer in \[1, 4\]"),
    # These failed minutes in, after the bandit world, naming no field:
    ("text.rl.frontier_algorithms", ("ppo2",), r"text.rl.frontier_algorithms: 'ppo2' is not one "
                                               r"of \('ppo', 'rloo'"),
    ("text.rl.algorithm", "a2c", r"text.rl.algorithm: 'a2c' is not one of"),
    ("text.world.gold", "teachr", r"text.world: gold must be one of \('char_mean', 'teacher'\)"),
    ("text.world.repeat_threshold", 2.0, r"text.world.repeat_threshold must be .* in \(0.0, 1.0\]"),
    ("text.dpo.losses", ("dpo", "ipo2"), r"text.dpo.losses: unknown direct loss 'ipo2'"),
])
def test_config_check_names_the_field_and_its_range(field, value, message):
  from configs.reproduce import quick
  from prefjax.overopt import study_config
  config = _with(quick.get_config("tiny"), **{"text.enabled": True, field: value})
  with pytest.raises(ValueError, match=message):
    study_config.check(config)


def test_config_check_of_the_direct_stage():
  from prefjax.overopt import study_config
  config = _with(full.get_config("tiny"), **{"bandit.direct.kl_range": (2.0, 0.1)})
  with pytest.raises(ValueError, match=r"bandit.direct.kl_range must be \(low, high\)"):
    study_config.check(config)
  config = _with(full.get_config("tiny"), **{"bandit.direct.d3.eval_every": 41})
  with pytest.raises(ValueError, match=r"bandit.direct.d3.eval_every must be an integer in "
                                       r"\[1, 40\]"):
    study_config.check(config)
  config = _with(full.get_config("tiny"), **{"bandit.direct.num_pairs": 200})
  with pytest.raises(ValueError, match=r"bandit.direct.num_pairs must be an integer >= 256 "
                                       r"\(the sweeps' batch size"):
    study_config.check(config)


def test_the_direct_stage_trains_its_own_proxy_on_its_own_pair_count(monkeypatch):
  """P1's RL reference reused the size sweep's proxy of that width whatever
  bandit.direct.num_pairs said, though the DPO sweeps trained on that many pairs."""
  from prefjax.overopt import study
  trained, used = [], []

  class World:
    world, seed, scores = None, 0, {"w16": ["size-sweep proxy"]}

    def proxies(self, label, **overrides):
      trained.append((label, overrides))
      self.scores[label] = [f"proxy of {overrides['num_pairs']} pairs"]
      return self.scores[label]

  monkeypatch.setattr(study, "direct_study_results",
                      lambda world, proxy, cfg, betas: used.append(proxy))
  for num_pairs in (500, 300):
    config = _with(full.get_config("tiny"), **{"bandit.direct.num_pairs": num_pairs,
                                               "bandit.direct.proxy_width": 16,
                                               "bandit.sizes.num_pairs": 500,
                                               "bandit.learned_policy.enabled": False})
    study._first_world_extras(config.bandit, World(), None, None)  # pylint: disable=protected-access
  assert used == ["size-sweep proxy", "proxy of 300 pairs"]
  assert trained == [("w16_pairs300", {"width": 16, "num_pairs": 300})]


def test_run_checks_the_config_before_writing_anything(tmp_path):
  config = _with(quick.get_config("tiny"), **{"bandit.world_seeds": ()})
  with pytest.raises(ValueError, match="bandit.world_seeds"):
    reproduce.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
  # Nothing to run (another binary's config, or the text world off with no bandit) wrote
  # an empty report and removed the previous run's figures, exit 0.
  nothing = _with(quick.get_config("tiny"), **{"text.enabled": False})
  nothing.bandit = None
  with pytest.raises(ValueError, match="nothing to run"):
    reproduce.run(nothing, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_failed_rerun_keeps_the_previous_config_and_report(tmp_path, monkeypatch):
  from prefjax.overopt import study
  for name, text in (("config.json", '{"old": 1}\n'), ("report.json", '{"figures": {}}\n'),
                     ("report.md", "old\n")):
    (tmp_path / name).write_text(text)

  def fail(*args, **kwargs):
    raise RuntimeError("the study failed")

  monkeypatch.setattr(study, "run_bandit_study", fail)
  with pytest.raises(RuntimeError, match="the study failed"):
    reproduce.run(quick.get_config("tiny"), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == '{"old": 1}\n'
  assert (tmp_path / "report.md").read_text() == "old\n"


def test_publish_figures_replaces_the_study_figures_and_keeps_the_users(tmp_path):
  figures_dir, staging = tmp_path / "figures", tmp_path / ".figures.partial"
  figures_dir.mkdir()
  staging.mkdir()
  for name in ("gao_fig1_sizes.png", "learned_policy.png", "my_notes.png"):
    (figures_dir / name).write_text("old")
  (staging / "gao_fig1_sizes.png").write_text("new")
  (tmp_path / "report.json").write_text(json.dumps({"figures": {
      "gao_fig1": "figures/gao_fig1_sizes.png", "learned_policy": "figures/learned_policy.png",
      "elsewhere": "my_notes.png"}}))
  reproduce.publish_figures(str(tmp_path), str(staging),
                            {"gao_fig1": "figures/gao_fig1_sizes.png"})
  assert sorted(os.listdir(figures_dir)) == ["gao_fig1_sizes.png", "my_notes.png"]
  assert (figures_dir / "gao_fig1_sizes.png").read_text() == "new"
  assert (figures_dir / "my_notes.png").read_text() == "old"
  assert not staging.exists()


# --------------------------------------------------------------------------- criteria details


def test_smallest_settings_must_not_be_empty():
  from prefjax.overopt import report as report_lib
  from prefjax.overopt import study
  with pytest.raises(ValueError, match="g1: need at least one setting"):
    criteria.g1([], "")
  with pytest.raises(ValueError, match="r2: need at least one setting"):
    criteria.r2([], "")
  sizes = [_setting(f"w{w}", 1.0, 0.3) for w in (4, 8, 16)]
  results = study.BanditResults(sizes, [4, 8, 16], *([None] * 11))
  for smallest in (0, -1, 4):  # checked before any figure is drawn
    with pytest.raises(ValueError, match=rf"smallest={smallest} must be in \[1, 3\]"):
      report_lib.bandit_criteria(results, "", smallest=smallest)


def test_g5_rejects_an_n_outside_the_curves():
  data = [_setting("n200", 1.0, 0.3), _setting("n500", 1.0, 0.2)]  # knobs 0 … 24
  assert criteria.g5([200, 500], data, 12, "").passed  # the peak rises with data
  with pytest.raises(ValueError, match=r"g5: n_fixed=-5 must lie in \[0, 24\]"):
    criteria.g5([200, 500], data, -5, "")


def test_g2_says_which_fits_have_no_overoptimization_term():
  settings = [_setting("w4", 1.0, 0.5), _setting("w8", 1.0, -0.2)]
  found = criteria.g2(settings, "")
  beta = settings[1].fit_bon.beta
  assert not found.passed and beta == pytest.approx(-0.2, abs=0.01)
  assert found.detail.startswith(f"β ≤ 0 for w8 ({beta:+.3f})"), found.detail
  assert "fits every size" not in found.detail


def test_g3_passes_rank_correlations_of_exactly_0_8_and_r4_needs_a_best_of_n_peak():
  # β ranks [4, 3, 1, 2] against sizes: ρ = −0.8 exactly; peak gold 1/(4β) gives +0.8
  # (scipy returns 0.7999999999999999, which failed the >= 0.8 rule).
  settings = [_setting(f"w{w}", 1.0, b) for w, b in ((8, 0.5), (16, 0.4), (32, 0.2), (64, 0.3))]
  found = criteria.g3([8, 16, 32, 64], settings, "")
  assert found.passed and found.value["spearman_size_peak_gold"] == 0.8, found.detail
  peaked, later = _setting("a", 1.0, 0.5), _setting("b", 1.0, 0.25)  # gold peaks at d=1, d=2
  assert criteria.r4([peaked._replace(rl=later.bon)], "").passed
  flat = _setting("c", 1.0, 0.01)  # best-of-n still rising at its largest n
  found = criteria.r4([flat._replace(rl=later.bon)], "")
  assert not found.passed and "best-of-n not peaked by its largest n" in found.detail
  # RL still rising at its largest KL: a lower bound on its peak, enough for ">" but named.
  found = criteria.r4([peaked._replace(rl=flat.bon)], "")
  assert found.passed and "RL highest at its largest KL: a lower bound" in found.detail
  # A trained run whose KL fell back late, highest at its last checkpoint: that checkpoint's
  # KL bounds nothing (R4 passed on it, as on a lower bound).
  rising = np.linspace(0.0, 1.0, 5)
  fell_back = _curve(np.array([0.0, 1.0, 2.0, 3.0, 2.5]), rising, noise=0.001)
  found = criteria.r4([peaked._replace(rl=fell_back)], "")
  assert not found.passed and "below its largest KL: not evaluable" in found.detail
  still_rising = _curve(np.array([0.0, 1.0, 2.0, 3.0, 3.5]), rising, noise=0.001)
  assert criteria.r4([peaked._replace(rl=still_rising)], "").passed
  # Best-of-n gold highest at n = 1 never rose: its "peak" at KL 0 is below any RL KL, and
  # R4 passed on it (with an RL curve that never peaked either).
  falling = _setting("f", -0.5, 0.1)
  found = criteria.r4([falling._replace(rl=flat.bon)], "")
  assert found.value[0]["kl_peak_bon"] == 0.0
  assert not found.passed and "best-of-n highest at n = 1: it never rose" in found.detail


def test_g3_needs_three_sizes():
  settings = [_setting(f"w{w}", 1.0, b) for w, b in ((4, 0.5), (8, 0.4), (16, 0.3))]
  assert criteria.g3([4, 8, 16], settings, "").passed
  for n in (1, 2):
    found = criteria.g3([4, 8, 16][:n], settings[:n], "")
    assert not found.passed
    assert found.detail == f"not evaluable: needs >= 3 sizes, got {n}"
    assert found.value["evaluable"] is False and found.value["spearman_size_beta"] is None


def test_c1_signs_the_gain_and_names_the_noise():
  from prefjax.overopt import report as report_lib
  single = _setting("single", 1.0, 0.05)
  worse = {k: _setting(k, 1.0, 0.5) for k in ("mean", "wco", "uwo")}
  found = criteria.c1(single, worse, "", label_noise=0.1)
  gain = found.value["wco"]["gain_at_n_max"]
  assert gain == pytest.approx(-4.05, abs=0.05)  # d = 3: 3·(1 − 0.5·3) − 3·(1 − 0.05·3)
  assert found.detail.startswith(f"at 10% label noise: wco: decline ")
  assert f", {gain:+.2f} gold over" in found.detail and "+-" not in found.detail
  assert "10% in this run" in report_lib.expected("C1", "bandit", label_noise=0.1)
  assert "25% label noise" not in report_lib.expected("C1", "bandit", label_noise=0.1)


def test_fit_table_shows_beta_ci_and_fitted_peak():
  from prefjax.overopt import report as report_lib
  humped, rising = _setting("w4", 1.0, 0.5), _setting("w8", 1.0, -0.2)
  table = report_lib._fit_table([humped, rising], "width")
  assert "β_bon [95% CI]" in table[0] and "d*_bon" in table[0] and "d*_RL" in table[0]
  assert all(row.count("|") == table[0].count("|") for row in table)
  lo, hi = humped.fit_bon.beta_ci
  assert f"{humped.fit_bon.beta:.3f} [{lo:.3f}, {hi:.3f}] | " in table[2]
  assert humped.fit_bon.peak_d == pytest.approx(1.0, abs=0.02)  # α/(2β), inside d ≤ 3
  assert f"| {humped.fit_bon.peak_d:.3g} |" in table[2]
  assert "| none |" in table[3]  # β < 0: the fit never turns over
  assert report_lib.peak_text(5.0, 2.0) == "5 (> data's max d 2.00)"


def test_cached_proxies_keep_their_training_wall_time(tmp_path, monkeypatch):
  import types
  from prefjax.overopt import bandit
  from prefjax.overopt import study
  trained = types.SimpleNamespace(scores=np.zeros((1, 2, 3)), gold_accuracy=np.array([0.6]),
                                  train_accuracy=np.array([0.7]), train_loss=np.array([0.5]),
                                  wall_s=12.5)
  monkeypatch.setattr(bandit, "train_proxies", lambda *a: trained)
  world = types.SimpleNamespace(config=bandit.WorldConfig(num_prompts=2))
  cfg = bandit.ProxyConfig(width=4, num_pairs=8, batch_size=8)
  _, fresh = study._cached_proxies(str(tmp_path), "w4", world, cfg, [0])
  _, cached = study._cached_proxies(str(tmp_path), "w4", world, cfg, [0])
  assert (fresh["wall_s"], fresh["cached"]) == (12.5, False)
  assert (cached["wall_s"], cached["cached"]) == (12.5, True)
  # Proxies trained by other code (bandit.py edited since) are trained again, not reused.
  from prefjax import files
  monkeypatch.setattr(files, "source_digest", lambda *modules: "edited")
  _, after_edit = study._cached_proxies(str(tmp_path), "w4", world, cfg, [0])
  assert after_edit["cached"] is False
