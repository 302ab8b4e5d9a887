"""PandaLM human test set: 999 response pairs, each judged by three annotators.

Raw file (manual dir, default ``$PREFJAX_DATA_DIR/pandalm``): ``testset-v1.json``,
a JSON array of {idx, motivation_app, cmp_key, instruction, input, response1,
response2, annotator1..3} where a vote is 0 = tie, 1 = response1, 2 = response2.

Orientation is FIXED: ``chosen`` = response1, ``rejected`` = response2, and the
label is ``outcome`` = 1 (response1 wins), 0 (response2 wins) or 0.5 (tie), by
majority of the three votes. When no label has two votes (one tie, one vote
each way) the annotators disagree completely and the pair is a tie (0.5).
The votes, idx, cmp_key, motivation_app, instruction and input are kept in
``meta``. The prompt is the instruction, followed by "\\n\\n" and the input when
the input is non-empty; apply a chat template later, in the tokenizer.

A few responses are JSON ``true`` instead of text in the release (the literal
answer "True"); they are read as the string "True", flagged ``meta["repaired"]``
and listed as notes in the build summary. 54 pairs have an empty response (the
model produced nothing and the annotators judged that): they are kept, flagged
``meta["empty_response"]`` and listed as notes.

Paper: "PandaLM: An Automatic Evaluation Benchmark for LLM Instruction Tuning
Optimization", Wang et al. 2023, arXiv 2306.05087. Licence: Apache-2.0.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any, Iterator

import tensorflow_datasets as tfds

from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import rows as rows_lib

FILE_NAME = "testset-v1.json"
VOTE_FIELDS = ("annotator1", "annotator2", "annotator3")
_OUTCOME_OF_VOTE = {0: 0.5, 1: 1.0, 2: 0.0}


def majority_outcome(votes: list[int]) -> float:
  """1.0 / 0.0 / 0.5 for a response1 win / response2 win / tie; 1-1-1 splits are ties."""
  label, count = collections.Counter(votes).most_common(1)[0]
  return _OUTCOME_OF_VOTE[label] if count * 2 > len(votes) else 0.5


def _response(item: dict[str, Any], field: str, notes: list[tuple[str, str]]) -> str:
  value = item.get(field)
  if isinstance(value, bool):
    notes.append(("repaired", f"{field} was JSON {json.dumps(value)}; read as {str(value)!r}"))
    return str(value)
  if not isinstance(value, str):
    raise rows_lib.RowError(
        "missing_field" if value is None else "wrong_type",
        f"field {field!r} must be text, got {value!r}")
  return value


def parse_item(item: Any) -> rows_lib.PreferenceRow:
  """One PandaLM item -> a preference row (see the module docstring)."""
  if not isinstance(item, dict):
    raise rows_lib.RowError("not_an_object", f"expected an object, got {type(item).__name__}")
  notes: list[tuple[str, str]] = []
  chosen = _response(item, "response1", notes)
  rejected = _response(item, "response2", notes)
  instruction = item.get("instruction")
  extra = item.get("input") or ""
  if not isinstance(instruction, str) or not isinstance(extra, str):
    raise rows_lib.RowError("wrong_type", "fields 'instruction' and 'input' must be text")
  votes = [item.get(f) for f in VOTE_FIELDS]
  if any(isinstance(v, bool) or v not in _OUTCOME_OF_VOTE for v in votes):
    raise rows_lib.RowError("bad_value", f"votes must be 0, 1 or 2, got {votes}")
  empty = rows_lib.check_responses(chosen, rejected, allow_empty=True)
  prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
  meta = {"idx": item.get("idx"), "cmp_key": item.get("cmp_key"),
          "motivation_app": item.get("motivation_app"), "instruction": instruction,
          "input": extra, "votes": votes}
  if notes:
    meta["repaired"] = [detail for _, detail in notes]
  notes.extend(rows_lib.note_empty(meta, empty))
  return rows_lib.PreferenceRow(prompt, chosen, rejected, majority_outcome(votes), 1.0, meta,
                                tuple(notes))


class Pandalm(base.PreferenceBuilder, skip_registration=True):
  """PandaLM human-annotated pairs with ties."""

  name = "pandalm"
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/WeOpenML/PandaLM"
  CITATION = ("@article{wang2023pandalm, title={PandaLM: An Automatic Evaluation Benchmark "
              "for LLM Instruction Tuning Optimization}, author={Wang, Yidong and others}, "
              "journal={arXiv preprint arXiv:2306.05087}, year={2023}}")
  _unit = "item"
  VERSION = tfds.core.Version("1.3.1")
  RELEASE_NOTES = {**base.PreferenceBuilder.RELEASE_NOTES,
                   "1.3.1": "Row ids name the item ('testset-v1.json item 3'): the file is a "
                            "pretty-printed array, whose line 3 is not item 3."}

  def _official_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, list[pathlib.Path]]:
    path = pathlib.Path(dl_manager.manual_dir) / FILE_NAME
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found. {base.THIRD_PARTY_NOTE}")
    return {"test": [path]}

  def _read_rows(self, path: pathlib.Path
                 ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
    items = _load_array(path)
    for number, item in enumerate(items, start=1):
      try:
        rows_lib.check_storable(item)
        yield number, parse_item(item)
      except rows_lib.RowError as e:
        yield number, rows_lib.RowProblem(str(path), number, e.reason, e.detail, "item")


def _load_array(path: pathlib.Path) -> list[Any]:
  """The whole file must parse: a JSON array cannot lose one item and keep the rest."""
  try:
    items = json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}; the file is damaged") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); "
                     "the whole array is unreadable, so nothing was built") from e
  if not isinstance(items, list):
    raise ValueError(f"{path}: expected a JSON array of items, got {type(items).__name__}")
  return items
