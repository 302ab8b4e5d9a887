"""Grain pipelines: tokenize, truncate, then pad into length buckets or pack into rows.

Three pipelines share one engine:

* ``preference_dataset``: pair batches. Padded: ``tokens [2B, T]`` (rows
  0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected), ``attention_mask``,
  ``loss_mask`` (1 on response tokens), ``weight``, ``outcome``, ``pair_mask``,
  ``example_index``; ``T`` is the bucket length. Packed: ``tokens``,
  ``segment_ids``, ``positions``, ``loss_mask`` ``[R, L]`` plus
  ``chosen_index`` / ``rejected_index`` ``[B, 2]`` (row, segment id),
  ``pair_mask``, ``weight``, ``outcome``, ``example_index``.
* ``sft_dataset``: prompt+response sequences with the loss on the response only
  (padded ``tokens [B, T]`` or packed rows with ``sequence_index [B, 2]``).
* ``prompt_dataset``: left-padded prompts, ``prompt_tokens [B, P]`` and ``prompt_mask``.

The examples form a ``grain.MapDataset`` (range over the source, host shard,
per-epoch shuffle, repeat, tokenize); a batching iterator walks it by index,
grouping examples into length buckets (``padding.py``) or packing them with a
windowed first-fit packer (``packing.py``). Its state (``get_state()``) is a small
JSON-serialisable dict: the next index, the indices waiting in buckets / the packing
window, the planned batches not yet returned, and the counters, so ``set_state``
resumes exactly where an uninterrupted run would be; wrapping the dataset in
``grain.experimental.ThreadPrefetchIterDataset`` moves batching to a background
thread and keeps that guarantee. Padding examples (to fill the last batch when
``drop_remainder=False``) have weight 0 and mask 0, and hold one pad token with
``attention_mask`` 1 so no attention row is empty.

Truncation (pairs and SFT; ``truncation.py``): (1) the prompt is cut from the LEFT to
``max_prompt_length``, keeping a leading BOS and, with ``prompt_keep_start`` = k,
its first k tokens after the BOS (an instruction that opens the prompt; the rest
of the limit still comes from its end, where a chat template puts the assistant
header); (2) responses are cut from the
right to ``max_length - len(prompt)``; (3) if a response would be cut to fewer
than ``min_response_length`` tokens (>= 1, so never to zero) the example is
dropped and counted as over-long (``counters["dropped_over_long"]``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np
from absl import logging

from prefjax import configlib
from prefjax.data import fields
from prefjax.data import packing
from prefjax.data import padding
from prefjax.data import read_ahead
from prefjax.data import tokenize as tokenize_lib
from prefjax.data import truncation
from prefjax.data.tfds_builders import rows as rows_lib

MODES = ("padded", "packed")
# The settings that decide which tokens a model reads for a pair (its text's form and
# cuts); the others only batch, order or shard the rows.
TEXT_FIELDS = ("max_length", "max_prompt_length", "prompt_keep_start", "min_response_length",
               "prompt_style", "add_bos")
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Pipeline settings; ``batch_size`` counts pairs (SFT: sequences, prompts: prompts).

  In packed mode ``batch_size`` is the fixed maximum pair count ``B`` of a
  batch, ``pack_rows`` x ``pack_length`` the token grid ``[R, L]`` and
  ``max_segments_per_row`` the static segment count consumers pass to
  ``prefjax.models.segments`` reductions. ``max_prompt_length=None`` means
  ``max_length // 2``; prompts are never longer than ``max_length - 1``.
  Padded mode cuts each batch to its longest row rounded up to a multiple of
  ``pad_to_multiple`` (never past the bucket length), which bounds the set of
  compiled shapes to ``max_length / pad_to_multiple``; ``None`` pads every
  batch to its bucket length. ``share_prompt`` (packed pair batches for decoder
  reward models and policies) writes each pair as one ``prompt | chosen |
  rejected`` sequence whose responses both attend to the one copy of the prompt
  (``packing.py``). ``trim_rows`` (packed): a batch whose sequences fit in fewer
  rows drops its trailing empty rows, keeping the fewest multiple of
  ``row_multiple`` that holds them (set it to the mesh's data-parallel size):
  less compute on small batches, one compile per row count (``row_counts``).
  ``read_ahead`` examples are tokenized together (one ``encode_batch`` call,
  parallel in the Rust backend), the next block on a background thread
  (``read_ahead.py``); it changes speed, never the batches.
  """

  seed: int = 0
  batch_size: int = 8
  max_length: int = 512
  max_prompt_length: int | None = None
  prompt_keep_start: int = 0
  min_response_length: int = 1
  mode: str = "padded"
  bucket_boundaries: tuple[int, ...] = ()
  pad_to_multiple: int | None = 64
  pack_length: int | None = None
  pack_rows: int = 8
  max_segments_per_row: int = 16
  pack_window: int | None = None
  share_prompt: bool = False
  trim_rows: bool = False
  row_multiple: int = 1
  num_epochs: int | None = None
  shuffle: bool = True
  shard_index: int | None = None
  shard_count: int | None = None
  drop_remainder: bool = False
  prompt_style: str = "raw"
  add_bos: bool = True
  read_ahead: int = 64

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.prompt_style not in tokenize_lib.PROMPT_STYLES:
      raise ValueError(f"prompt_style must be one of {tokenize_lib.PROMPT_STYLES}, "
                       f"got {self.prompt_style!r}")
    for name, least in (("batch_size", 1), ("max_length", 2), ("min_response_length", 1)):
      if getattr(self, name) < least:
        raise ValueError(f"{name}={getattr(self, name)} must be >= {least}")
    if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
      raise ValueError(f"max_prompt_length={self.max_prompt_length} must be in "
                       f"[1, max_length={self.max_length})")
    if self.prompt_keep_start < 0 or self.prompt_keep_start > max(self.prompt_limit - 2, 0):
      raise ValueError(f"prompt_keep_start={self.prompt_keep_start} must be in [0, prompt "
                       f"limit {self.prompt_limit} - 2]: a cut prompt keeps a BOS and its end")
    if self.pad_to_multiple is not None and self.pad_to_multiple < 1:
      raise ValueError(f"pad_to_multiple must be None or >= 1, got {self.pad_to_multiple}")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in self.bucket_boundaries):
      raise ValueError(f"bucket_boundaries={self.bucket_boundaries!r} must be whole numbers "
                       "(none: --config.data.pipeline.bucket_boundaries='()')")
    if any(b < 1 for b in self.bucket_boundaries):
      raise ValueError(f"bucket boundaries must be positive: {self.bucket_boundaries}")
    if self.read_ahead < 1:
      raise ValueError(f"read_ahead must be >= 1, got {self.read_ahead}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")
    if (self.shard_index is None) != (self.shard_count is None):
      raise ValueError("set shard_index and shard_count together (or neither)")
    if self.share_prompt:
      if self.mode != "packed":
        raise ValueError("share_prompt needs mode='packed'")
      if self.row_length < 2 * self.max_length - 1 or self.max_segments_per_row < 3:
        raise ValueError(
            f"share_prompt: a row must hold a whole prompt | chosen | rejected sequence "
            f"(up to 2 * max_length - 1 = {2 * self.max_length - 1} tokens, 3 segments); got "
            f"pack_length={self.row_length}, max_segments_per_row={self.max_segments_per_row}")
    if self.mode == "packed":
      if self.row_length < self.max_length:
        raise ValueError(f"pack_length={self.row_length} < max_length={self.max_length}")
      one_row_too_small = (self.row_length < 2 * self.max_length
                           or self.max_segments_per_row < 2)
      if not self.share_prompt and self.pack_rows < 2 and one_row_too_small:
        raise ValueError("one packed row must hold a pair of max_length sequences: use "
                         "pack_rows >= 2, or pack_length >= 2 * max_length and 2+ segments")
      if self.max_segments_per_row < 1 or self.window <= self.batch_size:
        raise ValueError("need max_segments_per_row >= 1 and pack_window > batch_size")
      if self.drop_remainder:  # a packed batch holds what fits, never a fixed pair count
        raise ValueError("drop_remainder is for padded batches; packed mode keeps every pair")
    if self.trim_rows and (self.mode != "packed" or self.row_multiple < 1
                           or self.pack_rows % self.row_multiple):
      raise ValueError(f"trim_rows needs mode='packed' and pack_rows={self.pack_rows} a "
                       f"multiple of row_multiple={self.row_multiple} >= 1 (mode={self.mode!r})")

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> PipelineConfig:
    """From a dict or ``ml_collections.ConfigDict``; unknown keys are an error."""
    return configlib.dataclass_from_mapping(cls, mapping, bucket_boundaries=tuple)

  def text_fields(self) -> dict[str, Any]:
    """The ``TEXT_FIELDS`` of this config: what a scorer must share with training."""
    return {name: getattr(self, name) for name in TEXT_FIELDS}

  @property
  def prompt_limit(self) -> int:
    """The prompt cap actually applied (``max_prompt_length`` or ``max_length // 2``)."""
    return self.max_prompt_length or self.max_length // 2

  @property
  def row_length(self) -> int:
    return self.pack_length or self.max_length

  @property
  def window(self) -> int:
    return self.pack_window or 8 * self.batch_size

  def row_counts(self) -> tuple[int, ...]:
    """Every row count a packed batch can have (``trim_rows``), the last ``pack_rows``."""
    if not self.trim_rows:
      return (self.pack_rows,)
    return tuple(range(self.row_multiple, self.pack_rows + 1, self.row_multiple))

  def kept_rows(self, used: int) -> int:
    """Rows a packed batch keeps when its sequences fill its first ``used`` rows."""
    return next(n for n in self.row_counts() if n >= used)

  def buckets(self, longest: int) -> tuple[int, ...]:
    """Sorted bucket lengths, the last one ``longest``."""
    return tuple(sorted({b for b in self.bucket_boundaries if b < longest} | {longest}))

  def padded_lengths(self, bucket: int) -> tuple[int, ...]:
    """Every row length a padded batch of this bucket can have."""
    if self.pad_to_multiple is None:
      return (bucket,)
    step = self.pad_to_multiple
    return tuple(sorted({min(m, bucket) for m in range(step, bucket + step, step)}))

  def padded_length(self, bucket: int, longest_row: int) -> int:
    """The row length of a padded batch whose longest sequence has ``longest_row`` tokens."""
    return next(n for n in self.padded_lengths(bucket) if n >= longest_row)

  def same_shapes_across_processes(self) -> PipelineConfig:
    """This config with one bucket, every padded batch at its full length and
    every packed batch at ``pack_rows`` rows.

    With several processes each batches its own rows and the local batches are
    joined into one global array, so every process must build the same shapes at
    every step; a length taken from a process's own longest row
    (``pad_to_multiple``), its own bucket or its own used rows would differ.
    """
    return dataclasses.replace(self, bucket_boundaries=(), pad_to_multiple=None,
                               trim_rows=False)

  def shard(self) -> tuple[int, int]:
    """(shard index, shard count): the config's, else ``jax.process_index/count``."""
    if self.shard_count is not None:
      if not 0 <= self.shard_index < self.shard_count:
        raise ValueError(f"shard_index={self.shard_index} not in [0, {self.shard_count})")
      return self.shard_index, self.shard_count
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), _process_count()


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


