"""Tests for prefjax.data.pipeline / packing: truncation, bucketing, packing, epochs, resume."""

import collections
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.data import packing
from prefjax.data import pipeline
from prefjax.data import tokenize
from prefjax.models import segments

TOK = tokenize.ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def make_source(n=37, seed=0):
  """Pairs with varied lengths; chosen/rejected texts name their row so rows can be checked."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    rows.append({
        "prompt": f"q{i}:" + "p" * int(rng.integers(0, 40)),
        "chosen": f" c{i}" + "c" * int(rng.integers(0, 30)),
        "rejected": f" r{i}" + "r" * int(rng.integers(0, 12)),
        "weight": float(rng.uniform(0.5, 2.0)),
        "outcome": 0.5 if i % 5 == 0 else 1.0,
    })
  return rows


SOURCE = make_source()


def config(**overrides):
  base = dict(seed=3, batch_size=4, max_length=48, max_prompt_length=32, num_epochs=1,
              shard_index=0, shard_count=1, bucket_boundaries=(24, 32), pack_rows=4,
              pack_length=64, max_segments_per_row=6, pack_window=9)
  return pipeline.PipelineConfig(**{**base, **overrides})


def encoded(row, cfg):
  """Reference tokenization + truncation written out by hand for the byte tokenizer."""
  prompt = [BOS] + list(row["prompt"].encode())
  if len(prompt) > cfg.prompt_limit:
    prompt = [BOS] + prompt[len(prompt) - cfg.prompt_limit + 1:]
  budget = cfg.max_length - len(prompt)
  chosen = (list(row["chosen"].encode()) + [EOS])[:budget]
  rejected = (list(row["rejected"].encode()) + [EOS])[:budget]
  return prompt, chosen, rejected


def run(ds, limit=None):
  it = iter(ds)
  out = []
  for batch in it:
    out.append(batch)
    if limit is not None and len(out) == limit:
      break
  return out, it


def padded_sequences(batch):
  """example_index -> (prompt, chosen, rejected) read back from a padded pair batch."""
  b = batch["pair_mask"].shape[0]
  out = {}
  for j in range(b):
    if not batch["pair_mask"][j]:
      continue
    seqs = []
    for row in (j, b + j):
      att, loss, tok = batch["attention_mask"][row], batch["loss_mask"][row], batch["tokens"][row]
      n = int(att.sum())
      assert att[:n].all() and not att[n:].any(), "right padding"
      assert (tok[n:] == PAD).all()
      first = int(np.argmax(loss))
      assert loss[first:n].all() and not loss[:first].any() and not loss[n:].any()
      seqs.append((tok[:first].tolist(), tok[first:n].tolist()))
    assert seqs[0][0] == seqs[1][0], "chosen and rejected share the prompt"
    out[int(batch["example_index"][j])] = (seqs[0][0], seqs[0][1], seqs[1][1])
  return out


def packed_sequences(batch):
  """example_index -> (prompt, chosen, rejected) read back from a packed pair batch."""
  out = {}
  for j in np.flatnonzero(batch["pair_mask"]):
    seqs = []
    for index in (batch["chosen_index"][j], batch["rejected_index"][j]):
      row, seg = int(index[0]), int(index[1])
      assert seg > 0
      where = np.flatnonzero(batch["segment_ids"][row] == seg)
      assert (np.diff(where) == 1).all(), "a segment is contiguous"
      assert batch["positions"][row, where].tolist() == list(range(len(where)))
      tok, loss = batch["tokens"][row, where], batch["loss_mask"][row, where]
      first = int(np.argmax(loss))
      assert loss[first:].all() and not loss[:first].any()
      seqs.append((tok[:first].tolist(), tok[first:].tolist()))
    assert seqs[0][0] == seqs[1][0]
    out[int(batch["example_index"][j])] = (seqs[0][0], seqs[0][1], seqs[1][1])
  assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
  return out


SEQUENCES = {"padded": padded_sequences, "packed": packed_sequences}


# ---------------------------------------------------------------------------- truncation


def test_counters_of_truncated_and_over_long_pairs():
  long_prompt = "x" * 60
  rows = [
      {"prompt": "a", "chosen": " ok", "rejected": " no"},                   # fits
      {"prompt": long_prompt, "chosen": " ok", "rejected": " no"},           # prompt cut
      {"prompt": "a", "chosen": " " + "y" * 60, "rejected": " no"},          # response cut
      {"prompt": long_prompt, "chosen": " " + "y" * 60, "rejected": " n"},   # over-long
      {"prompt": long_prompt, "chosen": " " + "y" * 60, "rejected": " n"},   # over-long
  ]
  cfg = config(max_length=40, max_prompt_length=30, min_response_length=12, batch_size=2)
  batches, it = run(pipeline.preference_dataset(rows, TOK, cfg))
  c = it.counters
  assert c["examples_read"] == 5
  assert c["truncated_prompt"] == 1  # row 1 (rows 3 and 4 are counted as dropped only)
  assert c["truncated_response"] == 1
  assert c["dropped_over_long"] == 2
  seen = set().union(*(padded_sequences(b) for b in batches))
  assert seen == {0, 1, 2}


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "row 1: field 'chosen' must be str"),
    ({"prompt": "a", "chosen": "b"}, "row 1: missing field 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "outcome": 2.0}, "row 1: field 'outcome'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": float("nan")}, "row 1: field 'weight'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": "heavy"}, "row 1: field 'weight'"),
    # Read as 1.0 and 2.0, where a JSONL row with them is refused as bad_value.
    ({"prompt": "a", "chosen": "b", "rejected": "c", "outcome": True},
     "row 1: field 'outcome'=True is not a number"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": "2"},
     "row 1: field 'weight'='2' is not a number"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "weight": 1e39},  # inf in float32
     r"row 1: field 'weight'=1e\+39 not in \[0.0, 1000000000000.0\]"),
    ("not a dict", "row 1: expected a mapping"),
])
def test_bad_rows_name_row_and_field(bad, match):
  rows = [SOURCE[0], bad]
  with pytest.raises((TypeError, KeyError, ValueError), match=match):
    run(pipeline.preference_dataset(rows, TOK, config(shuffle=False)))


# ---------------------------------------------------------------------------- batch layouts


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_batches_hold_exact_tokens_masks_and_fields(mode):
  cfg = config(mode=mode)
  batches, it = run(pipeline.preference_dataset(SOURCE, TOK, cfg))
  seen = collections.Counter()
  for batch in batches:
    assert set(batch) >= {"tokens", "loss_mask", "weight", "outcome", "pair_mask", "example_index"}
    for i, (prompt, chosen, rejected) in SEQUENCES[mode](batch).items():
      assert (prompt, chosen, rejected) == encoded(SOURCE[i], cfg)
      seen[i] += 1
    real = batch["pair_mask"] > 0
    idx = batch["example_index"][real]
    np.testing.assert_allclose(batch["weight"][real], [SOURCE[i]["weight"] for i in idx], rtol=1e-6)
    np.testing.assert_array_equal(batch["outcome"][real], [SOURCE[i]["outcome"] for i in idx])
    assert (batch["weight"][~real] == 0).all() and (batch["example_index"][~real] == -1).all()
  assert seen == collections.Counter(range(len(SOURCE))), "every pair exactly once"
  assert it.counters["batches"] == len(batches)
  real_tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in (
      encoded(row, cfg) for row in SOURCE))
  assert it.counters["real_tokens"] == real_tokens
  assert it.counters["token_slots"] == sum(b["tokens"].size for b in batches)


def test_padded_shapes_are_bucketed():
  cfg = config()
  ds = pipeline.preference_dataset(SOURCE, TOK, cfg)
  batches, _ = run(ds)
  shapes = {b["tokens"].shape for b in batches}
  assert shapes <= {(8, 24), (8, 32), (8, 48)} and len(shapes) >= 2
  assert [s["tokens"] for s in ds.batch_shapes()] == [(8, 24), (8, 32), (8, 48)]
  for b in batches:  # the bucket is the smallest one that holds the longest sequence
    longest = int(b["attention_mask"].sum(-1).max())
    t = b["tokens"].shape[1]
    assert longest <= t and not any(longest <= s < t for s in (24, 32))


@pytest.mark.parametrize("multiple", [8, 16, None])
def test_padded_batches_are_cut_to_their_longest_row(multiple):
  """Rows end at the batch's longest sequence rounded up to ``pad_to_multiple`` (None: the bucket)."""
  cfg = config(bucket_boundaries=(), pad_to_multiple=multiple)
  ds = pipeline.preference_dataset(SOURCE, TOK, cfg)
  batches, _ = run(ds)
  allowed = [s["tokens"][1] for s in ds.batch_shapes()]
  if multiple is None:
    assert allowed == [48]
  else:
    assert allowed == sorted({min(m, 48) for m in range(multiple, 48 + multiple, multiple)})
  for b in batches:
    longest = int(b["attention_mask"].sum(-1).max())
    t = b["tokens"].shape[1]
    assert t in allowed and longest <= t
    assert multiple is None or t == min(-(-longest // multiple) * multiple, 48)
  assert len({b["tokens"].shape for b in batches}) >= (1 if multiple is None else 2)


def test_padded_lengths_are_validated():
  with pytest.raises(ValueError, match="pad_to_multiple"):
    config(pad_to_multiple=0)


def test_packed_shapes_are_fixed_and_dense():
  cfg = config(mode="packed")
  batches, it = run(pipeline.preference_dataset(SOURCE, TOK, cfg))
  assert {b["tokens"].shape for b in batches} == {(4, 64)}
  assert {b["chosen_index"].shape for b in batches} == {(4, 2)}
  shapes = pipeline.preference_dataset(SOURCE, TOK, cfg).batch_shapes()
  assert shapes == [{"tokens": (4, 64), "chosen_index": (4, 2)}]
  for b in batches:
    assert (b["segment_ids"].max(-1) <= cfg.max_segments_per_row).all()
    for row in b["segment_ids"]:  # segments numbered 1..S left to right, padding at the end
      used = row[row > 0]
      assert (np.diff(used) >= 0).all() and (row[len(used):] == 0).all()
      assert set(used.tolist()) == set(range(1, len(set(used.tolist())) + 1))
  c = it.counters
  assert c["real_tokens"] == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  padded_slots = sum(b["tokens"].size for b in run(
      pipeline.preference_dataset(SOURCE, TOK, config()))[0])
  assert c["token_slots"] < padded_slots  # packing wastes fewer slots than bucketed padding


@pytest.mark.parametrize("mode,compiles", [("padded", 3), ("packed", 1)])
def test_jit_compiles_once_per_bucket(mode, compiles):
  traces = []

  @jax.jit
  def step(batch):
    traces.append(batch["tokens"].shape)
    return (batch["tokens"] * batch["loss_mask"]).sum()

  batches, _ = run(pipeline.preference_dataset(SOURCE, TOK, config(mode=mode, num_epochs=2)))
  for batch in batches:
    step(batch)
  assert len(traces) == compiles < len(batches)


def test_drop_remainder_counts_dropped_pairs():
  batches, it = run(pipeline.preference_dataset(SOURCE, TOK, config(drop_remainder=True)))
  assert all(b["pair_mask"].all() for b in batches)
  assert 4 * len(batches) + it.counters["dropped_remainder"] == len(SOURCE)
  assert it.counters["dropped_remainder"] > 0
  with pytest.raises(ValueError, match="drop_remainder is for padded batches"):
    config(mode="packed", drop_remainder=True)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_multi_epoch_reshuffles_and_covers_each_epoch(mode):
  cfg = config(mode=mode, num_epochs=3, drop_remainder=False)
  batches, it = run(pipeline.preference_dataset(SOURCE, TOK, cfg))
  order = [int(i) for b in batches for i in b["example_index"] if i >= 0]
  assert collections.Counter(order) == collections.Counter(list(range(len(SOURCE))) * 3)
  examples = pipeline.preference_dataset(SOURCE, TOK, cfg).examples
  n = len(SOURCE)
  epochs = [[examples[e * n + k].index for k in range(n)] for e in range(3)]
  assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch is a permutation
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_deterministic_given_seed(mode):
  a, _ = run(pipeline.preference_dataset(SOURCE, TOK, config(mode=mode)))
  # read_ahead only changes how many rows are tokenized together, never the batches.
  b, _ = run(pipeline.preference_dataset(SOURCE, TOK, config(mode=mode, read_ahead=1)))
  c, _ = run(pipeline.preference_dataset(SOURCE, TOK, config(mode=mode, seed=4)))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert [x["example_index"].tolist() for x in a] != [x["example_index"].tolist() for x in c]


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_resume_from_json_state_matches_uninterrupted_run(mode):
  cfg = config(mode=mode, num_epochs=2)
  full, full_it = run(pipeline.preference_dataset(SOURCE, TOK, cfg))
  saw_ready = saw_pending = False
  it = iter(pipeline.preference_dataset(SOURCE, TOK, cfg))
  states = []
  for _ in full:  # the state after every batch, incl. mid-window and after the final flush
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
  for stop, state in enumerate(states[:-1], start=1):
    saw_ready |= bool(state["ready"])
    saw_pending |= any(state["batcher"])
    resumed = iter(pipeline.preference_dataset(SOURCE, TOK, cfg))
    resumed.set_state(state)
    tail = list(resumed)
    assert len(tail) == len(full) - stop
    for x, y in zip(tail, full[stop:]):
      for k in y:
        np.testing.assert_array_equal(x[k], y[k])
    assert resumed.counters == full_it.counters
  assert saw_ready and saw_pending  # the states exercised carry planned and buffered pairs


def test_composes_with_grain_transformations():
  ds = pipeline.preference_dataset(SOURCE, TOK, config()).map(lambda b: b["example_index"].tolist())
  it = iter(ds)
  head = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  resumed = iter(ds)
  resumed.set_state(state)
  assert list(resumed) == rest and len(head + rest) == len(run(ds)[0])


def test_background_prefetch_keeps_exact_state():
  import grain
  ds = grain.experimental.ThreadPrefetchIterDataset(
      pipeline.preference_dataset(SOURCE, TOK, config(mode="packed")), prefetch_buffer_size=3)
  full, full_it = run(ds)
  it = iter(ds)
  head = [next(it) for _ in range(4)]
  state = json.loads(json.dumps(it.get_state()))
  resumed = iter(ds)
  resumed.set_state(state)
  tail = list(resumed)
  assert [b["example_index"].tolist() for b in head + tail] == [
      b["example_index"].tolist() for b in full]
  for i in (full_it, it, resumed):
    i.close()


def test_state_from_another_pipeline_is_rejected():
  _, it = run(pipeline.preference_dataset(SOURCE, TOK, config()), limit=1)
  other = iter(pipeline.preference_dataset(SOURCE, TOK, config(seed=9)))
  with pytest.raises(ValueError, match="saved by another pipeline: a data.pipeline field"):
    other.set_state(it.get_state())


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_host_shards_partition_the_data(mode):
  per_shard = []
  for shard in range(3):
    batches, _ = run(pipeline.preference_dataset(
        SOURCE, TOK, config(mode=mode, shard_index=shard, shard_count=3)))
    per_shard.append([int(i) for b in batches for i in b["example_index"] if i >= 0])
  flat = [i for s in per_shard for i in s]
  assert sorted(flat) == list(range(len(SOURCE)))
  assert all(abs(len(s) - len(SOURCE) / 3) < 1 for s in per_shard)


def test_each_host_shard_is_shuffled_with_its_own_permutation():
  """One permutation for every shard made process p's k-th row always ``perm[k]·P + p``:
  the same source neighbours in one global batch, every epoch."""
  orders = [pipeline.index_dataset(400, config(shard_index=p, shard_count=2, num_epochs=1))
            for p in range(2)]
  first, second = (np.array([o[i] for i in range(200)]) for o in orders)
  assert np.mean(second - first == 1) < 0.05  # was 1.0
  assert sorted(np.r_[first, second]) == list(range(400))


def test_default_shard_is_jax_process():
  assert pipeline.PipelineConfig().shard() == (jax.process_index(), jax.process_count())
  with pytest.raises(ValueError, match="together"):
    pipeline.PipelineConfig(shard_index=0)


def test_config_validation_and_from_mapping():
  cfg = pipeline.PipelineConfig.from_mapping({"batch_size": 2, "bucket_boundaries": [8]})
  assert cfg.bucket_boundaries == (8,) and cfg.prompt_limit == 256
  with pytest.raises(ValueError, match=r"PipelineConfig: unknown field\(s\)"):
    pipeline.PipelineConfig.from_mapping({"batchsize": 2})
  with pytest.raises(ValueError, match="max_prompt_length"):
    pipeline.PipelineConfig(max_length=8, max_prompt_length=8)
  with pytest.raises(ValueError, match="pack_window"):
    pipeline.PipelineConfig(mode="packed", batch_size=8, pack_window=8)
  # --config.data.pipeline.bucket_boundaries= parses to ('',): a TypeError and a traceback.
  with pytest.raises(ValueError, match=r"bucket_boundaries=\(''\,\) must be whole numbers"):
    pipeline.PipelineConfig(bucket_boundaries=("",))


# ---------------------------------------------------------------------------- packer


def test_first_fit_places_groups_in_order():
  groups = [(0, (5, 5)), (1, (6, 2)), (2, (3, 3)), (3, (8, 8))]
  bins = packing.first_fit(groups, rows=2, length=10, max_segments=3, max_groups=3)
  # group 0 -> rows 0 and 0 (5+5); group 1 -> 6 in row 1, 2 in row 1; group 2 -> row... none
  # (row 0 full, row 1 has 2 left): new batch; group 3 -> new batch, both rows.
  assert bins == [[[0, 0, 0], [1, 1, 1]], [[2, 0, 0]], [[3, 0, 1]]]
  with pytest.raises(ValueError, match="does not fit a row"):
    packing.first_fit([(0, (11, 1))], rows=2, length=10, max_segments=3, max_groups=3)


def test_first_fit_respects_segment_and_group_limits():
  groups = [(i, (1, 1)) for i in range(5)]
  bins = packing.first_fit(groups, rows=1, length=100, max_segments=4, max_groups=10)
  assert [len(b) for b in bins] == [2, 2, 1]
  bins = packing.first_fit(groups, rows=1, length=100, max_segments=100, max_groups=3)
  assert [len(b) for b in bins] == [3, 2]


# ---------------------------------------------------------------------------- other pipelines


def test_prompt_pipeline_left_pads():
  cfg = config(bucket_boundaries=(16,), max_prompt_length=24)
  batches, _ = run(pipeline.prompt_dataset(SOURCE, TOK, cfg))
  seen = set()
  for b in batches:
    assert b["prompt_tokens"].shape[1] in (16, 24)
    for j in np.flatnonzero(b["example_mask"]):
      mask, tok = b["prompt_mask"][j], b["prompt_tokens"][j]
      n = int(mask.sum())
      assert mask[-n:].all() and not mask[:-n].any()
      i = int(b["example_index"][j])
      expected = [BOS] + list(SOURCE[i]["prompt"].encode())
      expected = expected if len(expected) <= 24 else [BOS] + expected[len(expected) - 23:]
      assert tok[-n:].tolist() == expected
      seen.add(i)
  assert seen == set(range(len(SOURCE)))


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_sft_pipeline_loss_on_response_only(mode):
  cfg = config(mode=mode)
  batches, _ = run(pipeline.sft_dataset(SOURCE, TOK, cfg, response_key="chosen"))
  seen = set()
  for b in batches:
    assert "outcome" not in b
    for j in np.flatnonzero(b["example_mask"]):
      if mode == "padded":
        row = b["tokens"][j][b["attention_mask"][j] > 0]
        loss = b["loss_mask"][j][b["attention_mask"][j] > 0]
      else:
        r, s = b["sequence_index"][j]
        where = b["segment_ids"][r] == s
        row, loss = b["tokens"][r][where], b["loss_mask"][r][where]
      i = int(b["example_index"][j])
      prompt, chosen, _ = encoded(SOURCE[i], cfg)
      assert row.tolist() == prompt + chosen
      assert loss.tolist() == [0] * len(prompt) + [1] * len(chosen)
      seen.add(i)
  assert seen == set(range(len(SOURCE)))


# ---------------------------------------------------------------------------- packed == padded


def standin_logits(params, tokens, segment_ids, positions):
  """Attention-free LM: token + position embedding + causal mean over the segment so far."""
  emb = params["embed"][tokens]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
  causal = jnp.tril(jnp.ones(tokens.shape[-1:] * 2, bool))
  weights = (same & causal).astype(jnp.float32)
  weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
  h = jnp.tanh(emb + params["pos"][positions] + jnp.einsum("nts,nsd->ntd", weights, emb))
  return h @ params["out"]


def token_logps(logits, tokens):
  """log p(token_t | < t) from the logits at t-1; 0 at t=0."""
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def padded_pair_logps(logits_fn, batch):
  tokens, mask = batch["tokens"], batch["attention_mask"]
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  lp = token_logps(logits_fn(tokens, mask, None, positions), tokens)
  per_row = (lp * batch["loss_mask"]).sum(-1)
  b = batch["pair_mask"].shape[0]
  return per_row[:b], per_row[b:]


def packed_pair_logps(logits_fn, num_segments, batch):
  tokens, seg = batch["tokens"], batch["segment_ids"]
  lp = token_logps(logits_fn(tokens, None, seg, batch["positions"]), tokens)
  sums = segments.segment_sums(lp * batch["loss_mask"], seg, num_segments)
  return (segments.gather_pairs(sums, batch["chosen_index"]),
          segments.gather_pairs(sums, batch["rejected_index"]))


def collect(batches, fn):
  fn = jax.jit(fn)
  out = {}
  for b in batches:
    chosen, rejected = jax.device_get(fn(b))
    for j in np.flatnonzero(b["pair_mask"]):
      out[int(b["example_index"][j])] = (float(chosen[j]), float(rejected[j]))
  return out


def _random_like(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32), tree)


def _standin():
  shapes = {"embed": jax.ShapeDtypeStruct((TOK.vocab_size, 16), jnp.float32),
            "pos": jax.ShapeDtypeStruct((64, 16), jnp.float32),
            "out": jax.ShapeDtypeStruct((16, TOK.vocab_size), jnp.float32)}
  params = _random_like(shapes, 0, 0.7)
  return lambda tokens, mask, seg, positions: standin_logits(
      params, tokens, mask if seg is None else seg, positions)


def _decoder():
  """A tiny Llama (RoPE, GQA) with random weights, built abstractly (no init compile)."""
  from flax import nnx
  from prefjax.models import decoder
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=TOK.vocab_size, num_layers=1)
  abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  graphdef, state = nnx.split(abstract)
  model = nnx.merge(graphdef, _random_like(state, 1, 0.3))

  def logits_fn(tokens, mask, seg, positions):
    if seg is None:
      return model(tokens, attention_mask=mask)
    return model(tokens, segment_ids=seg, positions=positions)
  return logits_fn


