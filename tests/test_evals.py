"""Reward-model evaluation metrics against direct computations."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from prefjax import evals
from prefjax.evals import reward_report


def test_accuracy_margin_logloss():
  rc = np.array([2.0, 0.0, 1.0, -1.0])
  rr = np.array([1.0, 1.0, 1.0, 0.5])
  ev = evals.evaluate_preferences(rc, rr).metrics
  # margins 1, -1, 0, -1.5 -> correct 1, 0, 0.5, 0
  assert ev["accuracy"] == pytest.approx(1.5 / 4)
  assert ev["mean_margin"] == pytest.approx((1 - 1 + 0 - 1.5) / 4)
  expected_ll = np.mean([np.log1p(np.exp(-m)) for m in (1.0, -1.0, 0.0, -1.5)])
  assert ev["bt_log_loss"] == pytest.approx(expected_ll, rel=1e-12)


def test_outcomes_flip_and_ties_excluded():
  rc = np.array([1.0, 1.0, 5.0])
  rr = np.array([0.0, 0.0, 0.0])
  ev = evals.evaluate_preferences(rc, rr, outcome=np.array([1.0, 0.0, 0.5])).metrics
  assert ev["accuracy"] == pytest.approx(0.5)
  assert ev["num_ties"] == 1


def test_evaluate_preferences_scores_calibration_over_both_orders_of_each_pair():
  """It scored σ(Δ) on the (chosen, rejected) order alone, where every label is 1, and
  reported 0.5 here where eval_rm and train_rm's evaluator (both orders) report 0.231."""
  with pytest.raises(ValueError, match=r"outcome has shape \(3,\); the rewards have \(2,\)"):
    evals.evaluate_preferences(np.array([1.0, -1.0]), np.zeros(2), outcome=np.ones(3))
  ev = evals.evaluate_preferences(np.array([1.0, -1.0]), np.zeros(2))
  p = 1.0 / (1.0 + np.exp(-1.0))   # bins of σ(1) and σ(−1) each hold one label 1, one 0
  assert ev.metrics["ece"] == pytest.approx(p - 0.5, rel=1e-12)
  assert ev.metrics["ece_chosen_first"] == pytest.approx(0.5 * (1 - p) + 0.5 * p, rel=1e-12)
  assert sum(ev.reliability["count"]) == 4


def test_ece_matches_definition_and_perfect_calibration():
  rng = np.random.default_rng(0)
  prob = rng.uniform(size=20000)
  label = (rng.uniform(size=prob.size) < prob).astype(float)
  assert evals.expected_calibration_error(prob, label) < 0.02
  # Always-confident wrong predictions: ECE = |0 - 0.95| in one bin.
  assert evals.expected_calibration_error(np.full(10, 0.95), np.zeros(10)) == pytest.approx(0.95)
  # Hand computation over two bins.
  p = np.array([0.15, 0.15, 0.85, 0.85])
  y = np.array([0.0, 1.0, 1.0, 1.0])
  assert evals.expected_calibration_error(p, y) == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
  # Integer weights (bootstrap counts) equal the ECE of the sample with rows repeated.
  counts = np.array([[2, 0, 1, 3], [1, 1, 1, 1]])
  by_row = evals.expected_calibration_error(p, y, weights=counts)
  assert by_row[0] == pytest.approx(
      evals.expected_calibration_error(np.repeat(p, counts[0]), np.repeat(y, counts[0])), abs=1e-12)
  assert by_row[1] == pytest.approx(evals.expected_calibration_error(p, y), abs=1e-12)


def test_length_slice_and_subsets():
  rc = np.array([1.0, 1.0, -1.0, 1.0])
  rr = np.zeros(4)
  ev = evals.evaluate_preferences(
      rc, rr, chosen_len=np.array([10, 300, 10, 600]), rejected_len=np.array([20, 200, 30, 700]),
      subsets=["a", "a", "b", "b"]).metrics
  assert ev["chosen_longer_rate"] == pytest.approx(0.25)
  assert ev["length_baseline_accuracy"] == pytest.approx(0.25)
  assert ev["accuracy/subset/a"] == 1.0 and ev["accuracy/subset/b"] == 0.5
  assert ev["accuracy/len_lt_64"] == pytest.approx(0.5)
  assert ev["accuracy/len_ge_512"] == 1.0
  # Labels that prefer the rejected side, a length tie, and a tie outcome (left out): the
  # length metrics follow the preferred side, and a length tie counts half.
  ev = evals.evaluate_preferences(
      np.array([1.0, -1.0, 2.0, 0.5, 0.0]), np.zeros(5), outcome=np.array([1, 0, 1, 0, 0.5]),
      chosen_len=np.array([10, 20, 30, 40, 25]), rejected_len=np.array([20, 50, 30, 60, 5])
  ).metrics
  assert ev["chosen_longer_rate"] == 0.5          # pairs 1 and 3: the preferred is longer
  assert ev["length_baseline_accuracy"] == 0.625  # (0 + 1 + 0.5 + 1) / 4


