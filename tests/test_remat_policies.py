"""benchmarks.remat_policies: each remat policy's memory and step time, unrolled and scanned."""

import json

import pytest

from benchmarks import remat_policies


def test_a_small_sweep_reports_memory_and_time_per_policy_and_layout(tmp_path):
  out = tmp_path / "rows.json"
  rows = remat_policies.main(["--policies=none,full", "--hidden=64", "--num_layers=2",
                              "--data=synthetic", "--length=256", "--max_pairs=3",
                              "--steps=1", "--rounds=1", f"--json={out}"])
  assert json.loads(out.read_text()) == rows
  by_case = {r["case"]: r for r in rows}
  assert sorted(by_case) == ["rm_remat_full_scan", "rm_remat_full_unrolled",
                             "rm_remat_none_scan", "rm_remat_none_unrolled"]
  for r in rows:
    assert r["params"] == rows[0]["params"] and r["argument_mb"] == rows[0]["argument_mb"]
    assert r["s_per_step"] > 0 and r["real_tokens_per_s"] > 0 and r["compile_s"] > 0
    assert (r["data"], r["rows"], r["length"], r["num_layers"]) == ("synthetic", 2, 256, 2)
    none = by_case[f"rm_remat_none_{r['layout']}"]
    assert r["vs_none"] == pytest.approx(r["s_per_step"] / none["s_per_step"], rel=1e-2)
  # Scanned blocks recompute one at a time: the step keeps less.
  assert by_case["rm_remat_full_scan"]["temp_mb"] < by_case["rm_remat_none_scan"]["temp_mb"]


def test_bad_arguments_are_refused():
  for argv in (["--policies=some"], ["--layouts=vmap"], ["--policies="]):
    with pytest.raises(SystemExit):
      remat_policies.main(argv)
  with pytest.raises(ValueError, match="--pairs must be >= 1"):
    remat_policies.hh_batches(0, 1)
