"""Blocks of tokenized examples, the next block read on a background thread.

``BatchIterator`` tokenizes the examples it walks in blocks of ``read_ahead``
positions. Reading and tokenizing a block is a pure function of its positions, so a
background thread can prepare the next block while the caller works on this one: a
train step on the calling thread (``xla_cpu.keep_freed_memory``) releases the GIL for
its whole length. The iterator's state, counters and batches are what they would be
without it; an error in a row surfaces when its block is needed, from the caller's
thread.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

# One worker for every iterator; it starts its thread at the first submit.
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefjax-read")


class BlockReader:
  """``block(start)``: ``{position: example}`` for ``[start, start + size)`` (cut at
  ``length``), read by ``read(positions)``; then starts reading the block after it."""

  def __init__(self, read: Callable[[Sequence[int]], list[Any]], length: int, size: int):
    self._read, self._length, self._size = read, length, max(size, 1)
    self._pending: tuple[int, concurrent.futures.Future] | None = None

  def block(self, start: int) -> dict[int, Any]:
    positions = self._positions(start)
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == start:
      examples = pending[1].result()
    else:
      if pending is not None:
        pending[1].cancel()
      examples = self._read(positions)
    if positions.stop < self._length:
      following = self._positions(positions.stop)
      self._pending = (positions.stop, _EXECUTOR.submit(self._read, following))
    return dict(zip(positions, examples))

  def _positions(self, start: int) -> range:
    return range(start, min(start + self._size, self._length))

  def reset(self) -> None:
    """Drops the block being read ahead (the iterator moved: ``set_state``)."""
    if self._pending is not None:
      self._pending[1].cancel()
      self._pending = None