# --------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized source row: a prompt and 0, 1 or 2 responses (pairs: chosen, rejected)."""

  index: int
  prompt: np.ndarray
  responses: tuple[np.ndarray, ...] = ()
  weight: float = 1.0
  outcome: float = 1.0
  truncated_prompt: bool = False
  truncated_response: bool = False
  dropped: str | None = None
  untruncated: tuple[int, ...] = ()  # token counts of the prompt and each response before cuts

  @property
  def lengths(self) -> tuple[int, ...]:
    """Token count of each prompt+response sequence (the prompt alone if no responses)."""
    if not self.responses:
      return (len(self.prompt),)
    return tuple(len(self.prompt) + len(r) for r in self.responses)

  @property
  def shared_length(self) -> int:
    """Token count of ``prompt | response_0 | response_1 ...`` (the shared-prompt layout)."""
    return len(self.prompt) + sum(len(r) for r in self.responses)


def read_rows(source: Sequence[Any], indices: Sequence[int]) -> list:
  """``source``'s rows at ``indices``, in one ``__getitems__`` call when it has one."""
  getitems = getattr(source, "__getitems__", None)
  return list(getitems(indices)) if getitems else [source[i] for i in indices]


@dataclasses.dataclass(frozen=True)
class TokenizeFn:
  """Source row -> ``Example``: formats, encodes (BOS on the prompt, EOS on responses), truncates."""

  source: Any
  tokenizer: tokenize_lib.Tokenizer
  config: PipelineConfig
  response_keys: tuple[str, ...]

  def __call__(self, index: int) -> Example:
    return self.many([index])[0]

  def many(self, indices: Sequence[int]) -> list[Example]:
    """Tokenizes several rows with one ``encode_batch`` call when the tokenizer has it."""
    indices = [int(i) for i in indices]
    rows = read_rows(self.source, indices)
    tok, style = self.tokenizer, self.config.prompt_style
    texts = []
    for index, row in zip(indices, rows):
      if row is None:
        continue
      if not isinstance(row, Mapping):
        raise TypeError(f"source row {index}: expected a mapping, got {type(row).__name__}")
      prompt = fields.text(row, "prompt", index)
      texts.append(tokenize_lib.format_prompt(prompt, tok, style=style))
      texts.extend(tokenize_lib.format_response(fields.text(row, key, index), style=style,
                                                tokenizer=tok)
                   for key in self.response_keys)
    encode_batch = getattr(tok, "encode_batch", None)
    encoded = iter(encode_batch(texts) if encode_batch else [tok.encode(t) for t in texts])
    add_bos = self.config.add_bos and tok.bos_id is not None
    end_id = tokenize_lib.response_end_id(tok, style)
    out = []
    for index, row in zip(indices, rows):
      if row is None:
        out.append(Example(index, np.zeros(0, np.int32), dropped="missing_row"))
        continue
      prompt = tokenize_lib.add_special_tokens(next(encoded), bos_id=tok.bos_id, eos_id=tok.eos_id,
                                               add_bos=add_bos, add_eos=False)
      responses = [tokenize_lib.add_special_tokens(next(encoded), bos_id=tok.bos_id,
                                                   eos_id=end_id, add_bos=False, add_eos=True)
                   for _ in self.response_keys]
      out.append(self._example(index, row, prompt, responses))
    return out

  def _example(self, index: int, row: Mapping[str, Any], prompt: list[int],
               responses: list[list[int]]) -> Example:
    cfg, bos_id = self.config, self.tokenizer.bos_id
    untruncated = (len(prompt), *map(len, responses))
    if not self.response_keys:  # prompt-only: the prompt is capped, nothing else.
      cut = len(prompt) > cfg.prompt_limit
      prompt = truncation.left_truncate(prompt, cfg.prompt_limit, bos_id, cfg.prompt_keep_start)
      return Example(index, np.asarray(prompt, np.int32), truncated_prompt=cut,
                     dropped=None if prompt else "empty_prompt", untruncated=untruncated)
    prompt, responses, cut_p, cut_r, dropped = truncation.truncate(prompt, responses, cfg, bos_id)
    return Example(
        index=index, prompt=np.asarray(prompt, np.int32),
        responses=tuple(np.asarray(r, np.int32) for r in responses),
        weight=fields.number(row, "weight", 1.0, index, 0.0, rows_lib.MAX_WEIGHT),
        outcome=fields.number(row, "outcome", 1.0, index, 0.0, 1.0),
        truncated_prompt=cut_p, truncated_response=cut_r, dropped=dropped,
        untruncated=untruncated)


