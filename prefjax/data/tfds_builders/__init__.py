"""TFDS builders for preference data, written as ArrayRecord (no TensorFlow needed).

- `hh_rlhf.HhRlhf`: Anthropic HH-RLHF tranches (configs = release folders).
- `pandalm.Pandalm`: PandaLM human test set with ties and per-annotator votes.
- `preference_jsonl.PreferenceJsonl`: a user's JSONL file (cache keyed by content hash).
- `synthetic.SyntheticPreferences`: gold-labelled data from `write_synthetic_dataset`.

Use them through `prefjax.data.load_preferences`; `base` holds the shared
features and build summary, `rows` the row parsing and validation.
"""

from prefjax.data.tfds_builders.base import BuildSummary
from prefjax.data.tfds_builders.base import PreferenceBuilder
from prefjax.data.tfds_builders.hh_rlhf import HhRlhf
from prefjax.data.tfds_builders.pandalm import Pandalm
from prefjax.data.tfds_builders.preference_jsonl import PreferenceJsonl
from prefjax.data.tfds_builders.rows import PreferenceRow
from prefjax.data.tfds_builders.rows import RowProblem
from prefjax.data.tfds_builders.rows import conversation_key
from prefjax.data.tfds_builders.rows import resplit_name
from prefjax.data.tfds_builders.rows import split_transcript
from prefjax.data.tfds_builders.synthetic import SyntheticPreferences
from prefjax.data.tfds_builders.synthetic import synthetic_root
from prefjax.data.tfds_builders.synthetic import write_synthetic_dataset

__all__ = [
    "BuildSummary", "HhRlhf", "Pandalm", "PreferenceBuilder", "PreferenceJsonl",
    "PreferenceRow", "RowProblem", "SyntheticPreferences", "conversation_key", "resplit_name",
    "split_transcript", "synthetic_root", "write_synthetic_dataset",
]
