"""experiments/train_sft.py: response-only token-mean NLL, held-out NLL falls, HF export."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs.rl import tiny_rloo
from configs.rm import tiny as rm_tiny
from experiments import train_dpo
from experiments import train_rl
from experiments import train_rm
from experiments import train_sft
from prefjax import experiment
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize
from prefjax.models import decoder
from prefjax.models import hf_import
from tests import test_train_dpo as helpers


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
  root, patch = helpers.isolated_env(tmp_path_factory)
  yield root
  patch.undo()


def test_heldout_nll_decreases_and_export_reloads(tmp_path):
  result = train_sft.run(helpers.sft_config(steps=30), str(tmp_path))
  evals = [r for r in helpers.read_metrics(tmp_path) if "eval/nll" in r]
  assert [r["step"] for r in evals] == [10, 20, 30]
  nll = [r["eval/nll"] for r in evals]
  assert nll[0] > nll[1] > nll[2], nll
  # Uniform over the byte vocabulary is log(259) = 5.56 nats/token (about the random init).
  assert nll[2] < math.log(259) - 1.5, nll
  summary = json.loads((tmp_path / "summary.json").read_text())
  np.testing.assert_allclose(summary["final_perplexity"], math.exp(nll[2]), rtol=1e-12)
  assert summary["data"] == json.loads((tmp_path / "data_report.json").read_text())
  assert summary["data"]["train"]["iterator"]["batches"] == 30
  train = helpers.train_losses(tmp_path)
  assert np.mean(train[-5:]) < np.mean(train[:5]) - 1.0

  reloaded = hf_import.from_pretrained(tmp_path / experiment.HF_EXPORT_DIR)
  tokens = np.array([[257, 97, 98, 99, 100, 258]], np.int32)
  np.testing.assert_allclose(reloaded(tokens), result.model(tokens), rtol=1e-5, atol=1e-5)


ROWS = [{"prompt": p, "chosen": c, "rejected": "-"} for p, c in [
    ("abc", "dde"), ("hello", "ok"), ("x", "yyyy"), ("mno", "pp")]]


def _model(vocab: int):
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=vocab, num_layers=1)
  return decoder.Decoder(cfg, rngs=nnx.Rngs(0))


def test_loss_is_token_mean_response_nll_vs_numpy():
  tok = tokenize.ByteTokenizer()
  model = _model(tok.vocab_size)
  config = pipeline_lib.PipelineConfig(batch_size=4, max_length=16, shuffle=False, num_epochs=1)
  batch = next(iter(pipeline_lib.sft_dataset(ROWS, tok, config)))
  loss, metrics = nnx.jit(train_sft.loss_fn)(model, batch, jax.random.key(0))
  logits = nnx.jit(lambda m, t, a: m(t, attention_mask=a))(
      model, batch["tokens"], batch["attention_mask"])
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  total, count = 0.0, 0
  for i, row in enumerate(ROWS):
    prompt = tok.encode(row["prompt"], add_bos=True)
    response = tok.encode(row["chosen"], add_eos=True)
    seq = prompt + response
    for t in range(len(prompt), len(seq)):
      total -= logp[i, t - 1, seq[t]]
      count += 1
  assert float(metrics["loss_weight"]) == count
  np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_packed_loss_equals_padded_loss():
  tok = tokenize.ByteTokenizer()
  model = _model(tok.vocab_size)
  base = pipeline_lib.PipelineConfig(batch_size=4, max_length=16, shuffle=False, num_epochs=1)
  packed_cfg = dataclasses.replace(base, mode="packed", pack_rows=2, pack_length=32,
                                   max_segments_per_row=4)
  padded = next(iter(pipeline_lib.sft_dataset(ROWS, tok, base)))
  packed = next(iter(pipeline_lib.sft_dataset(ROWS, tok, packed_cfg)))
  loss_fn = nnx.jit(train_sft.loss_fn)
  a, ma = loss_fn(model, padded, jax.random.key(0))
  b, mb = loss_fn(model, packed, jax.random.key(0))
  assert float(ma["loss_weight"]) == float(mb["loss_weight"]) == 3 + 2 + 4 + 2 + 4
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


@pytest.mark.parametrize("binary", ["sft", "dpo", "rm", "rl"])
def test_unknown_section_keys_are_rejected_before_any_work(binary, tmp_path):
  config, run = {"sft": (helpers.sft_config(), train_sft.run),
                 "dpo": (helpers.dpo_config(), train_dpo.run),
                 "rm": (rm_tiny.get_config("quick"), train_rm.run),
                 "rl": (tiny_rloo.get_config("quick"), train_rl.run)}[binary]
  config.eval.batchsize = 8  # A typo of batch_size (exact_kl_max_vocab for RL).
  with pytest.raises(ValueError, match=r"config.eval: unknown field\(s\) \['batchsize'\]"):
    run(config, str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()
