"""The truncation policy (``prefjax.data.truncation``): prompts cut from the left (their BOS
and ``prompt_keep_start`` tokens kept), responses from the right, over-long pairs dropped."""

import pytest

from prefjax.data import pipeline
from prefjax.data import tokenize
from prefjax.data import truncation

TOK = tokenize.ByteTokenizer()
BOS, EOS = TOK.bos_id, TOK.eos_id


@pytest.mark.parametrize("prompt,responses,kw,expected", [
    # Fits: untouched.
    ([BOS, 1, 2], [[3, EOS], [4, EOS]], {}, ([BOS, 1, 2], [[3, EOS], [4, EOS]], False, False, None)),
    # Prompt over max_prompt_length=4: cut from the left, BOS kept.
    ([BOS, 1, 2, 3, 4, 5], [[6, EOS], [7]], {},
     ([BOS, 3, 4, 5], [[6, EOS], [7]], True, False, None)),
    # Responses over max_length - prompt = 6: cut from the right (EOS lost).
    ([BOS, 1], [[1, 2, 3, 4, 5, 6, 7, EOS], [8, EOS]], {},
     ([BOS, 1], [[1, 2, 3, 4, 5, 6], [8, EOS]], False, True, None)),
    # Both cuts.
    ([BOS, 1, 2, 3, 4, 5, 6], [list(range(10)), [1]], {},
     ([BOS, 4, 5, 6], [list(range(4)), [1]], True, True, None)),
    # A response would be cut below min_response_length=5 -> dropped as over-long.
    ([BOS, 1, 2, 3, 4, 5], [list(range(9)), [1]], {"min_response_length": 5},
     ([BOS, 3, 4, 5], [list(range(9)), [1]], True, False, "over_long")),
    # A budget equal to min_response_length=4 keeps the pair, its long response cut to 4.
    ([BOS, 1, 2, 3, 4, 5], [list(range(9)), [1]], {"min_response_length": 4},
     ([BOS, 3, 4, 5], [[0, 1, 2, 3], [1]], True, True, None)),
    # Same prompt budget, short responses: nothing to cut, nothing dropped.
    ([BOS, 1, 2, 3, 4, 5], [[1, 2], [1]], {"min_response_length": 5},
     ([BOS, 3, 4, 5], [[1, 2], [1]], True, False, None)),
    ([BOS, 1], [[], [1]], {}, ([BOS, 1], [[], [1]], False, False, "empty_response")),
    # Responses that differ only past the cut: no preference left, dropped and counted.
    ([BOS, 1], [[5, 6, 7, 8, 9, 1, 2], [5, 6, 7, 8, 9, 1, 3]], {},
     ([BOS, 1], [[5, 6, 7, 8, 9, 1, 2], [5, 6, 7, 8, 9, 1, 3]], False, False,
      "identical_after_truncation")),
    # Identical only were both left whole: kept (the reader refuses identical responses).
    ([BOS, 1], [[5, 6], [5, 6, 7, 8, 9, 1, 3]], {},
     ([BOS, 1], [[5, 6], [5, 6, 7, 8, 9, 1]], False, True, None)),
    # prompt_keep_start: BOS, the first token after it, then the end.
    ([BOS, 1, 2, 3, 4, 5, 6], [[1], [2]], {"prompt_keep_start": 1},
     ([BOS, 1, 5, 6], [[1], [2]], True, False, None)),
    # The same tokens uncut (texts that differ in whitespace a chat template strips).
    ([BOS, 1], [[5, 6, EOS], [5, 6, EOS]], {},
     ([BOS, 1], [[5, 6, EOS], [5, 6, EOS]], False, False, "identical_tokens")),
])
def test_truncation_policy(prompt, responses, kw, expected):
  cfg = pipeline.PipelineConfig(max_length=8, max_prompt_length=4, **kw)
  assert truncation.truncate(prompt, responses, cfg, BOS) == expected


@pytest.mark.parametrize("ids,limit,bos,expected", [
    ([9, 1, 2, 3], 2, 9, [9, 3]),
    ([9, 1, 2, 3], 2, None, [2, 3]),
    ([5, 1, 2, 3], 2, 9, [2, 3]),
    ([9, 1, 2, 3], 1, 9, [3]),
    ([9, 1], 5, 9, [9, 1]),
])
def test_left_truncate(ids, limit, bos, expected):
  assert truncation.left_truncate(ids, limit, bos) == expected


@pytest.mark.parametrize("ids,limit,bos,keep_start,expected", [
    ([9, 1, 2, 3, 4, 5], 4, 9, 2, [9, 1, 2, 5]),
    ([9, 1, 2, 3, 4, 5], 4, None, 2, [9, 1, 4, 5]),
    ([9, 1, 2, 3, 4, 5], 4, 9, 7, [9, 1, 2, 5]),  # the end keeps at least one token
    ([9, 1, 2], 4, 9, 2, [9, 1, 2]),
])
def test_left_truncate_keeps_the_start(ids, limit, bos, keep_start, expected):
  assert truncation.left_truncate(ids, limit, bos, keep_start) == expected


def test_prompt_keep_start_must_leave_room_for_the_end():
  with pytest.raises(ValueError, match="prompt_keep_start=3 must be in"):
    pipeline.PipelineConfig(max_length=8, max_prompt_length=4, prompt_keep_start=3)
  assert pipeline.PipelineConfig(max_length=2).prompt_keep_start == 0
