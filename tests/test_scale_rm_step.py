"""benchmarks.scale_rm_step (the 1B GPU target's script): a CPU smoke run at a tiny size."""

import json

import numpy as np

from benchmarks import run, scale_rm_step


def test_tiny_run_reports_a_trained_step_of_packed_shared_prompt_batches(tmp_path):
  out = tmp_path / "row.json"
  row = scale_rm_step.main(["--size=tiny", "--rows=2", "--length=512", "--max_pairs=6",
                            "--steps=2", f"--json={out}"])
  assert json.loads(out.read_text()) == row
  assert row["case"] == "rm_step_scale_tiny" and row["dtype"] == "float32"
  assert row["steps"] == 2 and len(row["step_times"]) == 2 and row["s_per_step"] > 0
  assert 1 <= row["pairs_per_step"] <= 6 and 0 <= row["padded_slot_pct"] < 100
  assert 0 < row["mfu"] < 2 and row["mfu_vs_peak"] is None
  assert row["xla_tflop_per_step"] > 0 and row["analytic_tflop_per_step"] > 0


def test_pair_batches_are_packed_shared_prompt_rows_of_one_shape():
  batches = scale_rm_step.pair_batches(3, rows=2, length=512, vocab_size=512, max_pairs=6)
  for b in batches:
    assert b["tokens"].shape == (2, 512) and b["chosen_index"].shape == (6, 2)
    assert b["tokens"].max() < 512
    pairs = int(b["pair_mask"].sum())
    assert 1 <= pairs <= 6
    # Shared prompts: pair tokens count each prompt twice, so they exceed the real slots.
    assert run.pair_tokens(b) > np.count_nonzero(b["segment_ids"])
  # New pairs every batch.
  assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])


def test_bf16_peak_matches_the_card():
  assert scale_rm_step.bf16_peak("NVIDIA H200") == 989.4e12
  assert scale_rm_step.bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
  assert scale_rm_step.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert scale_rm_step.bf16_peak("cpu") is None
