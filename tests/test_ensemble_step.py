"""benchmarks.ensemble_step: K members in one step against K one-model steps, by width."""

import json

import pytest

from benchmarks import ensemble_step
from benchmarks import run
from benchmarks import workloads


def test_vs_sequential_is_k_one_model_steps_over_one_ensemble_step():
  assert ensemble_step.vs_sequential(4, 1.0, 2.0) == pytest.approx(2.0)
  assert ensemble_step.vs_sequential(4, 0.25, 1.0) == pytest.approx(1.0)
  assert ensemble_step.vs_sequential(3, 0.5, 3.0) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="positive"):
    ensemble_step.vs_sequential(4, 0.0, 1.0)


def test_the_widest_default_width_is_the_benchmark_workloads_rm():
  assert ensemble_step.model_config(512) == workloads.rm_model_config()
  narrow = ensemble_step.model_config(128, num_layers=2)
  assert (narrow.hidden_size, narrow.num_heads, narrow.num_kv_heads, narrow.num_layers,
          narrow.intermediate_size, narrow.vocab_size) == (128, 2, 2, 2, 352, workloads.VOCAB)
  with pytest.raises(ValueError, match="multiple of 64"):
    ensemble_step.model_config(100)


def test_variants_take_turns_pass_by_pass():
  calls = []
  variants = {name: (lambda b, name=name: calls.append((name, b)), {}) for name in ("a", "b")}
  times = ensemble_step.time_interleaved(variants, [0, 1], rounds=2)
  assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)] * 2
  assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}


def test_a_small_sweep_times_one_model_and_the_ensemble(tmp_path):
  out = tmp_path / "rows.json"
  rows = ensemble_step.main(["--hidden=64", "--num_layers=1", "--steps=1", "--rounds=1",
                             "--forwards=vmap", "--data=synthetic", "--length=256",
                             "--max_pairs=3", f"--json={out}"])
  assert json.loads(out.read_text()) == rows
  one, ensemble = rows
  assert [r["case"] for r in rows] == ["rm_step_h64", "rm_ensemble4_vmap_h64"]
  assert (one["forward"], ensemble["forward"]) == (None, "vmap")
  # Each member is a whole model: four times the one model's parameters.
  assert ensemble["params"] == 4 * one["params"]
  assert one["vs_sequential"] is None
  assert ensemble["vs_sequential"] == pytest.approx(
      4 * one["s_per_step"] / ensemble["s_per_step"], rel=0.01)
  for r in rows:
    assert len(r["step_times"]) == 1 and r["s_per_step"] > 0 and r["compile_s"] > 0
    assert r["real_tokens_per_s"] > 0 and r["dtype"] == "float32"
    assert (r["data"], r["rows"], r["length"]) == ("synthetic", 2, 256)


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    ensemble_step.main(["--forwards=scan"])
  with pytest.raises(SystemExit):
    ensemble_step.main(["--members=1"])
  with pytest.raises(SystemExit):  # the HH batches have rm_step_hh's shape
    ensemble_step.main(["--data=hh", "--length=256"])


def test_hh_batches_are_rm_step_hhs():
  batches, num_segments = ensemble_step.data_batches("hh", 1)
  config = workloads.pipeline_config("shared")
  assert num_segments == run.NUM_SEGMENTS["shared"] == config.max_segments_per_row
  assert batches[0]["tokens"].shape == (config.pack_rows, config.pack_length)
  assert "prefix_ids" in batches[0]  # prompt-shared rows
