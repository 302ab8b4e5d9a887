"""Metric writers: ``metrics.jsonl``, TensorBoard (tensorboardX) and absl logs.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``time``
(Unix seconds), ``wall_time`` (seconds since the run first started, carried
across resumes) and every metric. Train metrics are plain names, eval metrics
are prefixed ``eval/``. On resume from step ``k`` the writer first drops every
line with ``step > k`` (those steps are recomputed), so a resumed run never
duplicates steps, and a second write for the step of the last line (say, the
final eval after the final train metrics) merges into that line: one line per
step. Only process 0 writes. Metric names are written as TensorBoard stores them
(``tensorboard_name``), so both sinks use the same name.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm
from absl import logging

from prefjax import files
from prefjax import parallel

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_NOT_IN_TENSORBOARD_NAMES = re.compile(r"[^-/\w.]")  # tensorboardX's rule for tags


def tensorboard_name(name: str) -> str:
  """``name`` as TensorBoard stores it: characters other than letters, digits and
  ``_-/.`` become ``_``, leading slashes go."""
  return _NOT_IN_TENSORBOARD_NAMES.sub("_", name).lstrip("/")


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (ints stay ints); NaN/inf kept as floats."""
  out = {}
  for name, value in jax.device_get(dict(metrics)).items():
    arr = np.asarray(value)
    if arr.shape != ():
      raise ValueError(f"metric {name!r} must be a scalar; got shape {arr.shape}")
    out[name] = int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
  return out


