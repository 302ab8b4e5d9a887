"""Reading a Hugging Face directory's files: safetensors (single or sharded) and JSON,
with errors that name the file."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

PathLike = str | os.PathLike


class CheckpointError(ValueError):
  """A checkpoint cannot be mapped onto the requested prefjax model."""


class SafetensorsReader:
  """Lazy name -> NumPy array access over one or several ``.safetensors`` files."""

  def __init__(self, directory: PathLike):
    self.directory = pathlib.Path(directory)
    index = self.directory / "model.safetensors.index.json"
    single = self.directory / "model.safetensors"
    if index.exists():
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      self.files = {name: self.directory / f for name, f in weight_map.items()}
      for f in sorted(set(self.files.values())):
        if not f.exists():
          raise FileNotFoundError(f"{index} lists shard {f.name}, which does not exist")
    elif single.exists():
      with open_safetensors(single) as fh:
        self.files = {name: single for name in fh.keys()}
    else:
      raise FileNotFoundError(
          f"{self.directory} has neither model.safetensors nor "
          "model.safetensors.index.json (PyTorch .bin checkpoints are not supported; "
          "convert them with transformers' save_pretrained(safe_serialization=True))")

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    path = self.files[name]
    with open_safetensors(path) as fh:
      try:
        return fh.get_tensor(name)
      except SafetensorError as e:  # e.g. an index naming the wrong shard
        raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from e
      except (AttributeError, TypeError) as e:  # a dtype NumPy lacks: float8 (quantized)
        raise CheckpointError(f"{path}: tensor {name!r} has a dtype NumPy cannot read "
                              f"({e}); only float checkpoints load") from e


def open_safetensors(path: pathlib.Path):
  try:
    return safe_open(str(path), framework="numpy")
  except SafetensorError as e:  # e.g. a file cut short: "incomplete metadata"
    raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON: {e}") from e