def index_dataset(num_rows: int, config: PipelineConfig, *, name: str = "source"
                  ) -> grain.MapDataset:
  """Source row indices: host shard -> per-epoch shuffle -> repeat ``num_epochs``.

  Each shard is shuffled with its own seed (``seed`` for shard 0, as one process does):
  with one permutation for every shard, the processes' k-th rows were always neighbours
  in the source, drawn into the same global batch in every epoch."""
  shard_index, shard_count = config.shard()
  ds = grain.MapDataset.range(num_rows)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"{name} has {num_rows} rows, so shard {shard_index} of {shard_count} "
                     "(one per process) is empty")
  if config.shuffle:
    seed = config.seed if shard_index == 0 else np.random.SeedSequence(
        [config.seed, shard_index]).generate_state(1)[0]
    ds = ds.shuffle(seed=int(seed))
  return ds.repeat(config.num_epochs)


# --------------------------------------------------------------------------- engine


class BatchIterator(grain.DatasetIterator):
  """Walks the example ``MapDataset`` by index and yields fixed-shape batches; checkpointable."""

  def __init__(self, dataset: BatchDataset):
    super().__init__()
    self._ds = dataset
    self._batcher = dataset.make_batcher()
    self._next = 0
    self._dropped_in_a_row = 0
    self._exhausted = False
    self._ready: collections.deque[dict[str, Any]] = collections.deque()
    self._cache: dict[int, Example] = {}
    self._counters: collections.Counter[str] = collections.Counter()
    self._ahead: dict[int, Example] = {}
    self._blocks = read_ahead.BlockReader(self._tokenize, len(dataset.indices),
                                          dataset.config.read_ahead)

  @property
  def counters(self) -> dict[str, int]:
    """Examples read / truncated / dropped (by reason), batches, padding, token fill."""
    return dict(self._counters)

  def _fetch(self, position: int) -> Example:
    """The example at ``position``; the next ``read_ahead`` are tokenized in one batch."""
    if position not in self._ahead:
      self._ahead = self._blocks.block(position)
    return self._ahead.pop(position)

  def _tokenize(self, positions: Sequence[int]) -> list[Example]:
    return self._ds.tokenize_fn.many([self._ds.indices[p] for p in positions])

  def _read_one(self) -> None:
    position = self._next
    example = self._fetch(position)
    self._next += 1  # after the fetch: a read that raised is retried by the next call
    self._counters["examples_read"] += 1
    if example.dropped is not None:  # counted as dropped only, as the data report does
      self._counters[f"dropped_{example.dropped}"] += 1
      self._dropped_in_a_row += 1
      return
    self._dropped_in_a_row = 0
    self._counters["truncated_prompt"] += int(example.truncated_prompt)
    self._counters["truncated_response"] += int(example.truncated_response)
    self._cache[position] = example
    self._ready.extend(self._batcher.add(position, example))

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._ready:
      if self._exhausted:
        raise StopIteration
      if self._next >= len(self._ds.indices):
        plans, dropped = self._batcher.flush()
        self._ready.extend(plans)
        self._counters["dropped_remainder"] += dropped
        self._exhausted = True
        continue
      # Two passes' length holds a whole (shuffled) pass: no row is usable. Without
      # this check, an endless (num_epochs=None) pass would read on forever.
      if self._dropped_in_a_row >= 2 * self._ds.rows_per_pass:
        raise ValueError(f"{self._ds.name}: every one of its {self._ds.rows_per_pass} rows "
                         f"is dropped ({self.counters})")
      self._read_one()
    plan = self._ready.popleft()
    positions = self._ds.plan_positions(plan)
    missing = [p for p in positions if p not in self._cache]  # only after set_state
    fetched = dict(zip(missing, self._tokenize(missing)))
    examples = [self._cache.pop(p) if p in self._cache else fetched[p] for p in positions]
    batch = self._ds.collate(plan, examples)
    self._counters["batches"] += 1
    num_padding = int(np.sum(batch[self._ds.mask_key] == 0))
    dummy_tokens = 0 if self._ds.packed else num_padding * max(self._ds.num_responses, 1)
    self._counters["padding_examples"] += num_padding
    self._counters["real_tokens"] += int(np.count_nonzero(batch[self._ds.real_key])) - dummy_tokens
    self._counters["token_slots"] += int(batch[self._ds.real_key].size)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {
        "version": _STATE_VERSION,
        "fingerprint": self._ds.fingerprint,
        "next": self._next,
        "exhausted": self._exhausted,
        "ready": list(self._ready),
        "batcher": self._batcher.get_state(),
        "counters": dict(self._counters),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"iterator state version {state.get('version')} != {_STATE_VERSION}")
    if state["fingerprint"] != self._ds.fingerprint:
      raise ValueError("iterator state was saved by another pipeline: a data.pipeline field "
                       "(any, e.g. row_multiple), the tokenizer, the source size or the shard "
                       "changed since (the config diff is logged above); restore them or use "
                       f"a new workdir ({state['fingerprint']} != {self._ds.fingerprint})")
    self._next = int(state["next"])
    self._exhausted = bool(state["exhausted"])
    self._ready = collections.deque(json.loads(json.dumps(state["ready"])))
    self._batcher.set_state(state["batcher"])
    self._counters = collections.Counter({k: int(v) for k, v in state["counters"].items()})
    self._cache = {}
    self._ahead = {}
    self._blocks.reset()

  def __str__(self) -> str:
    return f"BatchIterator({self._ds.kind}, {self._ds.config.mode})"


