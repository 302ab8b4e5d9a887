"""Reading and validating raw preference rows, shared by every builder.

A raw row becomes a `PreferenceRow` or a `RowProblem` naming the file, the line
(or JSON-array item) and the reason. Builders never drop a row silently: every
row read is either built, routed to another split, or recorded as a problem.

Problem reasons (the ``reason`` field, stable strings usable in filters):

- ``malformed_json``: the line is not valid JSON (or holds NaN/Infinity).
- ``duplicate_key``: an object names a key twice (JSON parsers keep the last silently).
- ``not_an_object``: the line is valid JSON but not an object.
- ``missing_field`` / ``wrong_type``: a required field is absent or not text.
- ``misnamed_field``: a field's name differs from a known one only in case (``Prompt``).
- ``empty_response``: chosen or rejected response is empty or whitespace only
  (user and synthetic data; HH-RLHF and PandaLM keep such pairs, because an
  empty answer is what their annotators judged, and list them as notes).
- ``identical_responses``: chosen == rejected, so the pair carries no preference.
- ``no_shared_prompt``: two transcripts share no "\\n\\nAssistant:" prefix, so the
  prompts disagree and the pair is not a comparison of two responses.
- ``bad_value``: weight/outcome/meta/votes out of range (a weight above
  ``MAX_WEIGHT``, 1e12) or of the wrong type, or a number that is not finite in
  float32, the dtype it is stored in (``1e39``).
- ``non_utf8``: the line's bytes are not valid UTF-8, or a ``\\ud800``-style escape
  decodes to a lone surrogate (valid JSON, but not text that can be stored).
- ``truncated_gzip``: the compressed stream ends early (file cut short); the
  partial row and anything after it are lost, counted as one skipped row.
- ``corrupt_gzip``: the bytes are not a gzip stream or fail its checks.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import gzip
import hashlib
import json
import math
import os
import pathlib
import re
import reprlib
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from prefjax.data.tfds_builders import chat_rows  # imports this module back: used in calls only

ASSISTANT_TAG = "\n\nAssistant:"
HUMAN_TAG = "\n\nHuman:"

# Deterministic re-split by conversation hash (`resplit_name`): (name, upper bound of the
# hash fraction).
RESPLIT_BUCKETS: tuple[tuple[str, float], ...] = (
    ("train", 0.8), ("validation", 0.9), ("test", 1.0))
RESPLIT_PREFIX = "resplit_"
# Above this a pair's weight × loss, summed over a batch in float32, can overflow.
MAX_WEIGHT = 1e12


@dataclasses.dataclass(frozen=True)
class RowProblem:
  """A raw row that could not be turned into a preference pair."""
  file: str
  line: int  # 1-based line number (or item number for JSON arrays)
  reason: str
  detail: str
  unit: str = "line"

  def location(self) -> str:
    if self.unit == "line":
      return f"{self.file}:{self.line}"
    return f"{self.file} {self.unit} {self.line}"

  def __str__(self) -> str:
    return f"{self.location()}: {self.reason}: {self.detail}"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class RowError(ValueError):
  """Raised by the row parsers; the reader turns it into a `RowProblem`."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
  """One validated preference pair (text, before tokenization)."""
  prompt: str
  chosen: str
  rejected: str
  outcome: float = 1.0  # 1 = chosen preferred, 0 = rejected preferred, 0.5 = tie
  weight: float = 1.0
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # (reason, detail) facts about a row that was built anyway; listed in the build summary.
  notes: tuple[tuple[str, str], ...] = ()


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
  """Splits two dialogue transcripts into (prompt, chosen response, rejected response).

  The prompt is everything up to and including the last "\\n\\nAssistant:" that
  both transcripts share, so earlier turns stay in the prompt. The responses are
  the remainders and keep their leading space (" Sure, ..."): prompt + response
  reproduces each transcript exactly, and BPE tokenizers see the space the way
  they saw it in pretraining.

  Raises:
    RowError: ``identical_responses`` or ``no_shared_prompt``.
  """
  if chosen == rejected:
    raise RowError("identical_responses", "chosen and rejected transcripts are identical")
  common = chosen[:_common_prefix_length(chosen, rejected)]
  cut = common.rfind(ASSISTANT_TAG)
  if cut < 0:
    raise RowError(
        "no_shared_prompt",
        f"chosen and rejected share no {ASSISTANT_TAG!r} prefix (they diverge at "
        f"character {len(common)}), so their prompts disagree")
  end = cut + len(ASSISTANT_TAG)
  return chosen[:end], chosen[end:], rejected[end:]


