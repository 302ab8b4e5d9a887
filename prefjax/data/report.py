"""What a run did to its rows: the counts behind ``data_report.json``.

`split_report` describes one split a binary reads, from two passes made before
any model is built:

* the build (``source.summary``): rows read, built, routed to a sibling
  ``resplit_*`` split, and skipped by reason with the first `MAX_EXAMPLES`
  ``file:line: detail`` of each reason;
* a tokenization scan with the run's pipeline settings: rows used, rows dropped
  by reason (over-long, empty after formatting), prompts and responses
  truncated (count, first row ids) and the longest prompt and response seen
  (token count before truncation, first row that has it), beside the limits.

The counts add up: ``rows_read = rows_built + rows_in_other_splits +
rows_skipped`` and ``rows_selected = rows_used + rows_dropped``, where
``rows_selected`` is ``rows_built`` unless the split is sliced (``train[:10%]``).
A split with no usable row is an `EmptyDataError` naming the dataset, split
and files. `one_line` is the summary the binaries log at start.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize as tokenize_lib

MAX_EXAMPLES = 5
REPORT_FILE = "data_report.json"
_SCAN_CHUNK = 256


class EmptyDataError(ValueError):
  """A split that a run needs has no usable row."""


@dataclasses.dataclass
class _Tally:
  """A count and the first `MAX_EXAMPLES` source indices counted."""
  count: int = 0
  indices: list[int] = dataclasses.field(default_factory=list)

  def add(self, index: int) -> None:
    self.count += 1
    if len(self.indices) < MAX_EXAMPLES:
      self.indices.append(index)

  def to_json(self, source: Any) -> dict[str, Any]:
    return {"count": self.count, "examples": [_row_id(source, i) for i in self.indices]}


def _row_id(source: Any, index: int) -> str:
  row = source[index]
  return (row.get("id") if isinstance(row, Mapping) else None) or f"row {index}"


def _longest(source: Any, tokens: int, minus_index: int) -> dict[str, Any]:
  """The longest token count before truncation and the first row that has it."""
  return {"tokens": tokens, "row": _row_id(source, -minus_index) if tokens else None}


def build_counts(source: Any) -> dict[str, Any]:
  """Rows read / built / skipped by reason (first examples) of a `PreferenceSource`."""
  summary = source.summary
  examples: dict[str, list[str]] = collections.defaultdict(list)
  for problem in summary.skipped:
    if len(examples[problem.reason]) < MAX_EXAMPLES:
      examples[problem.reason].append(str(problem))
  return {
      "dataset": source.name, "split": source.split, "files": sorted(summary.input_files),
      "rows_read": summary.rows_read, "rows_built": summary.rows_built,
      "rows_in_other_splits": summary.rows_other_splits, "rows_skipped": len(summary.skipped),
      "skipped_by_reason": summary.skipped_by_reason, "skipped_examples": dict(examples),
      "notes_by_reason": dict(collections.Counter(p.reason for p in summary.notes)),
      "rows_selected": len(source),
  }


def scan(source: Any, tokenizer: tokenize_lib.Tokenizer, config: pipeline_lib.PipelineConfig,
         response_keys: Sequence[str]) -> dict[str, Any]:
  """Tokenizes every row of ``source`` as the pipeline would and counts what the cuts do."""
  tokenize_fn = pipeline_lib.TokenizeFn(source, tokenizer, config, tuple(response_keys))
  dropped: dict[str, _Tally] = collections.defaultdict(_Tally)
  cut_prompts, cut_responses = _Tally(), _Tally()
  longest_prompt, longest_response, used = (0, -1), (0, -1), 0  # (tokens, index)
  weighted = hard = 0
  for start in range(0, len(source), _SCAN_CHUNK):
    for example in tokenize_fn.many(range(start, min(start + _SCAN_CHUNK, len(source)))):
      if example.untruncated:
        longest_prompt = max(longest_prompt, (example.untruncated[0], -example.index))
        longest_response = max([longest_response, *((n, -example.index)
                                                     for n in example.untruncated[1:])])
      if example.dropped is not None:
        dropped[example.dropped].add(example.index)
        continue
      used += 1
      weighted += example.weight > 0
      hard += example.weight > 0 and example.outcome in (0.0, 1.0)
      if example.truncated_prompt:
        cut_prompts.add(example.index)
      if example.truncated_response:
        cut_responses.add(example.index)
  return {
      "rows_used": used, "rows_dropped": sum(t.count for t in dropped.values()),
      "rows_weighted": weighted, "rows_weighted_hard_label": hard,
      "dropped_by_reason": {reason: t.to_json(source) for reason, t in dropped.items()},
      "truncated_prompts": cut_prompts.to_json(source),
      "truncated_responses": cut_responses.to_json(source),
      "longest_prompt": _longest(source, *longest_prompt),
      "longest_response": _longest(source, *longest_response),
      "prompt_limit": config.prompt_limit, "max_length": config.max_length,
  }


def scan_key(source: Any, tokenizer: tokenize_lib.Tokenizer,
             config: pipeline_lib.PipelineConfig, response_keys: Sequence[str]) -> str:
  """What a scan's result depends on: the split's content, the tokenizer, the cuts."""
  parts = [getattr(source, "fingerprint", ""), len(source), tokenizer.name, list(response_keys),
           config.max_length, config.prompt_limit, config.min_response_length,
           config.prompt_style, config.add_bos]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def split_report(source: Any, tokenizer: tokenize_lib.Tokenizer,
                 config: pipeline_lib.PipelineConfig, response_keys: Sequence[str],
                 previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`build_counts` + `scan` of one split; `EmptyDataError` when no row is usable.

  A ``previous`` report of the same split with the same `scan_key` (a resumed run's)
  is reused instead of tokenizing every row again.
  """
  check_nonempty(source)
  build, key = build_counts(source), scan_key(source, tokenizer, config, response_keys)
  if previous and previous.get("scan_key") == key:
    counts = {k: v for k, v in previous.items() if k not in build and k != "iterator"}
  else:
    counts = scan(source, tokenizer, config, response_keys)
  report = {**build, **counts, "scan_key": key,
            "fingerprint": getattr(source, "fingerprint", None)}  # the content alone
  if not report["rows_used"]:
    raise EmptyDataError(_no_rows_message(report))
  return report


