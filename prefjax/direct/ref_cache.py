"""Reference log-probabilities for direct alignment: on the fly, cached on disk, or none.

Every mode fills the same batch fields, ``ref_chosen`` / ``ref_rejected``
``[B]`` (and ``ref_kl [2B]`` for KTO), before the batch reaches the train step,
so the jitted loss is one program whatever the mode:

* ``online``: a frozen reference model scores each batch with
  :class:`ReferenceScorer` (its own jitted program, no gradient);
* ``cached``: :func:`load_or_build` runs that SAME scorer once over the
  dataset (same batch shapes and dtype) and stores one value per example on
  disk; batches then look their values up by ``example_index``, in any order or
  epoch. The reference model is not even built when the cache exists.
  The per-row computation of a fixed-shape jitted program does not depend on
  the other rows, so cached values are bit-identical to on-the-fly ones when a
  padded batch's length does not depend on which rows share it (fixed
  ``bucket_boundaries`` chosen per example, or ``max_length`` within one
  ``pad_to_multiple``). Padding to a batch's longest row gives the cache pass
  and shuffled training other shapes, and packed rows mix sequences: there
  they agree to float rounding only (a helper measured 1.8e-4 at most in float32; in
  bfloat16, up to 0.1 nats a sequence);
* ``none``: reference-free losses (SimPO, ORPO) read no reference fields.

The cache key is a SHA-256 over everything the values depend on: the reference
weights (params SHA-256 or checkpoint-file SHA-256), the dataset content
(``source.fingerprint``), split and size, the tokenizer fingerprint and the token a
response ends with (``tokenize.response_end_id``), the
truncation/batching settings, the model config and dtype, the backend and the
mesh shape. Changing any of them gives a new key, so a stale cache is never
read. Files: ``<cache_dir>/<key>.npz`` (``chosen``, ``rejected``, ``computed``
per source row) and ``<key>.json`` (the key's description).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from prefjax import files
from prefjax import parallel
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import sources
from prefjax.data import tokenize as tokenize_lib
from prefjax.direct import loss as loss_lib
from prefjax.train import metrics as metrics_lib
from prefjax.train import sharding as sharding_lib
from prefjax.train import state as state_lib

FORMAT_VERSION = 1
# Pipeline settings that change which tokens a row holds or the batch shapes.
_KEY_PIPELINE_FIELDS = ("batch_size", "max_length", "max_prompt_length", "prompt_keep_start",
                        "min_response_length", "mode", "bucket_boundaries", "pad_to_multiple",
                        "pack_length", "pack_rows", "max_segments_per_row", "pack_window",
                        "share_prompt", "trim_rows", "row_multiple", "prompt_style", "add_bos")
# The others only order, repeat or split the rows: values are looked up per row.
ORDER_ONLY_PIPELINE_FIELDS = ("seed", "num_epochs", "shuffle", "shard_index", "shard_count",
                              "drop_remainder", "read_ahead")
_SCORED_FIELDS = ("tokens", "attention_mask", "loss_mask", "segment_ids", "positions",
                  "prefix_ids", "chosen_index", "rejected_index", "pair_mask")


def default_cache_dir() -> pathlib.Path:
  """``<PREFJAX_CACHE_DIR or ~/.cache/prefjax/tfds>/ref_logps``."""
  return sources.default_cache_dir() / "ref_logps"


# --------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "num_segments", "with_kl"))
def _score(graphdef, state, batch, *, num_segments, with_kl):
  model = nnx.merge(graphdef, state)
  return loss_lib.reference_fields(model, batch, num_segments=num_segments,
                                        with_kl=with_kl)


class ReferenceScorer:
  """Jitted reference log-probs of host pair batches -> numpy ``ref_chosen``, ``ref_rejected``."""

  def __init__(self, model: nnx.Module, loss: loss_lib.DirectLoss,
               mesh: jax.sharding.Mesh | None = None):
    self.graphdef, self.state = nnx.split(model)
    self.num_segments = loss.num_segments if loss.layout == "packed" else None
    self.with_kl = loss.spec.unpaired  # Mismatched rows for the reference point.
    self.mesh = mesh

  def _put(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    batch = {k: np.asarray(v) for k, v in batch.items() if k in _SCORED_FIELDS}
    try:
      return sharding_lib.put_batch(batch, self.mesh)
    except ValueError:  # Not divisible by the data axes (e.g. a small eval batch).
      if jax.process_count() > 1:  # each process's rows differ: never one replicated value
        raise
      return jax.device_put(batch)

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = _score(self.graphdef, self.state, self._put(batch),
                 num_segments=self.num_segments, with_kl=self.with_kl)
    return {k: parallel.local_rows(v) for k, v in out.items()}


# --------------------------------------------------------------------------- cache


@dataclasses.dataclass
class ReferenceTable:
  """Per-source-row reference log-probs (``computed`` marks rows the pipeline kept)."""
  chosen: np.ndarray
  rejected: np.ndarray
  computed: np.ndarray

  @classmethod
  def empty(cls, num_rows: int) -> ReferenceTable:
    return cls(np.zeros(num_rows, np.float32), np.zeros(num_rows, np.float32),
               np.zeros(num_rows, bool))

  def fill(self, example_index: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
    real = example_index >= 0
    idx = example_index[real]
    self.chosen[idx] = values["ref_chosen"][real]
    self.rejected[idx] = values["ref_rejected"][real]
    self.computed[idx] = True

  def lookup(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
    """Values for a batch's ``example_index`` (-1 = padding pair -> 0)."""
    example_index = np.asarray(example_index)
    real = example_index >= 0
    n = len(self.chosen)
    if np.any(example_index >= n):
      raise KeyError(f"reference cache of {n} rows has no row {int(example_index.max())}: "
                     "it was built for other data")
    idx = np.where(real, example_index, 0)
    missing = real & ~self.computed[idx]
    if np.any(missing):
      raise KeyError(f"reference cache has no values for source rows "
                     f"{example_index[missing][:20].tolist()}: the cache was built for "
                     "other data or pipeline settings")
    zero = np.float32(0.0)
    return {"ref_chosen": np.where(real, self.chosen[idx], zero).astype(np.float32),
            "ref_rejected": np.where(real, self.rejected[idx], zero).astype(np.float32)}