def test_disagreement_and_errors(tmp_path):
  m = np.array([[1.0, 2.0], [1.0, -1.0]])
  d = evals.ensemble_disagreement(m)
  assert d["member_sign_disagreement"] == 0.5
  assert d["member_margin_std"] == pytest.approx((0.5 + 1.0) / 2)
  # Three members: a row disagrees when any member's sign differs from another's.
  m3 = np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, -3.0], [1.0, -1.0, -2.0]])
  d = evals.ensemble_disagreement(m3)
  assert d["member_sign_disagreement"] == pytest.approx(2 / 3)
  assert d["member_margin_std"] == pytest.approx(np.mean([np.std(r) for r in m3]))
  with pytest.raises(ValueError, match="non-finite"):
    evals.evaluate_preferences(np.array([np.nan]), np.array([0.0]))
  ev = evals.evaluate_preferences(np.array([1.0, -1.0]), np.zeros(2))
  evals.plot_reliability({"rm": ev.reliability}, str(tmp_path / "rel.png"))
  assert (tmp_path / "rel.png").stat().st_size > 1000


def test_scores_jsonl_lines_are_standard_json_with_a_nan_score():
  table = types.SimpleNamespace(index=[0], ids=["p0"], outcome=[1.0], chosen_chars=[3],
                                rejected_chars=[4], subsets=None)
  arrays = {"table": table, "columns": {"rm": (np.array([np.nan]), np.array([np.inf]))}}
  line, = reward_report.score_lines("d", arrays)
  assert json.loads(line, parse_constant=pytest.fail)["scores"] == {"rm": ["nan", "inf"]}


class _Rows(list):
  def __getitems__(self, indices):
    return [self[i] for i in indices]


@pytest.mark.parametrize("value", [None, "nan", "high", float("nan"), float("inf"), True])
def test_a_gold_reward_that_is_not_a_finite_number_names_its_row(value):
  """A null gold reward gave NaN log-loss and ECE and a wrong accuracy, exit 0; a string
  failed with 'could not convert string to float', naming no row."""
  from prefjax.evals import scorers  # pylint: disable=g-import-not-at-top
  rows = _Rows([{"id": "g.jsonl:1", "meta": {"gold_chosen": 1.0, "gold_rejected": 0}},
                {"id": "g.jsonl:2", "meta": {"gold_chosen": 0.5, "gold_rejected": value}}])
  with pytest.raises(scorers.EvalInputError,
                     match=r"row g\.jsonl:2: meta\.gold_rejected=.* must be a finite number"):
    scorers.gold_rewards(rows)
  rows[1]["meta"]["gold_rejected"] = -2
  chosen, rejected = scorers.gold_rewards(rows)
  np.testing.assert_array_equal(rejected, [0.0, -2.0])
  np.testing.assert_array_equal(chosen, [1.0, 0.5])


DRAW_EVERY_KIND_OF_FIGURE = """
import sys
import matplotlib
import numpy as np
from prefjax.evals import plots, preference
from prefjax.overopt import figures
out = sys.argv[1]
plots.plot_scores_vs_sqrt_kl([0.0, 1.0], {"gold": ([0.0, 0.5], [0.1, 0.1])}, out + "/kl.png",
                             xlabel="x", ylabel="y", title="t", steps=[0, 10])
ev = preference.evaluate_preferences(np.array([1.0, -1.0]), np.zeros(2))
preference.plot_reliability({"rm": ev.reliability}, out + "/rel.png")
figures.disagreement({"mean": np.ones((3, 2))}, np.array([1, 2]), out + "/dis.png", title="t")
pyplot_loaded = "matplotlib.pyplot" in sys.modules  # before get_backend, which may load it
print(matplotlib.get_backend(), pyplot_loaded)
"""


def test_drawing_figures_leaves_the_callers_matplotlib_backend_alone(tmp_path):
  """A library that switched to Agg on import would turn a notebook's inline plots off."""
  env = dict(os.environ, MPLBACKEND="svg")
  run = subprocess.run([sys.executable, "-c", DRAW_EVERY_KIND_OF_FIGURE, str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ["svg", "False"]
  for name in ("kl.png", "rel.png", "dis.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
