"""Property-based tests (hypothesis): the jsonl reader, tokenization + truncation, packing, losses.

Random Unicode (lone surrogates included), empty strings, very long responses,
extreme and overflowing weights, all-padding batches: every input ends as a
row, a named problem or a clear error, never a crash without a message or a
NaN, and the counts always add up. Runs are derandomized (the same examples on
every machine) and small, so the file takes seconds.
"""

import json
import math

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from prefjax import data as pdata
from prefjax import rm
from prefjax.data import packing
from prefjax.data import pipeline
from prefjax.data import report
from prefjax.data import tokenize
from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import rows as rows_lib
from prefjax.losses import direct
from prefjax.losses import preference

SETTINGS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
BYTES = tokenize.load_tokenizer("byte")
REASONS = {"malformed_json", "not_an_object", "missing_field", "wrong_type", "empty_response",
           "identical_responses", "no_shared_prompt", "bad_value", "non_utf8"}
ANY_CHAR = st.characters(categories=("L", "M", "N", "P", "S", "Z", "Cc", "Cs"))
TEXT = st.one_of(st.text(ANY_CHAR, max_size=12), st.sampled_from(["", " ", "\n\nAssistant:"]),
                 st.builds(lambda n: "y" * n, st.integers(1000, 20_000)))
NUMBER = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10, 10**400),
                   st.sampled_from([1e39, 3.4028235e38, 0.5, 0.0, -0.0]), st.booleans(),
                   st.text(max_size=3), st.none())


@st.composite
def jsonl_lines(draw) -> bytes:
  """A line: a preference-like object with random fields, or arbitrary bytes."""
  if draw(st.integers(0, 5)) == 0:
    return draw(st.binary(max_size=40)).replace(b"\n", b" ")
  obj = {key: draw(TEXT) for key in ("prompt", "chosen", "rejected")
         if draw(st.integers(0, 9))}  # each field missing one time in ten
  for key in ("weight", "outcome"):
    if draw(st.booleans()):
      obj[key] = draw(NUMBER)
  return json.dumps(obj).encode("utf-8")


def _write(tmp_path, lines: list[bytes]):
  path = tmp_path / "random.jsonl"
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return path


@SETTINGS
@hypothesis.given(lines=st.lists(jsonl_lines(), min_size=1, max_size=8))
def test_every_jsonl_line_is_a_valid_row_or_a_named_problem(tmp_path_factory, lines):
  path = _write(tmp_path_factory.mktemp("lines"), lines)
  expected = [n for n, line in enumerate(lines, start=1) if line.strip()]
  out = list(base.read_jsonl_rows(path, layout="auto"))
  assert [n for n, _ in out] == expected
  for line, row in out:
    if isinstance(row, rows_lib.RowProblem):
      assert row.reason in REASONS and row.file == str(path) and row.line == line
      continue
    assert 0.0 <= row.weight <= rows_lib.MAX_WEIGHT
    assert 0.0 <= row.outcome <= 1.0 and row.chosen != row.rejected
    for text in (row.prompt, row.chosen, row.rejected):
      text.encode("utf-8")  # storable text: no lone surrogate survives


@SETTINGS
@hypothesis.given(texts=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=(
    "Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=20), min_size=3, max_size=3,
    unique=True), weight=st.floats(0.0, 100.0), outcome=st.floats(0.0, 1.0))
def test_a_valid_line_comes_back_as_the_row_it_wrote(tmp_path_factory, texts, weight, outcome):
  """The property above would hold for a reader that refused every line."""
  prompt, chosen, rejected = texts
  line = json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "weight": weight, "outcome": outcome}).encode("utf-8")
  ((number, row),) = base.read_jsonl_rows(_write(tmp_path_factory.mktemp("valid"), [line]),
                                          layout="auto")
  assert number == 1 and not isinstance(row, rows_lib.RowProblem), row
  assert (row.prompt, row.chosen, row.rejected) == (prompt, chosen, rejected)
  assert (row.weight, row.outcome) == (weight, outcome)