@pytest.mark.parametrize("model", ["standin", "decoder"])
def test_packed_sequence_logps_equal_padded(model):
  logits_fn = _standin() if model == "standin" else _decoder()
  cfg = config(bucket_boundaries=(), max_segments_per_row=6)
  source = SOURCE[:20]
  padded, _ = run(pipeline.preference_dataset(source, TOK, cfg))
  packed, _ = run(pipeline.preference_dataset(source, TOK, dataclasses.replace(cfg, mode="packed")))
  ref = collect(padded, functools.partial(padded_pair_logps, logits_fn))
  got = collect(packed, functools.partial(packed_pair_logps, logits_fn, cfg.max_segments_per_row))
  assert ref.keys() == got.keys() == set(range(len(source)))
  ref_arr, got_arr = np.array([ref[i] for i in sorted(ref)]), np.array([got[i] for i in sorted(ref)])
  assert np.abs(ref_arr).min() > 1.0  # real sums of many token log-probs
  np.testing.assert_allclose(got_arr, ref_arr, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- real data


def test_hh_harmless_through_load_preferences(hh_harmless_test_file, gpt2_bpe_dir, tmp_path):
  from prefjax.data import sources
  source = sources.load_preferences(
      "hh_rlhf/harmless-base", "test[:200]", data_dir=tmp_path,
      manual_dir=hh_harmless_test_file.parent.parent)
  tok = tokenize.load_tokenizer(gpt2_bpe_dir)
  cfg = pipeline.PipelineConfig(
      mode="packed", batch_size=24, max_length=384, max_prompt_length=256, pack_rows=8,
      pack_length=512, max_segments_per_row=16, num_epochs=1, shard_index=0, shard_count=1)
  batches, it = run(pipeline.preference_dataset(source, tok, cfg))
  pairs = {}
  for b in batches:
    pairs.update(packed_sequences(b))
  assert sorted(pairs) == list(range(len(source))) == list(range(200))
  exact = 0
  for i, (prompt, chosen, rejected) in pairs.items():
    row = source[i]
    assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1
    if len(prompt) < 256 and chosen[-1] == tok.eos_id and rejected[-1] == tok.eos_id:
      assert tok.decode(prompt[1:]) == row["prompt"]
      assert tok.decode(chosen[:-1]) == row["chosen"]
      assert tok.decode(rejected[:-1]) == row["rejected"]
      exact += 1
    else:  # cut at token boundaries: a suffix of the prompt, prefixes of the responses
      tail = tok.decode(prompt[1:])
      assert "\ufffd" in tail or row["prompt"].endswith(tail)
      for ids, text in ((chosen, row["chosen"]), (rejected, row["rejected"])):
        body = tok.decode(ids[:-1] if ids[-1] == tok.eos_id else ids)
        assert "\ufffd" in body or text.startswith(body)
  c = it.counters
  assert exact >= 150 and exact + c["truncated_prompt"] + c["truncated_response"] >= 200
  assert c["truncated_prompt"] == sum(len(p) == 256 for p, _, _ in pairs.values())
  assert c["real_tokens"] / c["token_slots"] > 0.8
