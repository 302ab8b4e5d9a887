"""The truncation policy of every pipeline (``pipeline.py``): prompts cut from the left,
responses from the right, pairs too long to keep a response dropped as over-long."""

from __future__ import annotations

from typing import Any, Sequence


def left_truncate(ids: list[int], limit: int, bos_id: int | None,
                  keep_start: int = 0) -> list[int]:
  """At most ``limit`` tokens: a leading BOS if there was one and the limit leaves room for
  a token after it (a limit of 1 keeps the last token), the ``keep_start`` tokens after it
  (never all of the limit), then the last tokens."""
  if len(ids) <= limit:
    return ids
  head = int(bos_id is not None and bool(ids) and ids[0] == bos_id and limit > 1)
  head += min(keep_start, limit - head - 1)
  return ids[:head] + ids[len(ids) - (limit - head):]


def truncate(prompt: list[int], responses: Sequence[list[int]], config: Any,
             bos_id: int | None) -> tuple[list[int], list[list[int]], bool, bool, str | None]:
  """Applies the truncation policy of ``config`` (a ``PipelineConfig``); returns
  (prompt, responses, cut prompt?, cut response?, drop reason)."""
  cut_prompt = False
  if len(prompt) > config.prompt_limit:
    prompt = left_truncate(prompt, config.prompt_limit, bos_id, config.prompt_keep_start)
    cut_prompt = True
  if not prompt:
    return prompt, list(responses), cut_prompt, False, "empty_prompt"
  if any(not r for r in responses):
    return prompt, list(responses), cut_prompt, False, "empty_response"
  budget = config.max_length - len(prompt)
  cut_response = any(len(r) > budget for r in responses)
  if cut_response and budget < config.min_response_length:
    return prompt, list(responses), cut_prompt, False, "over_long"
  cut = [r[:budget] for r in responses]
  if len({tuple(r) for r in cut}) < len(cut):
    # Two sides of the same tokens carry no preference: a pair's loss has zero gradient.
    # Uncut, they differed in text only (whitespace a chat template strips).
    reason = "identical_after_truncation" if cut_response else "identical_tokens"
    return prompt, list(responses), cut_prompt, False, reason
  return prompt, cut, cut_prompt, cut_response, None
