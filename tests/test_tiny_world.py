"""The tiny text world: determinism, label semantics, and the planted proxy feature."""

import numpy as np
import pytest

from prefjax.data.tiny_world import TinyWorld


def test_pairs_deterministic_and_labelled_by_gold():
  world = TinyWorld(seed=3)
  a = list(world.preference_pairs(200, seed=1))
  b = list(world.preference_pairs(200, seed=1))
  assert a == b
  assert a != list(world.preference_pairs(200, seed=2))
  for row in a:
    assert world.gold_reward(row["prompt"], row["chosen"]) > world.gold_reward(row["prompt"], row["rejected"])
    assert row["meta"]["gold_chosen"] == world.gold_reward(row["prompt"], row["chosen"])


def test_bt_label_noise_rate_matches_bradley_terry():
  world = TinyWorld(seed=0)
  rows = list(world.preference_pairs(4000, seed=0, label_noise="bt", temperature=0.5))
  flipped = np.array([r["meta"]["gold_chosen"] < r["meta"]["gold_rejected"] for r in rows])
  gaps = np.array([abs(r["meta"]["gold_chosen"] - r["meta"]["gold_rejected"]) for r in rows])
  expected = np.mean(1.0 / (1.0 + np.exp(gaps / 0.5)))
  se = np.sqrt(expected * (1 - expected) / len(rows))
  assert abs(flipped.mean() - expected) < 4 * se


def test_proxy_rewards_exploit_char_that_gold_penalises():
  world = TinyWorld(seed=0)
  honest, exploit = "abcabc", "pppppp"
  assert world.proxy_reward("x", exploit) - world.gold_reward("x", exploit) == pytest.approx(world.exploit_weight)
  assert world.proxy_reward("x", honest) == world.gold_reward("x", honest)
  assert world.gold_reward("x", exploit) == pytest.approx(-world.exploit_gold_penalty)
  with pytest.raises(ValueError, match="label_noise"):
    next(world.preference_pairs(1, seed=0, label_noise="bogus"))
