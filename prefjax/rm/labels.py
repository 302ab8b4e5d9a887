"""Objective labels of preference pairs for multi-objective reward models (``multi:a,b``).

Each source row is labelled with one or more of the model's named objectives
by ``meta[data.objective_field]`` (a name or a list of names), or
``data.objective`` for every row. Batches then carry ``objective_mask [B, O]``,
looked up by ``example_index``, and ``objective_share [B, O]``: every row holds the batch's
count of pairs labelled with each objective divided by its B rows. The loss divides each
objective by the sum of its shares, which over the whole batch is that count and over any
of A equal microbatches a 1/A of it, so gradient accumulation normalises each objective by
the whole batch's pairs (``prefjax.rm.loss``).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from absl import logging


def objective_table(source: Any, objectives: Sequence[str], data_cfg: Mapping[str, Any]
                    ) -> np.ndarray:
  """``[len(source), O]`` 0/1: which objectives each source row is labelled with."""
  fixed, field = data_cfg.get("objective"), data_cfg.get("objective_field") or "objective"
  table = np.zeros((len(source), len(objectives)), np.float32)
  unlabelled = 0
  for i in range(len(source)):
    row = source[i]
    labels = fixed if fixed else (row.get("meta") or {}).get(field)
    labels = [labels] if isinstance(labels, str) else labels
    if labels is not None and (not isinstance(labels, (list, tuple))
                               or not all(isinstance(label, str) for label in labels)):
      raise ValueError(f"row {row.get('id', i)}: meta[{field!r}]={labels!r} must be an "
                       f"objective name or a list of them, from {list(objectives)}")
    if not labels:
      unlabelled += 1
      continue
    for label in labels:
      if label not in objectives:
        raise ValueError(f"row {row.get('id', i)}: meta[{field!r}]={label!r} is not one of "
                         f"the model's objectives {list(objectives)}")
      table[i, objectives.index(label)] = 1.0
  if unlabelled:
    logging.warning("%d of %d pairs have no objective label (meta[%r]); they contribute "
                    "no loss", unlabelled, len(source), field)
  return table


def objective_counts(table: np.ndarray, objectives: Sequence[str]) -> dict[str, Any]:
  """For ``data_report.json``: the pairs labelled with each objective, and those with none
  (they train no head: a log warning alone left the report's counts silent on them)."""
  return {"labelled": {o: int(n) for o, n in zip(objectives, table.sum(axis=0))},
          "unlabelled": int(np.sum(table.sum(axis=1) == 0))}


def check_every_objective_labelled(table: np.ndarray, objectives: Sequence[str],
                                   data_cfg: Mapping[str, Any], split: str) -> None:
  """Raises ValueError when an objective has no labelled pair in ``split``: its head
  would get no loss and never train."""
  counts = table.sum(axis=0)
  if missing := [o for o, n in zip(objectives, counts) if n == 0]:
    field = data_cfg.get("objective_field") or "objective"
    raise ValueError(f"objective(s) {missing} of the model's {list(objectives)} label no pair "
                     f"of split {split!r} (meta[{field!r}], or data.objective for all pairs): "
                     "their heads would not train")


def add_objective_mask(batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
  """``batch`` plus ``objective_mask [B, O]`` (zeros for padding pairs) and
  ``objective_share [B, O]`` (each row: the batch's labelled pairs per objective / B)."""
  index = np.asarray(batch["example_index"])
  if index.ndim != 1:
    raise ValueError(f"example_index of shape {index.shape}: objective labels need a batch of "
                     "[B] pairs (not packed into microbatches)")
  mask = np.where((index >= 0)[:, None], table[np.maximum(index, 0)], 0.0).astype(np.float32)
  share = np.broadcast_to(mask.sum(axis=0) / max(len(index), 1), mask.shape)
  return {**batch, "objective_mask": mask, "objective_share": share.astype(np.float32)}


class ObjectiveMaskIterator:
  """Adds ``objective_mask`` to every batch of ``iterator``; checkpointable like it."""

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]], table: np.ndarray):
    self._it, self._table = iterator, table

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return add_objective_mask(next(self._it), self._table)

  @property
  def counters(self) -> dict[str, int]:
    return dict(getattr(self._it, "counters", {}))

  def get_state(self) -> Any:
    return self._it.get_state()

  def set_state(self, state: Any) -> None:
    self._it.set_state(state)
