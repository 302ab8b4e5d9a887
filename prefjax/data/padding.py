"""Length buckets and padded collation for the pipelines in ``prefjax.data.pipeline``.

Examples are duck-typed: ``index``, ``prompt`` and ``responses`` (int32 arrays),
``weight``, ``outcome`` and ``lengths``; ``None`` stands for a padding example
(weight 0, mask 0, one attended pad token so that no attention row is empty).
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np


class BucketBatcher:
  """Groups examples into length buckets; a bucket full of ``batch_size`` makes a batch."""

  def __init__(self, buckets: Sequence[int], batch_size: int, drop_remainder: bool):
    self.buckets = tuple(buckets)
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.pending: list[list[int]] = [[] for _ in self.buckets]

  def bucket_of(self, length: int) -> int:
    return bisect.bisect_left(self.buckets, length)

  def add(self, position: int, example: Any) -> list[dict[str, Any]]:
    k = self.bucket_of(max(example.lengths))
    self.pending[k].append(position)
    if len(self.pending[k]) < self.batch_size:
      return []
    items, self.pending[k] = self.pending[k], []
    return [{"bucket": k, "items": items}]

  def flush(self) -> tuple[list[dict[str, Any]], int]:
    """Remaining partial batches (or none when dropping); returns (plans, dropped count)."""
    plans = [{"bucket": k, "items": items} for k, items in enumerate(self.pending) if items]
    self.pending = [[] for _ in self.buckets]
    if self.drop_remainder:
      return [], sum(len(p["items"]) for p in plans)
    return plans, 0

  def get_state(self) -> Any:
    return [list(p) for p in self.pending]

  def set_state(self, state: Any) -> None:
    if len(state) != len(self.buckets):
      raise ValueError(f"state has {len(state)} buckets, pipeline has {len(self.buckets)}")
    self.pending = [[int(i) for i in p] for p in state]


def pad_rows(seqs: Sequence[tuple[np.ndarray, np.ndarray] | None], length: int, pad_id: int,
              *, left: bool = False) -> dict[str, np.ndarray]:
  """(prompt, response) per row -> tokens/attention_mask/loss_mask ``[N, length]``."""
  n = len(seqs)
  tokens = np.full((n, length), pad_id, np.int32)
  attention = np.zeros((n, length), np.int32)
  loss = np.zeros((n, length), np.int32)
  for i, seq in enumerate(seqs):
    if seq is None:  # padding example: a single attended pad token, no loss.
      attention[i, -1 if left else 0] = 1
      continue
    prompt, response = seq
    full = np.concatenate([prompt, response])
    start = length - len(full) if left else 0
    tokens[i, start:start + len(full)] = full
    attention[i, start:start + len(full)] = 1
    loss[i, start + len(prompt):start + len(full)] = 1
  return {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}


def example_fields(examples: Sequence[Any]) -> dict[str, np.ndarray]:
  real = [e is not None for e in examples]
  return {
      "weight": np.asarray([e.weight if e is not None else 0.0 for e in examples], np.float32),
      "outcome": np.asarray([e.outcome if e is not None else 1.0 for e in examples], np.float32),
      "mask": np.asarray(real, np.float32),
      "example_index": np.asarray([e.index if e is not None else -1 for e in examples], np.int32),
  }


def collate_padded(examples: Sequence[Any], length: int, pad_id: int,
                   num_responses: int) -> dict[str, np.ndarray]:
  """Right-padded rows, response-major: row ``i*B + b`` = prompt_b + responses_b[i]."""
  rows = [(e.prompt, e.responses[i]) if e is not None else None
          for i in range(num_responses) for e in examples]
  return {**pad_rows(rows, length, pad_id), **example_fields(examples)}


def collate_prompts(examples: Sequence[Any], length: int,
                    pad_id: int) -> dict[str, np.ndarray]:
  """Left-padded prompts for generation: ``prompt_tokens`` / ``prompt_mask [B, P]``."""
  empty = np.zeros(0, np.int32)
  rows = pad_rows([(e.prompt, empty) if e is not None else None for e in examples], length, pad_id, left=True)
  fields = example_fields(examples)
  return {"prompt_tokens": rows["tokens"], "prompt_mask": rows["attention_mask"],
          "example_mask": fields["mask"], "example_index": fields["example_index"]}
