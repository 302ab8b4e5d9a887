"""benchmarks.run's token and FLOP counts, against hand counts on small layouts."""

import numpy as np
import pytest

from benchmarks import model_throughput, report, run, workloads


def _shared_row():
  # Prompt (segment 1, 2 tokens), chosen (segment 2, 3 tokens), rejected (segment 3, 2
  # tokens), one pad slot; both responses also see the prompt.
  return {"segment_ids": np.array([[1, 1, 2, 2, 2, 3, 3, 0]]),
          "prefix_ids": np.array([[1, 1, 1, 1, 1, 1, 1, 0]])}


def test_visible_pairs_count_each_segment_triangle_and_the_shared_prompt():
  # Triangles 3 + 6 + 3, plus 3·2 and 2·2 (query, prompt key) pairs.
  assert run.visible_pairs(_shared_row()) == 22
  assert run.visible_pairs({"segment_ids": np.array([[1, 1, 2, 2, 2, 0], [1, 0, 0, 0, 0, 0]])}) \
      == 3 + 6 + 1


def test_pair_tokens_count_the_shared_prompt_once_per_response():
  assert run.pair_tokens(_shared_row()) == 7 + 2
  assert run.pair_tokens({"attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}) == 5


def test_analytic_flops_split_matmuls_and_attention():
  c = workloads.rm_model_config()
  per_pair = 4 * c.num_layers * c.num_heads * c.head_dim
  matmul = model_throughput.flops_per_token(c, 0) - 2 * c.hidden_size * c.vocab_size
  # Padded rows: every slot's causal triangle.
  assert run.analytic_flops(2, 64, lm_head=False, passes=1) == pytest.approx(
      3 * (matmul * 128 + per_pair * 2 * 64 * 64 / 2))
  # Packed rows: only the visible pairs; a frozen forward is a third of a pass.
  assert run.analytic_flops(2, 64, lm_head=True, passes=1 / 3, attention_pairs=22) == \
      pytest.approx(matmul * 128 + 2 * c.hidden_size * c.vocab_size * 128 + per_pair * 22)
  # The LM head counted only at the slots the loss reads.
  assert run.analytic_flops(2, 64, lm_head=True, passes=1, attention_pairs=22,
                            lm_head_slots=40) == pytest.approx(
      3 * (matmul * 128 + 2 * c.hidden_size * c.vocab_size * 40 + per_pair * 22))
  # 30 layers instead of 6: 5x the per-layer work, same embedding-free total otherwise.
  assert run.analytic_flops(2, 64, lm_head=False, passes=1, num_layers=30) == pytest.approx(
      5 * run.analytic_flops(2, 64, lm_head=False, passes=1))


def test_pooled_counts_read_each_sequences_last_token_and_what_it_sees():
  # Packed shared row: the prompt's last token sees 2 keys, chosen's 2 + 3, rejected's 2 + 2.
  assert run.pooled_counts(_shared_row()) == (3, 2 + 5 + 4)
  # Padded rows: one slot per row, which sees the whole row.
  assert run.pooled_counts({"attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}) == (2, 5)


def test_pytorch_and_prefjax_reward_models_get_the_same_credit_for_the_same_rows():
  """torch_rm_step_hh was credited its last block at every slot (16% more on the HH
  batches than the same rows under prefjax's rule), inflating PyTorch's MFU."""
  batch = {"tokens": np.zeros((4, 64), np.int32),
           "attention_mask": (np.arange(64)[None] < np.array([[64], [40], [64], [20]]))}
  shapes = [run.computed_shape(batch, torch=True)]
  torch_flops = run.step_flops("torch_rm_step_hh", {}, [batch], shapes)[0]
  assert torch_flops == [pytest.approx(run.analytic_flops(
      4, 64, lm_head=False, passes=1, pooled=run.pooled_counts(batch)))]
  assert torch_flops[0] < run.analytic_flops(4, 64, lm_head=False, passes=1)


def test_analytic_flops_of_a_last_block_at_the_pooled_slots():
  c = workloads.rm_model_config()
  full = run.analytic_flops(2, 64, lm_head=False, passes=1, attention_pairs=500)
  # Pooling every slot and every pair is the full count.
  assert run.analytic_flops(2, 64, lm_head=False, passes=1, attention_pairs=500,
                            pooled=(128, 500)) == pytest.approx(full)
  # Otherwise the last block's q, o and MLP products and its attention drop for the rest.
  per_slot = 2 * c.hidden_size * (2 * c.num_heads * c.head_dim + 3 * c.intermediate_size)
  per_pair_one_layer = 4 * c.num_heads * c.head_dim
  assert run.analytic_flops(2, 64, lm_head=False, passes=1, attention_pairs=500,
                            pooled=(3, 11)) == pytest.approx(
      full - 3 * (per_slot * 125 + per_pair_one_layer * 489))


def test_rates_are_total_work_over_total_time():
  # Three batches at 100 tokens/s, one four times the size of the others: the mean work
  # over the median time (200 / 1 s) would say 200 tokens/s.
  assert run.total_rate([100, 100, 400], [1.0, 1.0, 4.0]) == pytest.approx(100.0)
  # A step slowed down by other load counts with its whole time.
  assert run.total_rate([100, 100, 100], [1.0, 1.0, 2.0]) == pytest.approx(75.0)


def test_ensemble_speedup_is_four_steps_of_one_model_over_one_ensemble_step():
  rows = [{"case": "rm_step_hh", "real_tokens_per_s": 2000.0, "adjacent_ceiling_gflop_s": 240.0},
          {"case": "rm_ensemble4_one_step_shared", "real_tokens_per_s": 600.0,
           "adjacent_ceiling_gflop_s": 320.0},
          {"case": "rm_ensemble4_one_step", "real_tokens_per_s": 250.0},
          {"case": "rm_step_hh_padded", "error": ["failed"]}]
  # 4 × 600 / 2000: one ensemble step does 4 models' work in 1/600 of the time per token.
  # The machine probed 320/240 faster around the ensemble: scaled back, 1.2 × 240 / 320.
  speedups = report.ensemble_speedups(rows, run.ENSEMBLE_BASELINES)
  assert speedups == {"rm_ensemble4_one_step_shared": {"vs_4_sequential": 1.2,
                                                       "vs_4_sequential_adjacent": 0.9}}
  assert "0.90× scaled" in report.ensemble_line("rm_ensemble4_one_step_shared",
                                                speedups["rm_ensemble4_one_step_shared"], "x")
  rows[0].pop("adjacent_ceiling_gflop_s")  # rows without probes: the raw ratio only
  assert report.ensemble_speedups(rows, run.ENSEMBLE_BASELINES)[
      "rm_ensemble4_one_step_shared"]["vs_4_sequential_adjacent"] is None
  assert set(run.ENSEMBLE_BASELINES) <= set(run.CASES)
  assert set(run.ENSEMBLE_BASELINES.values()) <= set(run.CASES)


def test_drift_warning_only_when_the_ceiling_moved_past_the_limit():
  assert report.drift_warning(300e9, 330e9) == ""
  assert report.drift_warning(330e9, 300e9) == ""
  assert "223 → 395 GFLOP/s" in report.drift_warning(223e9, 395e9)
  assert report.drift_warning(395e9, 223e9).startswith("warning:")


def test_cpu_description_names_the_model_and_vector_isa(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n\n"
                     "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n")
  assert run.cpu_description(str(cpuinfo)).startswith("AMD EPYC (")
  assert run.cpu_description(str(cpuinfo)).endswith(" cores, AVX-512)")
  cpuinfo.write_text("model name\t: Intel Xeon\nflags\t\t: fpu avx2\n")
  assert run.cpu_description(str(cpuinfo)).endswith(", AVX2)")


def test_only_prefjax_train_steps_get_the_binaries_malloc_setting(monkeypatch):
  from prefjax import xla_cpu
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  monkeypatch.delenv(xla_cpu.DISABLE_ENV, raising=False)
  expected = xla_cpu.malloc_tunables() or "glibc.malloc.arena_max=4"
  as_binary = ("rm_step_hh", "dpo_step_hh_live", "dpo_step_hh_cached", "rm_step_hh_minilm",
               "ref_precompute_hh")
  plain = ("torch_rm_step_hh", "torch_dpo_step_hh_live", "generate_25m_b1_greedy")
  for name in as_binary:
    assert run.runs_as_train_binary(name)
    assert run._child_environment(name)["GLIBC_TUNABLES"] == expected
  for name in plain + ("no_such_case",):
    assert not run.runs_as_train_binary(name)
  for name in plain:
    assert run._child_environment(name)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
  monkeypatch.setenv(xla_cpu.DISABLE_ENV, "0")
  assert run._child_environment("rm_step_hh")["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


def test_compile_clock_counts_compiles_once_and_only_inside_its_block():
  import time
  import jax
  import jax.numpy as jnp

  inner = jax.jit(lambda x: jnp.sin(x) * 2)
  outer = jax.jit(lambda x: inner(x) + inner(x + 1))  # nested jits: one top-level program
  x = jnp.arange(8.0)
  start = time.perf_counter()
  with run.CompileClock() as clock:
    outer(x).block_until_ready()
    compiled = clock.seconds
    outer(x).block_until_ready()  # cached: nothing traced or compiled
  wall = time.perf_counter() - start
  assert 0 < compiled <= wall  # sequential phases of one program: never more than the wall time
  assert clock.seconds == compiled
  jax.jit(lambda x: jnp.cos(x) - 1)(x).block_until_ready()  # after the block: not counted
  assert clock.seconds == compiled


def test_adjacent_mfu_sets_each_step_against_the_probes_around_it():
  # Two steps of 10 and 30 FLOPs taking 1 s and 2 s; probes 20, 40 (around step 1), 20.
  # Step 1's ceiling is 30, step 2's 30: MFU = 40 / (1·30 + 2·30).
  assert run.adjacent_mfu([10.0, 30.0], [1.0, 2.0], [20.0, 40.0, 20.0]) == pytest.approx(40 / 90)
  # Half speed during step 2 (its time doubled, the probes after step 1 halved): the ratio
  # stays nearer the steady 0.5 than one against the higher of the first and last probes.
  steady = run.adjacent_mfu([10.0, 10.0], [1.0, 1.0], [20.0, 20.0, 20.0])
  drifted = run.adjacent_mfu([10.0, 10.0], [1.0, 2.0], [20.0, 10.0, 10.0])
  assert steady == pytest.approx(0.5)
  assert drifted == pytest.approx(20 / (1 * 15 + 2 * 10)) and drifted > 20 / (3 * 20)
  with pytest.raises(ValueError, match="one probe more"):
    run.adjacent_mfu([1.0], [1.0], [1.0])
  # The step-weighted ceiling around those steps: (1·15 + 2·10) / 3.
  assert run.adjacent_ceiling([1.0, 2.0], [20.0, 10.0, 10.0]) == pytest.approx(35 / 3)


def test_xla_flops_per_batch_lowers_each_shape_once_and_counts_a_conditionals_costlier_branch():
  import jax
  import jax.numpy as jnp
  from benchmarks import steps

  traces = []

  def step(state, batch):
    traces.append(batch["x"].shape)
    product = state @ batch["x"]  # 2·4·k·3 FLOPs for x [k, 3]
    return jax.lax.cond(batch["x"][0, 0] > 0, lambda p: p @ jnp.ones((3, 5)),
                        lambda p: jnp.zeros((4, 5)), product)

  jitted, state = jax.jit(step), jnp.ones((4, 6))
  batches = [{"x": np.ones((6, 3), np.float32)}, {"x": -np.ones((6, 3), np.float32)},
             {"x": np.ones((2, 3), np.float32)}]
  state2 = jnp.ones((4, 2))
  got = steps.xla_flops_per_batch(jitted, state, batches[:2])
  scalar_ops = 4  # the predicate's comparison and the like
  # The costlier (dot) branch counts, also for the batch whose predicate picks the other.
  assert got == [pytest.approx(2 * 4 * 6 * 3 + 2 * 4 * 3 * 5, abs=scalar_ops)] * 2
  assert traces == [(6, 3)]
  assert steps.xla_flops_per_batch(jitted, state2, batches[2:]) == [
      pytest.approx(2 * 4 * 2 * 3 + 2 * 4 * 3 * 5, abs=scalar_ops)]


def test_attention_pair_counts_set_what_the_flops_credit_against_what_the_kernel_computes():
  # Packed: 2 rows of 1,024, sequences [0, 300) and [300, 1,024): visible pairs are the two
  # triangles; the tiled kernel computes 8 of its 10 256² tiles per row.
  segments = np.repeat([[1, 2]], [300, 724], axis=1).repeat(2, axis=0)
  counted, computed = run.attention_pair_counts([{"segment_ids": segments, "tokens": segments}])
  assert counted == [2 * (300 * 301 / 2 + 724 * 725 / 2)]
  assert computed == [2 * 8 * 256 ** 2]
  # Padded rows: each row's whole triangle credited; 128-query blocks computed.
  mask = np.ones((3, 256), np.int32)
  counted, computed = run.attention_pair_counts([{"attention_mask": mask, "tokens": mask}])
  assert counted == [3 * 256 * 256 / 2] and computed == [3 * (128 * 128 + 128 * 256)]


def test_step_flops_credit_computed_attention_pairs_in_every_block_but_the_pooled_last():
  c = workloads.rm_model_config()
  segments = np.repeat([[1, 2, 3, 0]], [200, 200, 200, 424], axis=1)
  batch = {"segment_ids": segments, "prefix_ids": np.where(segments > 0, 1, 0),
           "tokens": segments}
  flops, computed_flops, (counted, computed) = run.step_flops("rm_step_hh", {}, [batch],
                                                              [(1, 1024)])
  assert computed == [7 * 256 ** 2] and counted == [run.visible_pairs(batch)]
  per_pair = model_throughput.attention_flops_per_pair(c)
  # The last block runs at the pooled slots only (attention_at), credited the same both ways.
  assert computed_flops[0] - flops[0] == pytest.approx(
      3 * per_pair * (c.num_layers - 1) / c.num_layers * (computed[0] - counted[0]))
  torch_flops, none, no_pairs = run.step_flops("torch_rm_step_hh", {}, [batch], [(1, 600)])
  assert none is None and no_pairs is None and len(torch_flops) == 1
  # A DPO step's output head counts at the tokens its loss reads, in both frameworks.
  dpo = [{**batch, "loss_mask": (segments > 1).astype(np.int32) * (np.arange(1024) < n)}
         for n in (1024, 300)]
  head = 3 * 2 * c.hidden_size * c.vocab_size
  for case in ("dpo_step_hh_cached", "torch_dpo_step_hh_cached"):
    flops = run.step_flops(case, {}, dpo, [(1, 1024)] * 2)[0]
    assert flops[0] - flops[1] == pytest.approx(head * (400 - 100))


def test_generation_roofline_takes_the_slower_of_flops_and_bytes_per_decode_step():
  from benchmarks import generation
  from prefjax.models import decoder as dec
  # 1 layer, hidden 4, 1 head of 4, SwiGLU 8, vocab 16: matmul params 32 (q, o) + 32 (k, v)
  # + 96 (MLP) + 64 (LM head) = 224, so 448 FLOPs per token and 896 weight bytes;
  # attention 16 FLOPs per (query, key) pair; keys + values 32 bytes per slot.
  c = dec.DecoderConfig(vocab_size=16, hidden_size=4, num_layers=1, num_heads=1,
                        intermediate_size=8)
  bound = lambda byte_s: generation.roofline_s(c, 2, 3, 3, flop_s=1000.0, byte_s=byte_s)
  # Causal half of the 3-token prompt; the LM head (128 FLOPs) at each row's last token.
  prefill = 2 * (3 * (448 - 128 + 16 * 3 / 2) + 128) / 1000
  # Memory-bound: step 1 reads 896 + 2 rows x 4 slots x 32 bytes, step 2 5 slots.
  assert bound(100.0) == pytest.approx(prefill + (896 + 256) / 100 + (896 + 320) / 100)
  # Compute-bound: each row's token attends 4, then 5 slots.
  assert bound(1e12) == pytest.approx(prefill + 2 * (448 + 64) / 1000 + 2 * (448 + 80) / 1000)
  # Grouped-query attention: 2 query heads of 2 share 1 key/value head, so the key and
  # value projections hold 16 parameters and each slot caches 2 x 2 floats.
  gqa = c.replace(num_heads=2, num_kv_heads=1, head_dim=2)
  step_bytes = generation.roofline_s(gqa, 1, 3, 2, flop_s=1e12, byte_s=1.0) - \
      generation.roofline_s(gqa, 1, 3, 1, flop_s=1e12, byte_s=1.0)
  assert step_bytes == pytest.approx((32 + 16 + 96 + 64) * 4 + 4 * (2 * 1 * 2 * 4))


def test_a_case_that_ended_under_other_load_is_named():
  rows = [{"case": "rm_step_hh", "load_average_1m_after": 2.1},
          {"case": "generate_25m_b1_greedy", "load_average_1m_after": 3.02}]
  line = report.load_warning(rows, cores=2)
  assert "generate_25m_b1_greedy (3.0)" in line and "rm_step_hh" not in line
  assert report.load_warning(rows[:1], cores=2) == ""


def test_packed_layouts_time_whole_windows_of_the_pairs_the_padded_ones_time():
  """Packing reorders pairs within 8-batch windows, fullest first: 3 timed steps of the
  shared layout held 1.29x the pair tokens per FLOP of a whole window (a review's count),
  and other pairs than PyTorch's. A whole window holds the padded layout's pairs but those
  its rows cannot fit, which move to the next window."""
  assert workloads.whole_windows("shared", 3) == workloads.whole_windows("packed", 8) == 8
  assert workloads.whole_windows("shared", 9) == 16 and workloads.whole_windows("longest", 3) == 3
  pairs = lambda layout: sorted(int(i) for b in workloads.layout_batches(layout, 8)
                                for i in b["example_index"] if i >= 0)
  shared, longest = pairs("shared"), pairs("longest")
  assert len(longest) == 8 * workloads.PAIRS_PER_STEP and set(shared) <= set(longest)
  assert len(shared) >= len(longest) - 4, sorted(set(longest) - set(shared))


def test_generation_flops_count_the_prefill_head_once_and_127_decode_steps():
  from benchmarks import generation
  from prefjax.models import decoder as dec
  # As the roofline test's model: 448 FLOPs per token of which the head is 128, and
  # 16 attention FLOPs per (query, key) pair.
  c = dec.DecoderConfig(vocab_size=16, hidden_size=4, num_layers=1, num_heads=1,
                        intermediate_size=8)
  prefill = 2 * (3 * (448 - 128 + 16 * 3 / 2) + 128)  # 2 rows of 3 prompt tokens
  decode = 2 * ((448 + 16 * 4) + (448 + 16 * 5))       # new tokens 2 and 3 attend 4, 5 slots
  assert generation.call_flops(c, 2, 3, 3) == pytest.approx(prefill + decode)

