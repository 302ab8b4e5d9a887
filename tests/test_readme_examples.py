"""The README's Python examples run as written (output paths moved under tmp_path) and give
what their comments say. ("Adding a loss" has its own test: test_losses_of_your_own.py.)"""

import contextlib
import io
import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from prefjax import data
from prefjax import experiment
from prefjax.models import hf_export

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example(marker: str) -> str:
  """The README's one Python block that contains ``marker``."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
  (block,) = [b for b in blocks if marker in b]
  return block


def _run(code: str) -> tuple[dict, str]:
  namespace, out = {"__name__": "readme"}, io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace, out.getvalue()


def test_the_synthetic_dataset_example():
  ns, _ = _run(_example("write_synthetic_dataset"))
  assert len(data.load_preferences("synthetic:arith", "train")) == 20  # "all 20 rows"
  assert 0 < len(ns["source"]) < 20 and ns["source"][0]["chosen"] == " 4"


def test_the_tokenizer_and_gguf_example():
  ns, _ = _run(_example("assets.minilm_dir()"))
  assert ns["tok"].encode("Hello there", add_bos=True, add_eos=True) == [101, 7592, 2045, 102]
  assert ns["gpt2"].vocab_size == 50257
  assert ns["lm"](np.array([[1, 2, 3]], np.int32)).shape == (1, 3, 49152)


def test_the_evaluator_example_trains_and_evaluates_at_steps_3_and_6(tmp_path):
  code = _example("def mse_evaluator").replace('"/tmp/mse_demo"', repr(str(tmp_path)))
  ns, printed = _run(code)
  final = ns["result"].summary["final_eval"]
  assert printed.strip() == str(final) and np.isfinite(final["mse"])
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "eval/mse" in r] == [3, 6]


def test_the_hugging_face_example_prints_prefjax_s_reward(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  rm = experiment.make_model({"arch": "decoder", "preset": "tiny_llama", "head": "reward",
                              "pooling": "last", "dtype": "float32"}, vocab_size=259, seed=0)
  hf_export.save_pretrained(rm, tmp_path / "hf")  # what train_rm's export_hf writes
  code = _example("AutoModelForSequenceClassification").replace(
      '"/tmp/rm_tiny/hf"', repr(str(tmp_path / "hf")))
  ns, printed = _run(code)
  ids = np.array([ns["ids"]], np.int32)
  with torch.no_grad():
    theirs = ns["model"](input_ids=torch.tensor(ids)).logits.numpy()[0, 0]
  assert "tensor([[" in printed
  np.testing.assert_allclose(theirs, float(rm(jnp.asarray(ids))[0]), rtol=1e-4, atol=1e-5)
