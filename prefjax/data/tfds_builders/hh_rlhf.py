"""Anthropic HH-RLHF human preference pairs (helpful and harmless dialogues).

Raw layout (the official GitHub release, read from the manual dir, default
``$PREFJAX_DATA_DIR/hh_rlhf``): ``{config}/{split}.jsonl.gz``, one
{"chosen": transcript, "rejected": transcript} per line. Every split file
present is built (the official release has ``train`` and ``test``).

Each pair is split with `rows.split_transcript`: the prompt is everything up to
and including the last "\\n\\nAssistant:" both transcripts share (earlier turns
stay in the prompt), the responses are the rest with their leading space kept,
so prompt + response == transcript exactly. Pairs whose transcripts diverge
before the final assistant turn have multi-turn responses and are flagged
``meta["multi_turn_response"]``. A few pairs have an empty response (the
assistant said nothing, and that is what the annotator judged): they are kept,
flagged ``meta["empty_response"]`` and listed as notes in the build summary.

Paper: "Training a Helpful and Harmless Assistant with Reinforcement Learning
from Human Feedback", Bai et al. 2022, arXiv 2204.05862. Licence: MIT.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Iterator

import tensorflow_datasets as tfds
from absl import logging

from prefjax.data.tfds_builders import base
from prefjax.data.tfds_builders import rows as rows_lib

CONFIG_NAMES = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
_SPLIT_FILE = re.compile(r"^([a-z][a-z0-9_]*)\.jsonl\.gz$")


@dataclasses.dataclass
class HhRlhfConfig(tfds.core.BuilderConfig):
  """One HH-RLHF tranche; ``name`` is its folder in the official release."""


class HhRlhf(base.PreferenceBuilder, skip_registration=True):
  """HH-RLHF pairs split into prompt / chosen / rejected."""

  name = "hh_rlhf"
  BUILDER_CONFIGS = [
      HhRlhfConfig(name=n, description=f"HH-RLHF {n} tranche") for n in CONFIG_NAMES]
  DESCRIPTION = __doc__
  HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
  CITATION = ("@article{bai2022training, title={Training a Helpful and Harmless Assistant "
              "with Reinforcement Learning from Human Feedback}, author={Bai, Yuntao and "
              "others}, journal={arXiv preprint arXiv:2204.05862}, year={2022}}")

  def _official_splits(self, dl_manager: tfds.download.DownloadManager
                       ) -> dict[str, list[pathlib.Path]]:
    folder = pathlib.Path(dl_manager.manual_dir) / self.builder_config.name
    splits = {}
    for path in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else []:
      match = _SPLIT_FILE.match(path.name)
      if match:
        splits[match.group(1)] = [path]
    unread = sorted(p.name for p in folder.glob("*.jsonl*") if p.name.endswith(".jsonl")
                    or not _SPLIT_FILE.match(p.name)) if folder.is_dir() else []
    if unread:
      logging.warning("HH-RLHF %s: not reading %s: splits are read from files named "
                      "{split}.jsonl.gz (lower-case split name), as released", folder, unread)
    if not splits:
      raise FileNotFoundError(
          f"no {{split}}.jsonl.gz files in {folder} for HH-RLHF config "
          f"{self.builder_config.name!r}{f' (found {unread})' if unread else ''}. "
          f"{base.THIRD_PARTY_NOTE}")
    return splits

  def _read_rows(self, path: pathlib.Path
                 ) -> Iterator[tuple[int, rows_lib.PreferenceRow | rows_lib.RowProblem]]:
    return base.read_jsonl_rows(path, layout="transcripts", allow_empty=True)