def read_metrics(workdir: str | os.PathLike[str], *,
                 torn_tail_ok: bool = False) -> list[dict[str, Any]]:
  """Parses ``metrics.jsonl``; raises with the line number on a corrupt line. A non-finite
  value reads as the string it is written as (``files.from_standard_json`` -> floats).

  ``torn_tail_ok``: a corrupt LAST line (cut short by a full disk or a crash mid-write)
  is left out with a warning instead (a resumed run rewrites the file without it).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  records = []
  for i, (lineno, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if torn_tail_ok and i == len(lines) - 1:
        logging.warning("%s:%d: not a JSON object (%s), its last line: left out, as a "
                        "write cut short", path, lineno, e)
        break
      raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from e
  return records


def _summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch
  when it can (for writing graphs, which prefjax never does), and torch then costs a JAX
  run 120 MB more memory, its thread pool, and a slow growth per logged step."""
  if "torch" in sys.modules:  # already loaded by the caller: nothing to spare
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]  # ``import torch`` fails
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes metrics to JSONL + TensorBoard and logs throughput lines."""

  def __init__(self, workdir: str | os.PathLike[str], *, resume_step: int = 0,
               total_steps: int | None = None, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.total_steps = total_steps
    self._is_writer = jax.process_index() == 0
    self._path = os.path.join(self.workdir, METRICS_FILE)
    self._wall_offset = 0.0
    self._start = time.time()
    self._last_time, self._last_step, self._tokens = self._start, resume_step, 0.0
    self._compiled = False  # the first train record's interval includes compilation
    self._tb = None
    self._last_record: dict[str, Any] | None = None
    self._last_offset = 0
    self._warned: set[str] = set()
    if not self._is_writer:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._truncate_after(resume_step)
    if tensorboard:
      self._tb = _summary_writer_class()(os.path.join(self.workdir, TENSORBOARD_DIR),
                                         purge_step=resume_step + 1)  # a rerun drops old points

  def _truncate_after(self, step: int) -> None:
    """Keeps only lines with ``step <= step``, one per step in step order (lines of the
    same step, e.g. from two runs that once shared the workdir, merge; the later wins);
    continues wall time from them."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_metrics(self.workdir, torn_tail_ok=True):
      s = r.get("step", 0)
      if s <= step:
        by_step[s] = {**by_step.get(s, {}), **r}
    kept = [by_step[s] for s in sorted(by_step)]
    if kept:
      self._wall_offset = max(float(r.get("wall_time", 0.0)) for r in kept)
    def fill(f):
      for r in kept:
        self._last_offset = f.tell()
        f.write(files.dumps(r) + "\n")
    files.write_atomically(self._path, fill, mode="w")
    self._last_record = kept[-1] if kept else None

  @property
  def wall_time(self) -> float:
    """Seconds of training so far, summed over resumed runs."""
    return self._wall_offset + time.time() - self._start

  def add_tokens(self, n: float) -> None:
    self._tokens += n

  def write(self, step: int, values: Mapping[str, Any]) -> dict[str, Any]:
    """Appends one record for ``step`` (JSONL + TensorBoard); returns it.

    Writing the step of the last line again merges into that line, so the file
    holds at most one record per step.
    """
    values = self._renamed(to_python(values))
    record = {"step": int(step), "time": time.time(), "wall_time": self.wall_time, **values}
    if not self._is_writer:
      return record
    with open(self._path, "r+" if os.path.exists(self._path) else "w") as f:
      if self._last_record is not None and self._last_record["step"] == record["step"]:
        record = {**self._last_record, **record}
        f.truncate(self._last_offset)
      f.seek(0, os.SEEK_END)
      self._last_offset = f.tell()
      f.write(files.dumps(record) + "\n")
    self._last_record = record
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
    return record

  def _renamed(self, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` under their TensorBoard names; warns once per renamed metric."""
    out, origin = {}, {}
    for name, value in values.items():
      legal = tensorboard_name(name)
      if legal in out:
        raise ValueError(f"metrics {origin[legal]!r} and {name!r} are both named {legal!r} "
                         "in TensorBoard; rename one")
      if legal != name and name not in self._warned:
        self._warned.add(name)
        logging.warning("metric %r is written as %r (the name TensorBoard keeps; summary.json "
                        "keeps the evaluator's name)", name, legal)
      out[legal], origin[legal] = value, name
    return out

  def log(self, step: int, train: Mapping[str, Any] | None = None,
          eval_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ONE record for ``step`` with train and/or ``eval/``-prefixed metrics.

    Train records also get ``steps_per_sec`` and, when tokens were counted with
    :meth:`add_tokens`, ``tokens_per_sec`` since the previous train record, summed over
    processes (every process must then call ``log`` with train metrics at the same steps).
    """
    values: dict[str, Any] = {}
    if train is not None:
      values.update(to_python(train))
      values.update(self._rates(step))
      self._log_line(step, values)
    if eval_metrics is not None:
      evals = to_python(eval_metrics)
      values.update({"eval/" + k: v for k, v in evals.items()})
      logging.info("eval at step %d: %s", step, _fmt(evals))
    return self.write(step, values)

  def exclude_from_rates(self, seconds: float) -> None:
    """Leaves ``seconds`` of work that is not training (an eval, a checkpoint save) out of
    the next record's ``steps_per_sec``, ``tokens_per_sec`` and ETA."""
    self._last_time += seconds

  def _rates(self, step: int) -> dict[str, float]:
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    rates = {"steps_per_sec": (step - self._last_step) / elapsed}
    tokens = parallel.sum_over_processes(self._tokens)  # each process counts its own batches
    if tokens:
      rates["tokens_per_sec"] = tokens / elapsed
    self._last_time, self._last_step, self._tokens = now, step, 0.0
    return rates

  def _log_line(self, step: int, values: Mapping[str, float]) -> None:
    rate = values["steps_per_sec"]
    eta = ""
    if self.total_steps and step < self.total_steps and not self._compiled:
      eta = ", compilation included; ETA from the next line"
    elif self.total_steps and rate > 0:
      eta = f", ETA {_format_seconds((self.total_steps - step) / rate)}"
    self._compiled = True
    tokens = f", {values['tokens_per_sec']:.4g} tokens/s" if "tokens_per_sec" in values else ""
    shown = {k: v for k, v in values.items() if k not in ("steps_per_sec", "tokens_per_sec")}
    logging.info("step %d/%s: %s (%.3g steps/s%s%s)", step, self.total_steps or "?",
                 _fmt(shown), rate, tokens, eta)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """One log line per finished unit of long work (``[stage k/N] what``), with the time
  elapsed and an ETA from the mean time per unit so far."""

  def __init__(self, stage: str, total: int):
    self.stage, self.total, self.done, self.start = stage, total, 0, time.time()

  def step(self, what: str, units: int = 1) -> None:
    self.done += units
    elapsed = time.time() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    logging.info("[%s %d/%d] %s  (%s elapsed, ETA %s)", self.stage, self.done, self.total,
                 what, _format_seconds(elapsed), _format_seconds(eta))


class LogBar:
  """tqdm's ``update`` / ``set_postfix_str`` / ``n`` where stderr is not a terminal (a
  log file, a batch job): an absl line at most every ``every_s`` seconds and one at the
  end, each with the count, the rate and an ETA, instead of ``\r`` frames."""

  def __init__(self, total: int, desc: str, unit: str, initial: int = 0,
               every_s: float = 30.0):
    self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
    self.postfix, self._initial = "", initial
    self._start = self._last = time.time()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.time()
    if now - self._last >= self.every_s:
      self._log(now)

  def set_postfix_str(self, text: str) -> None:
    self.postfix = text

  def _log(self, now: float) -> None:
    self._last = now
    elapsed = max(now - self._start, 1e-9)
    rate = (self.n - self._initial) / elapsed
    eta = (f", ETA {_format_seconds((self.total - self.n) / rate)}"
           if rate > 0 and self.n < self.total else "")
    units = _plural(self.unit)
    logging.info("%s: %d/%d %s (%s elapsed, %.3g %s/s%s)%s", self.desc, self.n, self.total,
                 units, _format_seconds(elapsed), rate, units, eta,
                 f" {self.postfix}" if self.postfix else "")

  def __enter__(self) -> "LogBar":
    return self

  def __exit__(self, *exc: Any) -> None:
    self._log(time.time())


def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0,
                 disable: bool = False) -> Any:
  """A tqdm bar on a terminal, a :class:`LogBar` elsewhere (nothing when ``disable``)."""
  if disable or sys.stderr.isatty():
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                     disable=disable)
  return LogBar(total, desc, unit, initial)


def _plural(unit: str) -> str:
  """``query`` -> ``queries``, ``pair`` -> ``pairs``."""
  return unit[:-1] + "ies" if unit.endswith("y") and unit[-2:-1] not in "aeiou" else unit + "s"


def _fmt(values: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
