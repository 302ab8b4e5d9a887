"""eval_rm's bootstrap draws prompts with all their pairs (a cluster bootstrap), and counts
pairs listed twice (same prompt and responses)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments import eval_rm
from prefjax.evals import stats
from tests import test_eval_rm

tmp_path = test_eval_rm.tmp_path


def test_text_pair_groups_join_copies_in_either_order_and_nothing_else():
  groups = stats.text_pair_groups(["p", "p", "p", "q", "p"], ["a", "b", "a", "a", "a"],
                                  ["b", "a", "b", "b", "c"])
  np.testing.assert_array_equal(groups, [0, 0, 0, 1, 2])


def test_prompt_groups_join_the_pairs_of_a_prompt_and_text_pairs_without_one():
  groups = stats.prompt_groups(["p", "q", "p", "", "", "", "q"], ["a", "a", "c", "a", "b", "a", "z"],
                               ["b", "b", "d", "b", "a", "c", "y"])
  np.testing.assert_array_equal(groups, [0, 1, 0, 2, 2, 3, 1])


def test_eval_rm_resamples_the_pairs_of_one_prompt_together(tmp_path):
  """Three pairs a prompt, scored alike within a prompt (as PandaLM's 5.7 pairs a prompt
  are, in part): drawn by pair, the interval was that of 3x the prompts' information."""
  rows = [dict(test_eval_rm.length_pair(i, chosen_longer=i % 3 != 0), prompt=f"q{i}",
               chosen=(" a long answer" if i % 3 else " no") + " " * k,
               rejected=(" no" if i % 3 else " a long answer") + "!" * k)
          for i in range(40) for k in range(3)]
  path = test_eval_rm.write_jsonl(tmp_path / "bench.jsonl", rows)
  config = test_eval_rm.eval_config("length", f"jsonl:{path}")
  eval_rm.run(config, str(tmp_path / "eval"))
  section = json.loads((tmp_path / "eval" / "report.json").read_text())["datasets"][0]
  assert (section["pairs_decisive"], section["decisive_prompts"]) == (120, 40)
  assert section["decisive_pairs_repeating_text"] == 0
  assert "they come from 40 prompts" in (tmp_path / "eval" / "report.md").read_text()
  correct = np.array([i % 3 != 0 for i in range(40) for _ in range(3)], float)
  by_prompt, by_pair = (stats.weighted_estimate(correct, stats.resample_counts(
      120, config.num_resamples, config.seed, g)) for g in (np.repeat(np.arange(40), 3), None))
  assert section["metrics"]["length"]["accuracy"] == pytest.approx(by_prompt.as_dict())
  width = lambda e: e.high - e.low
  assert width(by_prompt) > 1.4 * width(by_pair)  # about sqrt(3)


def test_distinct_groups_draw_exactly_the_ungrouped_counts():
  np.testing.assert_array_equal(stats.resample_counts(50, 40, 3),
                                stats.resample_counts(50, 40, 3, np.arange(50)[::-1] * 7))


def test_every_copy_of_a_group_takes_the_group_count():
  groups = np.array([5, 2, 5, 9, 2, 5])  # three groups: {0, 2, 5}, {1, 4}, {3}
  counts = stats.resample_counts(6, 300, 0, groups)
  np.testing.assert_array_equal(counts[:, 0], counts[:, 2])
  np.testing.assert_array_equal(counts[:, 0], counts[:, 5])
  np.testing.assert_array_equal(counts[:, 1], counts[:, 4])
  # Three groups drawn three times: the group counts sum to 3 in every resample.
  np.testing.assert_array_equal(counts[:, [0, 1, 3]].sum(axis=1), np.full(300, 3.0))
  with pytest.raises(ValueError, match="5 labels for 6 items"):
    stats.resample_counts(6, 3, 0, groups[:5])


def test_interval_of_doubled_pairs_has_the_width_of_the_distinct_pairs():
  correct = (np.arange(200) % 4 != 0).astype(float)  # 200 distinct pairs, accuracy 0.75
  doubled = np.repeat(correct, 2)
  groups = np.repeat(np.arange(200), 2)
  binomial = lambda n: 2 * 1.96 * math.sqrt(0.75 * 0.25 / n)
  clustered = stats.weighted_estimate(doubled, stats.resample_counts(400, 2000, 0, groups))
  naive = stats.weighted_estimate(doubled, stats.resample_counts(400, 2000, 0))
  assert clustered.value == naive.value == 0.75
  assert clustered.high - clustered.low == pytest.approx(binomial(200), rel=0.15)
  assert naive.high - naive.low == pytest.approx(binomial(400), rel=0.15)


