"""The benchmark workloads: HH-RLHF pairs, a word-level hash tokenizer, the 23.5M Llama RM.

The workload is the one issue G measured PyTorch TRL on, so the two can be
compared on the same machine: the official HH-RLHF harmless-base test file
(pairs split at the last shared "\\n\\nAssistant:"), a word-level hash tokenizer
of 8,192 ids, pairs whose prompt alone reaches ``max_length`` dropped, 8 pairs
per step in file order, and a Llama-style model of 23.47M parameters (hidden
512, 6 layers, 8 heads, MLP 1408, untied) with a scalar reward head.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize as tokenize_lib
from prefjax.models import decoder as dec

VOCAB = 8192
MAX_LENGTH = 512
PAIRS_PER_STEP = 8
WINDOW_BATCHES = 8  # pack_window / batch_size of the packed layouts (pipeline_config)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class HashWordTokenizer:
  """Words and punctuation marks hashed (CRC-32) into ``vocab_size - 3`` ids after 3 specials.

  Not invertible (``decode`` returns placeholders); it exists so that a
  benchmark has realistic sequence lengths without a trained vocabulary.
  """

  vocab_size: int = VOCAB
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  chat_template = None

  @property
  def name(self) -> str:
    return f"hashword:{self.vocab_size}"

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in _WORD.findall(text)]
    return tokenize_lib.add_special_tokens(ids, bos_id=self.bos_id, eos_id=self.eos_id,
                                           add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return " ".join(f"<{int(i)}>" for i in ids)


def rm_model_config(**overrides: Any) -> dec.DecoderConfig:
  """The 23.47M-parameter Llama of the comparison (``DecoderConfig.llama`` resized);
  an override of None keeps the comparison's value."""
  base = dict(vocab_size=VOCAB, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8,
              intermediate_size=1408, pad_id=0, bos_id=1, eos_id=2)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return dec.DecoderConfig.llama(**{**base, **overrides})


def hh_pairs(max_length: int = MAX_LENGTH) -> tuple[list[dict[str, Any]], HashWordTokenizer]:
  """HH harmless-base test pairs in file order, without those whose prompt reaches ``max_length``."""
  from prefjax.data import sources  # here: TFDS is needed for the HH file, not the tokenizer
  tokenizer = HashWordTokenizer()
  source = sources.load_preferences("hh_rlhf/harmless-base", "test")
  rows = [source[i] for i in range(len(source))]
  keep = [r for r in rows if len(tokenizer.encode(r["prompt"], add_bos=True)) < max_length]
  return keep, tokenizer


def pipeline_config(mode: str, **overrides: Any) -> pipeline_lib.PipelineConfig:
  """Batches of 8 pairs in file order; prompts kept whole (TRL truncates nothing but the tail).

  ``mode``: ``longest`` (the project default: padded to the batch's longest row
  rounded up to 64), ``fixed`` (every row padded to 512), ``packed`` (rows of
  1,024 tokens holding whole pairs), ``shared`` (packed, each pair one
  ``prompt | chosen | rejected`` sequence: 2 rows of 1,024 hold what ``packed``
  puts in 3; an overridden ``batch_size`` of pairs gets one row per 4 pairs) or
  ``shared_trimmed`` (``shared`` whose batches drop an empty row: ``trim_rows``).
  """
  pairs = overrides.get("batch_size", PAIRS_PER_STEP)
  base = dict(batch_size=PAIRS_PER_STEP, max_length=MAX_LENGTH,
              max_prompt_length=MAX_LENGTH - 1, shuffle=False, num_epochs=1, seed=0,
              shard_index=0, shard_count=1)
  if mode == "fixed":
    base.update(pad_to_multiple=None)
  elif mode == "packed":
    base.update(mode="packed", pack_length=2 * MAX_LENGTH, pack_rows=3,
                max_segments_per_row=16, pack_window=WINDOW_BATCHES * PAIRS_PER_STEP)
  elif mode in ("shared", "shared_trimmed"):
    base.update(mode="packed", share_prompt=True, pack_length=2 * MAX_LENGTH,
                pack_rows=math.ceil(pairs / 4), max_segments_per_row=3 * pairs,
                pack_window=WINDOW_BATCHES * pairs, trim_rows=mode == "shared_trimmed")
  elif mode != "longest":
    raise ValueError(f"mode must be 'longest', 'fixed', 'packed', 'shared' or 'shared_trimmed', "
                     f"got {mode!r}")
  return pipeline_lib.PipelineConfig(**{**base, **overrides})


def whole_windows(layout: str, steps: int) -> int:
  """``steps`` rounded up to whole packing windows for a packed layout (its pairs are
  reordered within ``WINDOW_BATCHES`` batches, fullest first); unchanged for the others."""
  if layout in ("packed", "shared", "shared_trimmed"):
    return -(-steps // WINDOW_BATCHES) * WINDOW_BATCHES
  return steps


def pair_batches(mode: str, count: int, **overrides: Any) -> Iterator[dict[str, np.ndarray]]:
  """The first ``count`` pair batches of the workload in layout ``mode``."""
  rows, tokenizer = hh_pairs()
  dataset = pipeline_lib.preference_dataset(rows, tokenizer, pipeline_config(mode, **overrides))
  iterator = iter(dataset)
  for _ in range(count):
    yield next(iterator)


def layout_batches(layout: str, count: int) -> list[dict[str, np.ndarray]]:
  """The first ``count`` batches of a ``benchmarks.run`` case's ``layout``: ``"minilm"``
  (``minilm_batches``) or a ``pair_batches`` mode."""
  return list(minilm_batches(count) if layout == "minilm" else pair_batches(layout, count))


def minilm_batches(count: int) -> Iterator[dict[str, np.ndarray]]:
  """The first ``count`` batches of ``configs/rm/hh_minilm.py``'s pipeline over the test file.

  MiniLM's tokenizer, 16 pairs a batch, prompt 32 tokens, prompt+response 80,
  buckets 48/80, in file order (the config trains on a resplit of this file).
  """
  from configs.rm import hh_minilm
  from prefjax import experiment
  from prefjax.data import sources
  config = hh_minilm.get_config()
  source = sources.load_preferences("hh_rlhf/harmless-base", "test")
  rows = [source[i] for i in range(len(source))]
  pipeline = experiment.pipeline_config(config.data, shuffle=False, num_epochs=1,
                                        shard_index=0, shard_count=1)
  dataset = pipeline_lib.preference_dataset(rows, experiment.make_tokenizer(config.tokenizer),
                                            pipeline)
  iterator = iter(dataset)
  for _ in range(count):
    yield next(iterator)