class BatchDataset(grain.IterDataset):
  """A ``grain.IterDataset`` of fixed-shape numpy batch dicts (see module docstring)."""

  def __init__(self, source: Any, tokenizer: tokenize_lib.Tokenizer, config: PipelineConfig,
               *, kind: str, response_keys: tuple[str, ...]):
    processes = _process_count()
    if processes > 1 and (config.bucket_boundaries or config.pad_to_multiple
                          or config.trim_rows):
      logging.info("%d processes: %s batches padded to their full length (no buckets, no "
                   "pad_to_multiple, no trim_rows), so every process builds the same shapes",
                   processes, kind)
      config = config.same_shapes_across_processes()
    self.kind = kind
    self.config = config
    self.tokenizer = tokenizer
    self.num_responses = len(response_keys)
    self.tokenize_fn = TokenizeFn(source, tokenizer, config, response_keys)
    self.name = f"{source.name}[{source.split}]" if hasattr(source, "split") else "the source"
    self.indices = index_dataset(len(source), config, name=self.name)
    shard_index, shard_count = config.shard()
    self.rows_per_pass = len(range(shard_index, len(source), shard_count))
    self.examples = self.indices.map(self.tokenize_fn)
    super().__init__(self.examples)
    self.packed = config.mode == "packed" and kind != "prompt"
    if config.share_prompt and kind != "pair":
      raise ValueError(f"share_prompt is for preference pairs, not {kind} batches")
    self.mask_key = {"pair": "pair_mask"}.get(kind, "example_mask")
    self.real_key = "segment_ids" if self.packed else (
        "prompt_mask" if kind == "prompt" else "attention_mask")
    longest = config.prompt_limit if kind == "prompt" else config.max_length
    self.bucket_lengths = config.buckets(longest)
    batch_config = {k: v for k, v in dataclasses.asdict(config).items() if k != "read_ahead"}
    desc = json.dumps({"config": batch_config, "kind": kind, "keys": response_keys,
                       "tokenizer": tokenizer.name, "rows": len(source),
                       "source": str(getattr(source, "fingerprint", "")),
                       "shard": config.shard()}, sort_keys=True)
    self.fingerprint = hashlib.sha256(desc.encode()).hexdigest()[:16]

  def make_batcher(self) -> padding.BucketBatcher | packing.WindowPacker:
    cfg = self.config
    if self.packed:
      return packing.WindowPacker(
          rows=cfg.pack_rows, length=cfg.row_length, max_segments=cfg.max_segments_per_row,
          max_groups=cfg.batch_size, window=cfg.window, shared_prompt=cfg.share_prompt)
    return padding.BucketBatcher(self.bucket_lengths, cfg.batch_size, cfg.drop_remainder)

  def plan_positions(self, plan: dict[str, Any]) -> list[int]:
    return [item[0] for item in plan["items"]] if self.packed else list(plan["items"])

  def collate(self, plan: dict[str, Any], examples: list[Example]) -> dict[str, np.ndarray]:
    cfg, pad_id = self.config, self.tokenizer.pad_id
    padded: list[Example | None] = list(examples) + [None] * (cfg.batch_size - len(examples))
    if not self.packed:  # prompt batches are never packed
      length = cfg.padded_length(self.bucket_lengths[plan["bucket"]],
                                 max(max(e.lengths) for e in examples))
    if self.kind == "prompt":
      return padding.collate_prompts(padded, length, pad_id)
    if self.packed:
      used = 1 + max(max(item[1:]) for item in plan["items"])
      batch = packing.collate_packed(plan["items"], examples, rows=cfg.kept_rows(used),
                                     length=cfg.row_length, max_groups=cfg.batch_size,
                                     pad_id=pad_id, shared_prompt=cfg.share_prompt)
      batch.update(padding.example_fields(padded))
    else:
      batch = padding.collate_padded(padded, length, pad_id, self.num_responses)
    mask, index = batch.pop("mask"), batch.pop("index", None)
    if self.kind == "pair":
      batch["pair_mask"] = mask
      if index is not None:
        batch["chosen_index"], batch["rejected_index"] = index[:, 0], index[:, 1]
    else:
      batch["example_mask"] = mask
      del batch["outcome"]
      if index is not None:
        batch["sequence_index"] = index[:, 0]
    return batch

  def batch_shapes(self) -> list[dict[str, tuple[int, ...]]]:
    """Every distinct set of shapes it yields (one compile each), per-pair ones included."""
    b = self.config.batch_size
    if self.packed:
      index_key = "chosen_index" if self.kind == "pair" else "sequence_index"
      return [{"tokens": (rows, self.config.row_length), index_key: (b, 2)}
              for rows in self.config.row_counts()]
    lengths = sorted({t for bucket in self.bucket_lengths
                      for t in self.config.padded_lengths(bucket)})
    if self.kind == "prompt":
      return [{"prompt_tokens": (b, t)} for t in lengths]
    per_pair = {"pair_mask": (b,)} if self.kind == "pair" else {}
    return [{"tokens": (b * self.num_responses, t), **per_pair} for t in lengths]

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self)

  def __str__(self) -> str:
    return f"BatchDataset({self.kind}, mode={self.config.mode})"


def preference_dataset(source: Any, tokenizer: tokenize_lib.Tokenizer,
                       config: PipelineConfig) -> BatchDataset:
  """Pair batches from any random-access source of ``{prompt, chosen, rejected[, weight, outcome]}``."""
  return BatchDataset(source, tokenizer, config, kind="pair", response_keys=("chosen", "rejected"))


def sft_dataset(source: Any, tokenizer: tokenize_lib.Tokenizer, config: PipelineConfig, *,
                response_key: str = "chosen") -> BatchDataset:
  """Prompt+response sequences (loss on the response only); ``response_key`` names the field."""
  return BatchDataset(source, tokenizer, config, kind="sft", response_keys=(response_key,))


def prompt_dataset(source: Any, tokenizer: tokenize_lib.Tokenizer,
                   config: PipelineConfig) -> BatchDataset:
  """Left-padded prompts for generation, bucketed by prompt length (``mode`` is ignored).

  ``example_index`` gives each prompt's row in ``source``, e.g. to fetch its text
  for a reward model with another tokenizer.
  """
  return BatchDataset(source, tokenizer, config, kind="prompt", response_keys=())