def test_the_subset_mean_under_clusters_is_a_mean_of_each_resample_s_own_pairs():
  """A subset of one pair listed 5 times and 5 distinct pairs, all correct: the mean's
  interval was [0.6, 1.8], each resample divided by the fixed 10 pairs (a helper's audit)."""
  correct = np.ones(12)
  subsets = ["a"] * 10 + ["b"] * 2
  groups = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
  counts = stats.resample_counts(12, 500, 0, groups)
  per_subset, mean = stats.subset_accuracies(correct, counts, subsets, seed=1, groups=groups)
  assert (mean.value, mean.low, mean.high) == (1.0, 1.0, 1.0)
  assert (per_subset["a"].low, per_subset["a"].high) == (1.0, 1.0)
  # Mixed answers: every resampled subset mean stays an accuracy, and the groups widen it.
  correct = np.r_[np.ones(5), np.zeros(5), np.ones(2)]  # the 5 copies right, the rest wrong
  _, clustered = stats.subset_accuracies(correct, counts, subsets, seed=1, groups=groups)
  _, plain = stats.subset_accuracies(correct, counts, subsets, seed=1)
  assert 0.0 <= clustered.low <= clustered.value <= clustered.high <= 1.0
  assert clustered.high - clustered.low > plain.high - plain.low


def test_eval_rm_counts_repeated_text_and_resamples_it_as_one_pair(tmp_path):
  rows = [test_eval_rm.length_pair(i, chosen_longer=i % 3 != 0) for i in range(60)]
  # 30 more rows repeat the first 30's text; 15 of them with the sides swapped.
  repeats = [dict(r) for r in rows[:30]]
  for k, row in enumerate(repeats[:15]):
    repeats[k] = {"prompt": row["prompt"], "chosen": row["rejected"],
                  "rejected": row["chosen"], "outcome": 0.0}
  path = test_eval_rm.write_jsonl(tmp_path / "bench.jsonl", rows + repeats)
  config = test_eval_rm.eval_config("length", f"jsonl:{path}")
  eval_rm.run(config, str(tmp_path / "eval"))
  section = json.loads((tmp_path / "eval" / "report.json").read_text())["datasets"][0]
  assert (section["pairs_decisive"], section["decisive_pairs_repeating_text"]) == (90, 30)
  assert section["decisive_prompts"] == 60
  assert ("90 decisive pairs in the metrics; they come from 60 prompts, which the intervals "
          "resample with all their pairs; 30 of them repeat another's text (same prompt and "
          "responses, either order)") in (tmp_path / "eval" / "report.md").read_text()
  # The length scorer is right where the preferred side is the longer one: i % 3 != 0.
  correct = np.array([i % 3 != 0 for i in range(60)] + [i % 3 != 0 for i in range(30)], float)
  groups = np.concatenate([np.arange(60), np.arange(30)])
  grouped, ungrouped = (stats.weighted_estimate(correct, stats.resample_counts(
      90, config.num_resamples, config.seed, g)) for g in (groups, None))
  assert section["metrics"]["length"]["accuracy"] == pytest.approx(grouped.as_dict())
  assert grouped.as_dict() != pytest.approx(ungrouped.as_dict())


def test_one_prompt_gives_no_interval_or_p_value_instead_of_a_certain_one():
  """Every resample of one cluster is the same: intervals were [0.300, 0.300] and p the
  1/R floor (0.001), certainty that ten pairs of one prompt cannot give."""
  signed_a = np.array([1.0, -1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0])
  signed_b = np.abs(signed_a)
  counts = stats.resample_counts(10, 200, 0, groups=np.zeros(10, np.int64))
  accuracy = stats.weighted_estimate(stats.preference.pair_accuracy(signed_a), counts)
  assert accuracy.value == pytest.approx(0.3) and math.isnan(accuracy.low)
  assert math.isnan(accuracy.high)
  difference = stats.paired_difference(signed_a, signed_b, counts)
  assert difference.difference.value == pytest.approx(0.7)
  assert math.isnan(difference.p_value) and math.isnan(difference.difference.low)
  assert math.isnan(stats.ece_estimate(signed_a, counts, 10).low)
  two = stats.resample_counts(10, 200, 0, groups=np.arange(10) % 2)  # two prompts: spread
  assert not math.isnan(stats.weighted_estimate(signed_b, two).low)


def test_a_few_disagreements_get_at_least_the_exact_sign_test_p_value():
  """Scorers that differ on 4 of 200 pairs, all won by B: the bootstrap said p = 0.037,
  which rejected a true null in 10% of draws at the 5% level; the sign test says 0.125."""
  signed_a = np.ones(200)
  signed_a[:4] = -1.0
  counts = stats.resample_counts(200, 2000, 0)
  result = stats.paired_difference(signed_a, np.ones(200), counts)
  assert result.p_value == pytest.approx(0.125)
  many = np.where(np.arange(200) < 40, -1.0, 1.0)  # 40 disagreements: the bootstrap decides
  assert stats.paired_difference(many, np.ones(200), counts).p_value == pytest.approx(
      1 / 2000)