def check_trainable(report: Mapping[str, Any], *, hard_labels: bool) -> None:
  """`EmptyDataError` when a split's usable rows all have weight 0, or, for a loss that
  drops ties and soft preferences (``hard_labels``), none has outcome 0 or 1 as well."""
  used = report["rows_used"]
  weighted = report.get("rows_weighted", used)  # reports scanned before these counts
  where = f"{report['dataset']} split {report['split']!r}"
  if not weighted:
    raise EmptyDataError(f"{where}: all {used} usable rows have weight 0; nothing to learn "
                         "or evaluate on")
  if hard_labels and not report.get("rows_weighted_hard_label", weighted):
    raise EmptyDataError(f"{where}: none of its {weighted} weighted rows has outcome 0 or 1, "
                         "and the loss drops ties and soft preferences (use a soft-label "
                         "loss such as dpo, or label the pairs)")


def check_nonempty(source: Any) -> None:
  """`EmptyDataError` naming dataset, split and files when ``source`` has no row."""
  if len(source) == 0:
    raise EmptyDataError(_no_rows_message(build_counts(source)))


def _no_rows_message(counts: Mapping[str, Any]) -> str:
  parts = [f"read {counts['rows_read']} from {', '.join(counts['files']) or 'no file'}"]
  if counts["rows_skipped"]:
    first = next(iter(counts["skipped_examples"].values()))[0]
    parts.append(f"skipped {counts['rows_skipped']} {counts['skipped_by_reason']} "
                 f"(first: {first})")
  if counts["rows_in_other_splits"]:
    parts.append(f"{counts['rows_in_other_splits']} in sibling resplit_* splits")
  if counts.get("rows_dropped"):
    reasons = {k: v["count"] for k, v in counts["dropped_by_reason"].items()}
    parts.append(f"dropped {counts['rows_dropped']} in tokenization {reasons}")
  if counts["rows_selected"] != counts["rows_built"]:
    parts.append(f"{counts['rows_selected']} of {counts['rows_built']} built selected")
  return (f"{counts['dataset']} split {counts['split']!r} has no usable rows: "
          + "; ".join(parts))


def one_line(reports: Mapping[str, Mapping[str, Any]]) -> str:
  """``data: train <dataset>[split] read .., built .., ...; eval ...`` on one line."""
  return "data: " + " | ".join(f"{name} {_describe(r)}" for name, r in reports.items())


def _describe(r: Mapping[str, Any]) -> str:
  text = f"{r['dataset']}[{r['split']}]: read {r['rows_read']}, built {r['rows_built']}"
  if r["rows_in_other_splits"]:
    text += f" (+{r['rows_in_other_splits']} in sibling splits)"
  text += f", skipped {r['rows_skipped']}"
  if r["rows_skipped"]:
    firsts = [e[0].split(": ", 1)[0] for e in r["skipped_examples"].values()]
    text += f" {r['skipped_by_reason']} first at {', '.join(firsts)}"
  text += f"; used {r['rows_used']}, dropped {r['rows_dropped']}"
  if r["rows_dropped"]:
    text += f" {({k: v['count'] for k, v in r['dropped_by_reason'].items()})}"
  prompt, response = r["longest_prompt"], r["longest_response"]
  text += (f"; truncated {r['truncated_prompts']['count']} prompts (longest "
           f"{prompt['tokens']} tokens at {prompt['row']}, limit {r['prompt_limit']})")
  if response["tokens"]:  # prompt-only data (RL, best-of-n) has no responses
    text += (f" and {r['truncated_responses']['count']} responses (longest "
             f"{response['tokens']} tokens at {response['row']}; a prompt and its response "
             f"share max_length {r['max_length']})")
  return text


def mostly_truncated(reports: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """One line per split where more than half the used rows lose response tokens."""
  lines = []
  for name, r in reports.items():
    cut = r["truncated_responses"]["count"]
    if r["longest_response"]["tokens"] and r["rows_used"] and cut > r["rows_used"] / 2:
      lines.append(f"{name}: {cut} of {r['rows_used']} rows have a response cut to fit "
                   f"max_length {r['max_length']} (prompt + response); raise "
                   "data.pipeline.max_length unless that is intended")
  return lines