@hypothesis.settings(SETTINGS, max_examples=4)
@hypothesis.given(lines=st.lists(jsonl_lines(), min_size=1, max_size=6))
def test_built_counts_add_up_in_every_split(tmp_path_factory, lines):
  tmp = tmp_path_factory.mktemp("build")
  path = _write(tmp, lines)
  name = f"jsonl:{path}"
  splits = ("train", "resplit_train", "resplit_validation", "resplit_test")
  built = 0
  for split in splits:
    try:
      source = pdata.load_preferences(name, split, data_dir=tmp / "cache", on_bad_row="skip")
    except report.EmptyDataError as e:
      assert str(e).startswith(f"{name} split {split!r} has no usable rows: read ")
      continue
    if split.startswith("resplit_"):
      built += source.summary.rows_built
    try:
      counts = report.split_report(source, BYTES, pipeline.PipelineConfig(max_length=16),
                                   ("chosen", "rejected"))
    except report.EmptyDataError as e:  # every row dropped by the pipeline
      assert str(e).startswith(f"{name} split {split!r} has no usable rows: read ")
      continue
    assert counts["rows_read"] == len([line for line in lines if line.strip()])
    assert counts["rows_read"] == (counts["rows_built"] + counts["rows_in_other_splits"]
                                   + counts["rows_skipped"])
    assert counts["rows_selected"] == counts["rows_used"] + counts["rows_dropped"]
    assert sum(counts["skipped_by_reason"].values()) == counts["rows_skipped"]
    assert counts["rows_built"] == source.summary.rows_built
  train = pdata.load_preferences(name, "train", data_dir=tmp / "cache", on_bad_row="skip")
  assert built == train.summary.rows_built  # the three resplits partition the rows


@SETTINGS
@hypothesis.given(text=st.text(max_size=50))
def test_byte_tokenizer_round_trips_any_text(text):
  ids = BYTES.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == BYTES.bos_id and ids[-1] == BYTES.eos_id and len(ids) == len(
      text.encode("utf-8")) + 2
  assert BYTES.decode(ids) == text


@st.composite
def pipeline_configs(draw) -> pipeline.PipelineConfig:
  max_length = draw(st.integers(2, 48))
  prompt = draw(st.one_of(st.none(), st.integers(1, max_length - 1)))
  return pipeline.PipelineConfig(max_length=max_length, max_prompt_length=prompt,
                                 min_response_length=draw(st.integers(1, 6)),
                                 add_bos=draw(st.booleans()))


@SETTINGS
@hypothesis.given(rows=st.lists(st.fixed_dictionaries(
    {"prompt": st.text(max_size=60), "chosen": st.text(max_size=80),
     "rejected": st.text(max_size=80)}), min_size=1, max_size=6), config=pipeline_configs())
def test_tokenized_rows_respect_the_limits_or_are_dropped_with_a_reason(rows, config):
  examples = pipeline.TokenizeFn(rows, BYTES, config, ("chosen", "rejected")).many(
      range(len(rows)))
  for row, ex in zip(rows, examples):
    prompt_len, *response_lens = ex.untruncated
    assert prompt_len == len(row["prompt"].encode("utf-8")) + int(config.add_bos)
    kept_prompt = min(prompt_len, config.prompt_limit)
    budget = config.max_length - kept_prompt
    cut = any(n > budget for n in response_lens)
    full = [BYTES.encode(row[key], add_eos=True) for key in ("chosen", "rejected")]
    # The rule each reason names, recomputed from the untruncated counts and texts.
    expected = ("empty_prompt" if kept_prompt == 0
                else "over_long" if cut and budget < config.min_response_length
                else "identical_after_truncation" if cut and full[0][:budget] == full[1][:budget]
                else "identical_tokens" if full[0] == full[1] else None)
    assert ex.dropped == expected
    if ex.dropped is not None:
      continue
    assert len(ex.prompt) <= config.prompt_limit and ex.truncated_prompt == (
        prompt_len > config.prompt_limit)
    assert ex.truncated_response == any(len(r) < n for r, n in zip(ex.responses, response_lens))
    for response, tokens in zip(ex.responses, full):
      assert 1 <= len(response) and len(ex.prompt) + len(response) <= config.max_length
      assert list(response) == tokens[:len(response)]  # cut from the right only


@st.composite
def pair_lengths(draw, length: int) -> list[tuple[int, int, int]]:
  """(prompt, chosen, rejected) token counts whose sequences fit a row of ``length``."""
  out = []
  for _ in range(draw(st.integers(1, 24))):
    prompt = draw(st.integers(1, length - 1))
    out.append((prompt, draw(st.integers(1, length - prompt)),
                draw(st.integers(1, length - prompt))))
  return out


@SETTINGS
@hypothesis.given(data=st.data(), rows=st.integers(2, 4), length=st.integers(4, 40),
                  max_segments=st.integers(1, 5), max_groups=st.integers(1, 6),
                  window=st.integers(2, 12))