def cache_key(parts: Mapping[str, Any]) -> str:
  """SHA-256 of the canonical JSON of ``parts``."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


REFERENCE_FILE = "reference.json"


def recorded_reference_weights(workdir: str | os.PathLike[str]) -> str | None:
  """The reference weights' fingerprint a ``train_dpo`` run recorded in its
  ``reference.json`` (None: none recorded)."""
  path = pathlib.Path(workdir) / REFERENCE_FILE
  if not path.exists():
    return None
  with open(path) as f:
    return json.load(f).get("weights")


def check_same_reference(workdir: str | os.PathLike[str], weights: str, *, what: str) -> None:
  """Raises when the run in ``workdir`` recorded other reference weights than ``weights``:
  DPO's implicit reward is the policy's log-ratio to THEM, so a policy trained against
  one reference and scored or trained on against another gives other numbers silently."""
  recorded = recorded_reference_weights(workdir)
  if recorded is not None and recorded != weights:
    raise ValueError(f"{what}: the reference weights changed since {workdir} trained "
                     f"against them (recorded {recorded[:24]}…, now {weights[:24]}…); "
                     "restore them, or train in a new workdir")


def weights_fingerprint(path: str, model: nnx.Module) -> str:
  """The reference weights' identity: ``files:`` + their files' digest, or when the
  reference has no files (the policy's initialisation) ``params:`` + ``model``'s."""
  if path:
    return "files:" + file_sha256(path)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return "params:" + state_lib.params_sha256(params)


def file_sha256(path: str | os.PathLike[str]) -> str:
  """SHA-256 over a file's bytes, or over every file of a directory (sorted relative paths)."""
  path = pathlib.Path(path)
  paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  if not paths:
    raise FileNotFoundError(f"no reference weights at {path}")
  digest = hashlib.sha256()
  for f in paths:
    digest.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
    with open(f, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def key_parts(*, ref_weights: str, source: Any, tokenizer: Any,
              pipeline: pipeline_lib.PipelineConfig, model_config: Mapping[str, Any],
              loss: loss_lib.DirectLoss,
              mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
  """Everything cached reference log-probs depend on (see the module docstring)."""
  settings = dataclasses.asdict(pipeline)
  return {
      "format": FORMAT_VERSION,
      "ref_weights_sha256": ref_weights,
      "dataset": {"name": getattr(source, "name", None), "split": getattr(source, "split", None),
                  "fingerprint": source.fingerprint, "rows": len(source)},
      "tokenizer": tokenizer.name,
      # What responses end with (a chat template's turn end since 2026-12-07, EOS before).
      "response_end_id": tokenize_lib.response_end_id(tokenizer, pipeline.prompt_style),
      "pipeline": {k: settings[k] for k in _KEY_PIPELINE_FIELDS},
      "model": dict(model_config),
      "layout": loss.layout,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "mesh": dict(mesh.shape) if mesh is not None else None,
  }


def cache_pipeline(config: pipeline_lib.PipelineConfig) -> pipeline_lib.PipelineConfig:
  """One ordered pass over every row, with the training batch shapes."""
  return dataclasses.replace(config, shuffle=False, num_epochs=1, drop_remainder=False,
                             shard_index=0, shard_count=1)


def compute_table(scorer: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]],
                  batches: Iterator[Mapping[str, Any]], num_rows: int) -> ReferenceTable:
  """The reference log-probs of every pair, with a progress bar (rate and ETA): a long
  split at a big model's speed takes a while before the first train step."""
  table = ReferenceTable.empty(num_rows)
  with metrics_lib.progress_bar(num_rows, "reference log-probs", "pair",
                                disable=jax.process_index() != 0) as bar:
    for batch in batches:
      index = np.asarray(batch["example_index"])
      table.fill(index, scorer(batch))
      bar.update(int((index >= 0).sum()))
  return table


def load_or_build(parts: Mapping[str, Any], num_rows: int,
                  build: Callable[[], ReferenceTable],
                  cache_dir: str | os.PathLike[str] | None = None
                  ) -> tuple[ReferenceTable, dict[str, Any]]:
  """The cached table for ``parts``, built with ``build()`` and saved on a miss.

  Returns ``(table, info)`` with ``info = {key, path, hit, seconds}``.
  """
  directory = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  key = cache_key(parts)
  path = directory / f"{key}.npz"
  start = time.time()
  # Each process sees its own filesystem: a cache file may exist on one host and not on
  # another, or appear while they look; else some would train while the others score.
  if parallel.in_every_process(path.exists()):
    with np.load(path) as data:
      table = ReferenceTable(data["chosen"], data["rejected"], data["computed"])
    if len(table.chosen) != num_rows:
      raise ValueError(f"reference cache {path} has {len(table.chosen)} rows, the data "
                       f"{num_rows}: the file is corrupt (same key, other content)")
    logging.info("reference log-probs: cache hit %s (%d rows)", path, int(table.computed.sum()))
    return table, {"key": key, "path": str(path), "hit": True, "seconds": time.time() - start}
  logging.info("reference log-probs: cache miss, scoring %d rows -> %s", num_rows, path)
  table = build()
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, lambda f: np.savez(f, chosen=table.chosen,
                                                    rejected=table.rejected,
                                                    computed=table.computed))
    files.write_atomically(
        directory / f"{key}.json",
        lambda f: f.write(files.dumps(parts, indent=2, sort_keys=True, default=str)),
        mode="w")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prefjax_reference_cache_written")
  seconds = time.time() - start
  logging.info("reference log-probs: %d rows scored in %.1fs", int(table.computed.sum()), seconds)
  return table, {"key": key, "path": str(path), "hit": False, "seconds": seconds}


# --------------------------------------------------------------------------- batches


class ReferenceIterator:
  """Adds reference fields to every batch of ``inner``; checkpointable like ``inner``."""

  def __init__(self, inner: Iterator[dict[str, Any]],
               provide: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]] | None):
    self._inner = inner
    self._provide = provide

  def __iter__(self) -> ReferenceIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self._inner))
    if self._provide is not None:
      batch.update(self._provide(batch))
    return batch

  def get_state(self) -> Any:
    return self._inner.get_state()

  def set_state(self, state: Any) -> None:
    self._inner.set_state(state)

  @property
  def counters(self) -> dict[str, int]:
    return dict(getattr(self._inner, "counters", {}))


def table_provider(table: ReferenceTable) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
  return lambda batch: table.lookup(batch["example_index"])
