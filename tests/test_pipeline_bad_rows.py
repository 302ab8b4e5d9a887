"""The pipeline on rows it cannot use and sources that fail: endless passes whose every row
is dropped, a read that raised, responses a chat template makes the same tokens."""

import pytest

from prefjax.data import pipeline
from tests.test_pipeline import SOURCE, TOK, config, run


# A 40-token prompt leaves 16 of max_length 48 for the responses: fewer than 20.
_OVER_LONG = {"prompt": "p" * 40, "chosen": " a" * 20, "rejected": " b" * 20}


def test_an_endless_pass_whose_every_row_is_dropped_stops_with_the_counts():
  it = iter(pipeline.preference_dataset([_OVER_LONG] * 9, TOK,
                                        config(num_epochs=None, min_response_length=20)))
  with pytest.raises(ValueError, match=r"the source: every one of its 9 rows is dropped "
                                       r"\(.*'dropped_over_long': 18"):
    next(it)


def test_one_usable_row_among_dropped_ones_still_fills_endless_batches():
  rows = [_OVER_LONG] * 25
  rows.insert(11, {"prompt": "q", "chosen": " yes", "rejected": " no"})
  it = iter(pipeline.preference_dataset(rows, TOK,
                                        config(num_epochs=None, min_response_length=20)))
  for _ in range(3):  # 12 epochs, each usable once, in a new shuffled place
    assert set(next(it)["example_index"].tolist()) == {11}


class _FailsOnce:
  """A source whose row ``bad`` raises the first time it is read (a network blip)."""

  def __init__(self, rows, bad):
    self.rows, self.bad, self.failed = rows, bad, False

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    if index == self.bad and not self.failed:
      self.failed = True
      raise OSError("connection reset")
    return self.rows[index]


def test_a_read_that_raised_is_retried_by_the_next_call_and_loses_no_row():
  source = _FailsOnce(SOURCE, bad=13)
  it = iter(pipeline.preference_dataset(source, TOK, config(read_ahead=4, shuffle=False)))
  seen = []
  with pytest.raises(OSError, match="connection reset"):
    for batch in it:
      seen += batch["example_index"].tolist()
  seen += [i for batch in it for i in batch["example_index"].tolist()]
  assert sorted(i for i in seen if i >= 0) == list(range(len(SOURCE)))
  assert it.counters["examples_read"] == len(SOURCE)


def test_responses_a_chat_template_makes_the_same_tokens_are_dropped_and_counted():
  rows = [{"prompt": "Capital?", "chosen": "Paris", "rejected": " Paris\n"},
          {"prompt": "Capital?", "chosen": "Paris", "rejected": "Rome"}]
  batches, it = run(pipeline.preference_dataset(rows, TOK, config(prompt_style="chat")))
  assert [i for b in batches for i in b["example_index"].tolist() if i >= 0] == [1]
  assert it.counters["dropped_identical_tokens"] == 1
  raw, _ = run(pipeline.preference_dataset(rows, TOK, config()))  # raw: other bytes, kept
  assert sorted(i for b in raw for i in b["example_index"].tolist() if i >= 0) == [0, 1]