def _common_prefix_length(a: str, b: str) -> int:
  """Length of the longest common prefix, by binary search over C-speed slice compares."""
  low, high = 0, min(len(a), len(b))
  while low < high:
    mid = (low + high + 1) // 2
    if a[:mid] == b[:mid]:
      low = mid
    else:
      high = mid - 1
  return low


def _text_field(obj: Mapping[str, Any], field: str) -> str:
  if field not in obj:
    raise RowError("missing_field", f"missing field {field!r} (fields present: {sorted(obj)})")
  value = obj[field]
  if not isinstance(value, str):
    raise RowError("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
  return value


def _number_field(obj: Mapping[str, Any], field: str, default: float,
                  low: float, high: float) -> float:
  """A number in [low, high] that stays finite in float32, the dtype it is stored in."""
  value = obj.get(field, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RowError("bad_value", f"field {field!r} must be a number, got {value!r}")
  with np.errstate(over="ignore"):
    stored = np.float32(value) if abs(value) < 1e300 else np.float32(np.inf)  # huge ints
  if not (math.isfinite(stored) and low <= value <= high):
    why = "overflows float32, the dtype it is stored in" if low <= value <= high else (
        f"is outside [{low}, {high}]")
    raise RowError("bad_value", f"field {field!r} = {reprlib.repr(value)} {why}")
  return float(value)


def check_responses(chosen: str, rejected: str, *, allow_empty: bool = False) -> list[str]:
  """Rejects pairs that carry no usable preference signal.

  Returns the names of the empty responses, which can only be non-empty when
  ``allow_empty`` (curated human data where "the model said nothing" is what
  the annotators judged).
  """
  if chosen == rejected:
    raise RowError("identical_responses", "chosen and rejected responses are identical")
  empty = [name for name, text in (("chosen", chosen), ("rejected", rejected))
           if not text.strip()]
  if empty and not allow_empty:
    raise RowError("empty_response", f"{' and '.join(empty)} response is empty")
  return empty


def note_empty(meta: dict[str, Any], empty: list[str]) -> tuple[tuple[str, str], ...]:
  """Flags kept empty responses in ``meta['empty_response']`` and as a summary note."""
  if not empty:
    return ()
  meta["empty_response"] = empty
  return (("empty_response_kept", f"{' and '.join(empty)} response is empty"),)


def parse_preference_object(obj: Any, *, layout: str = "auto",
                            allow_empty: bool = False) -> PreferenceRow:
  """Validates one raw JSON row.

  Three layouts: ``"prompt"`` = {"prompt", "chosen", "rejected"} with responses
  only; ``"transcripts"`` = {"chosen", "rejected"} full dialogue transcripts
  split like HH-RLHF by `split_transcript`; ``"messages"`` = fields given as lists of
  chat messages (`chat_rows`); ``"auto"`` picks "messages" when a field is a list, else
  "prompt" when the row has a prompt field. Optional: ``weight`` (>= 0,
  default 1), ``outcome`` in [0, 1] (default 1 = chosen preferred; 0.5 = tie),
  ``meta`` (an object); ``null`` counts as absent. Any other key is kept in
  ``meta`` under its own name. A prompt that ends in whitespace before a response
  that starts without it is built with a note: tokenized apart, the response's
  first token lacks the space a joint encoding would give it.
  """
  if not isinstance(obj, dict):
    hint = " (a JSON array: JSONL holds one object per line)" if isinstance(obj, list) else ""
    raise RowError("not_an_object",
                   f"expected a JSON object, got {type(obj).__name__}{hint}")
  _check_field_names(obj)
  layout = _row_layout(obj, layout)
  if layout == "messages":
    prompt, chosen, rejected = chat_rows.split_messages(obj)
  elif layout == "prompt":
    prompt = _text_field(obj, "prompt")
    chosen = _text_field(obj, "chosen")
    rejected = _text_field(obj, "rejected")
  else:
    prompt, chosen, rejected = split_transcript(
        _text_field(obj, "chosen"), _text_field(obj, "rejected"))
  empty = check_responses(chosen, rejected, allow_empty=allow_empty)
  weight = _number_field(obj, "weight", 1.0, 0.0, MAX_WEIGHT)
  outcome = _number_field(obj, "outcome", 1.0, 0.0, 1.0)
  meta = _meta(obj)
  notes = note_empty(meta, empty)
  if any(tag in text for tag in (HUMAN_TAG, ASSISTANT_TAG) for text in (chosen, rejected)):
    meta["multi_turn_response"] = True
    notes += (("multi_turn_response", _MULTI_TURN[layout]),)
  if labels := sorted(k for k in obj if k.lower() in _LABEL_LIKE_FIELDS):
    notes += (("label_like_field", f"field(s) {labels} look like a preference label, but "
               "only 'outcome' (P(chosen preferred), default 1) is read; kept in meta"),)
  if prompt[-1:].isspace() and any(r and not r[0].isspace() for r in (chosen, rejected)):
    notes += (("space_at_prompt_end", "the prompt ends in whitespace and a response starts "
               "without it; move the space into the responses (\"Answer:\" + \" Paris\")"),)
  return PreferenceRow(prompt, chosen, rejected, outcome, weight, meta, notes)


LAYOUTS = ("auto", "prompt", "transcripts", "messages")
_MULTI_TURN = {
    "prompt": "a response holds a Human/Assistant turn tag",
    "transcripts": "transcripts diverge before the last assistant turn",
    "messages": "a reply holds more than one message (the conversations diverge before "
                "the last assistant message)"}


def _row_layout(obj: Mapping[str, Any], layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; layouts are {list(LAYOUTS)}")
  if layout != "auto":
    return layout
  if chat_rows.has_messages(obj):
    return "messages"
  return "prompt" if "prompt" in obj else "transcripts"


_KNOWN_FIELDS = ("prompt", "chosen", "rejected", "weight", "outcome", "meta")
# Other datasets' names for the label; a row that carries one was probably meant to set
# ``outcome`` (``{"label": 0}`` is still outcome 1: chosen preferred).
_LABEL_LIKE_FIELDS = frozenset({
    "label", "labels", "preferred", "preference", "winner", "choice", "better",
    "score_chosen", "score_rejected", "chosen_score", "rejected_score", "chosen_rating",
    "rejected_rating"})


def _check_field_names(obj: Mapping[str, Any]) -> None:
  """A known field misspelt would be kept in ``meta`` and its default used (``outcom``:
  outcome 1, whatever the row says), so a near miss is an error, not an extra key."""
  for key in obj:
    if key in _KNOWN_FIELDS:
      continue
    if key.lower() in _KNOWN_FIELDS:
      raise RowError("misnamed_field", f"field {key!r}: did you mean {key.lower()!r}? "
                                       "(field names are lower case)")
    if close := difflib.get_close_matches(key.lower(), _KNOWN_FIELDS, n=1, cutoff=0.85):
      raise RowError("misnamed_field", f"field {key!r}: did you mean {close[0]!r}? (an "
                                       "unknown key is kept in meta, its field's default used)")


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
  """``meta`` plus the row's unknown top-level keys, which must not contradict it."""
  meta = obj.get("meta")
  meta = {} if meta is None else meta
  if not isinstance(meta, dict):
    raise RowError("bad_value", f"field 'meta' must be an object, got {reprlib.repr(meta)}")
  extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
  for key in sorted(extra.keys() & meta.keys()):
    if extra[key] != meta[key]:
      raise RowError("bad_value", f"field {key!r} is {reprlib.repr(extra[key])} but meta's "
                                  f"{key!r} is {reprlib.repr(meta[key])}")
  return {**meta, **extra}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only then can a lone surrogate appear


def _reject_constant(name: str) -> Any:
  raise ValueError(f"non-finite number {name} is not valid JSON")


class _DuplicateKey(ValueError):
  pass


def _object_without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  seen: set[str] = set()
  for key, _ in pairs:
    if key in seen:
      raise _DuplicateKey(f"key {key!r} appears twice in one object")
    seen.add(key)
  return dict(pairs)


def iter_json_lines(path: pathlib.Path) -> Iterator[tuple[int, Any | RowProblem]]:
  """Yields (line number, parsed JSON value or `RowProblem`) for a (gzipped) JSONL file.

  Blank lines are not rows and are passed over. Decoding happens per line, so a
  bad byte sequence costs one row, not the file.
  """
  file = str(path)
  opener = gzip.open if path.name.endswith(".gz") else open
  line_no = 0
  try:
    with opener(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
          raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows write one
        if not raw.strip():
          continue
        yield line_no, _decode_json_line(raw, file, line_no)
  except EOFError:
    yield line_no + 1, RowProblem(
        file, line_no + 1, "truncated_gzip",
        f"compressed stream ends before its end marker after line {line_no}; "
        "the file was cut short and any rows after that line are lost")
  except (gzip.BadGzipFile, zlib.error) as e:
    yield line_no + 1, RowProblem(
        file, line_no + 1, "corrupt_gzip", f"gzip stream unreadable after line {line_no}: {e}")


def _decode_json_line(raw: bytes, file: str, line_no: int) -> Any | RowProblem:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return RowProblem(file, line_no, "non_utf8",
                      f"invalid UTF-8 byte {raw[e.start:e.start + 1]!r} at byte {e.start} of the line")
  try:
    value = json.loads(text, parse_constant=_reject_constant,
                       object_pairs_hook=_object_without_duplicate_keys)
  except _DuplicateKey as e:
    return RowProblem(file, line_no, "duplicate_key", str(e))
  except json.JSONDecodeError as e:
    detail = f"{e.msg.removesuffix(' at')} at column {e.pos + 1}"
    if line_no == 1 and text.lstrip().startswith("["):
      detail += " (the file looks like one JSON array: JSONL holds one object per line)"
    elif "\r" in text.rstrip("\r\n"):
      detail += (" (the line holds a carriage return: a file with CR-only line endings reads "
                 "as one line; JSONL ends lines with \\n)")
    return RowProblem(file, line_no, "malformed_json", detail)
  except ValueError as e:  # NaN / Infinity
    return RowProblem(file, line_no, "malformed_json", str(e))
  if _SURROGATE_ESCAPE.search(text):
    try:
      check_storable(value)
    except RowError as e:
      return RowProblem(file, line_no, e.reason, e.detail)
  return value


def check_storable(value: Any) -> None:
  """Raises ``non_utf8`` when a string in a parsed JSON value holds a lone surrogate."""
  try:
    json.dumps(value, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise RowError("non_utf8", "an escape decodes to the lone surrogate "
                   f"{e.object[e.start:e.end]!r}") from None


def conversation_key(prompt: str) -> str:
  """What names a prompt's dialogue: an HH-style transcript up to and including its first
  "\\n\\nAssistant:" (the opening human turn), any other prompt whole.

  Every later turn of one dialogue extends the same opening, so rows keyed by it
  stay together; a prompt without the tag (single-turn data) is its own key.
  """
  end = prompt.find(ASSISTANT_TAG)
  return prompt if end < 0 else prompt[:end + len(ASSISTANT_TAG)]


def resplit_name(prompt: str) -> str:
  """Deterministic 80/10/10 bucket of a prompt: 'train', 'validation' or 'test'.

  The bucket is the first 8 bytes of sha256(UTF-8 `conversation_key`) read as a
  fraction of 2**64, so rows of one dialogue (and rows sharing a prompt) always land
  together: the splits are disjoint by conversation, and the assignment never
  depends on file order or on other rows. (Before version 1.2.0 the whole prompt
  was hashed, and a dialogue's later turns could land in another split than its
  earlier ones: 15 of the 255 HH harmless-base ``resplit_test`` pairs shared an
  opening human turn with ``resplit_train`` pairs.)
  """
  digest = hashlib.sha256(conversation_key(prompt).encode("utf-8")).digest()
  fraction = int.from_bytes(digest[:8], "big") / 2.0**64
  for name, upper in RESPLIT_BUCKETS:
    if fraction < upper:
      return name
  return RESPLIT_BUCKETS[-1][0]


def file_sha256(path: os.PathLike[str] | str) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def to_jsonable(value: Any) -> Any:
  """Converts numpy scalars/arrays (e.g. gold rewards in meta) into JSON values."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  return value