def test_packing_places_every_pair_once_within_the_grid(data, rows, length, max_segments,
                                                        max_groups, window):
  hypothesis.assume(window > max_groups)
  pairs = data.draw(pair_lengths(length))
  examples = [pipeline.Example(i, np.full(p, 7, np.int32), (np.ones(c, np.int32),
                                                            np.ones(r, np.int32)))
              for i, (p, c, r) in enumerate(pairs)]
  packer = packing.WindowPacker(rows=rows, length=length, max_segments=max_segments,
                                max_groups=max_groups, window=window)
  plans = [plan for ex in examples for plan in packer.add(ex.index, ex)] + packer.flush()[0]
  placed = [item[0] for plan in plans for item in plan["items"]]
  assert sorted(placed) == list(range(len(pairs)))
  for plan in plans:
    items = plan["items"]
    assert len(items) <= max_groups
    batch = packing.collate_packed(items, [examples[item[0]] for item in items], rows=rows,
                                   length=length, max_groups=max_groups, pad_id=0)
    prompt_and_responses = [pairs[item[0]] for item in items]
    assert np.count_nonzero(batch["segment_ids"]) == sum(2 * p + c + r
                                                         for p, c, r in prompt_and_responses)
    assert batch["segment_ids"].max(axis=1).max() <= max_segments
    for g, item in enumerate(items):
      for k, (row, segment) in enumerate(batch["index"][g, :len(item) - 1]):
        in_segment = batch["segment_ids"][row] == segment
        assert np.count_nonzero(batch["loss_mask"][row] * in_segment) == pairs[item[0]][1 + k]
        assert list(batch["positions"][row][in_segment]) == list(range(np.sum(in_segment)))


LOGP = st.floats(-1e4, 0.0, width=32)
TOKENS = st.integers(1, 4096)


@hypothesis.settings(SETTINGS, max_examples=20)  # each draws a new jax trace
@hypothesis.given(name=st.sampled_from(sorted(direct.DIRECT_LOSSES)),
                  beta=st.floats(0.01, 10.0), size=st.integers(1, 4), data=st.data())
def test_every_direct_loss_is_finite_with_finite_gradients(name, beta, size, data):
  fields = [np.array(data.draw(st.lists(LOGP, min_size=size, max_size=size)), np.float32)
            for _ in range(4)]
  counts = [np.array(data.draw(st.lists(TOKENS, min_size=size, max_size=size)), np.float32)
            for _ in range(2)]
  x = direct.PairLogps(*map(jnp.asarray, fields + counts))
  loss_fn = direct.DIRECT_LOSSES[name]
  loss = loss_fn(x, beta=beta)
  assert loss.shape == (size,) and loss.dtype == jnp.float32
  assert np.all(np.isfinite(loss)), (name, x, loss)
  grads = jax.grad(lambda p, r: jnp.sum(loss_fn(x._replace(policy_chosen=p,
                                                            policy_rejected=r), beta=beta)),
                   argnums=(0, 1))(x.policy_chosen, x.policy_rejected)
  assert all(np.all(np.isfinite(g)) for g in grads), (name, x, grads)


REWARD = st.floats(-1e4, 1e4, width=32)


@hypothesis.settings(SETTINGS, max_examples=20)  # each draws a new jax trace
@hypothesis.given(name=st.sampled_from(sorted(preference.PREFERENCE_LOSSES)),
                  pairs=st.lists(st.tuples(REWARD, REWARD, st.sampled_from([0.0, 0.5, 1.0])),
                                 min_size=1, max_size=4))
def test_every_preference_loss_is_finite_with_finite_gradients(name, pairs):
  r_c, r_r, outcome = (jnp.asarray(v, jnp.float32) for v in zip(*pairs))
  loss_fn = preference.PREFERENCE_LOSSES[name]
  loss = loss_fn(r_c, r_r, outcome=outcome)
  assert loss.shape == (len(pairs),) and np.all(np.isfinite(loss)), (name, pairs, loss)
  grads = jax.grad(lambda a, b: jnp.sum(loss_fn(a, b, outcome=outcome)), argnums=(0, 1))(r_c, r_r)
  assert all(np.all(np.isfinite(g)) for g in grads), (name, pairs, grads)


@SETTINGS
@hypothesis.given(rewards=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                   min_size=4, max_size=4))
def test_an_all_padding_batch_has_zero_rm_loss_whatever_the_rewards(rewards):
  r_c, r_r = jnp.asarray(rewards[:2], jnp.float32), jnp.asarray(rewards[2:], jnp.float32)
  batch = {"tokens": np.zeros((4, 3), np.int32), "attention_mask": np.ones((4, 3), np.int32),
           "pair_mask": np.zeros(2, np.float32), "weight": np.zeros(2, np.float32),
           "outcome": np.ones(2, np.float32)}
  model = lambda tokens, attention_mask: jnp.concatenate([r_c, r_r])  # noqa: E731
  loss_fn = rm.make_loss_fn(dict(name="bt"), num_columns=1, objectives=(), num_segments=None)
  loss, _ = loss_fn(model, batch, jax.random.key(0))
  assert float(loss) == 0.0

