"""Hugging Face directories prefjax must refuse, or read as their config means, rather than
load silently wrong: quantized weights, a tied config over a separate head, and a reward
model's own head where a reward spec names no checkpoint."""

import logging
import pathlib
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from prefjax import models
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize
from prefjax.models import hf_import
from prefjax.rl import rewards
from tests import test_hf_parity


def _llama_dir(tmp_path: pathlib.Path, *, tied: bool, name: str = "llama",
               reward: bool = False, vocab_size: int = test_hf_parity.VOCAB) -> pathlib.Path:
  config = test_hf_parity._llama_config(tied=tied)  # pylint: disable=protected-access
  config.vocab_size = vocab_size
  torch.manual_seed(0)
  if reward:
    config.pad_token_id, config.num_labels = 0, 1
    model = transformers.LlamaForSequenceClassification(config)
  else:
    model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(tmp_path / name)
  return tmp_path / name


def test_a_classifier_s_labels_are_not_read_as_ensemble_members(tmp_path):
  """A 3-label classifier's ``score`` fits a 3-member ensemble's head in shape; its class
  logits are not members, so the mean and spread would mean nothing."""
  config = test_hf_parity._llama_config(tied=False)  # pylint: disable=protected-access
  config.pad_token_id, config.num_labels = 0, 3
  torch.manual_seed(0)
  transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "cls")
  with pytest.raises(hf_import.CheckpointError, match=r"'score.weight' is a 'multi:LABEL_0,"
                                                      r"LABEL_1,LABEL_2' head; the requested "
                                                      r"model has 'reward_ensemble:3'"):
    models.from_pretrained(tmp_path / "cls", head="reward_ensemble:3", score_head="require",
                           dtype=jnp.float32)
  multi = models.from_pretrained(tmp_path / "cls", head="multi:LABEL_0,LABEL_1,LABEL_2",
                                 score_head="require", dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(multi.head.kernel).T, transformers.
                                LlamaForSequenceClassification.from_pretrained(
                                    tmp_path / "cls").score.weight.detach().numpy())


def _edit(path: pathlib.Path, edit) -> None:
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"))


def test_quantized_checkpoints_are_refused_naming_what_is_quantized(tmp_path):
  """int8 weights of the float weights' shapes loaded as if they were floats (logits 2.3
  off); a float8 tensor failed inside NumPy."""
  path = _llama_dir(tmp_path, tied=False)
  test_hf_parity._edit_config(path, lambda c: c.update(  # pylint: disable=protected-access
      quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}))
  with pytest.raises(hf_import.CheckpointError, match=r"config.json: a quantized checkpoint "
                     r"\(quantization_config, quant_method 'bitsandbytes'\)"):
    models.from_pretrained(path)
  test_hf_parity._edit_config(path, lambda c: c.pop("quantization_config"))  # pylint: disable=protected-access
  name = "model.layers.0.mlp.down_proj.weight"
  _edit(path, lambda t: t.update({name: np.clip(t[name] * 100, -127, 127).astype(np.int8)}))
  with pytest.raises(hf_import.CheckpointError, match=rf"tensor '{name}' is int8 \(a quantized "
                                                       r"checkpoint\?\)"):
    models.from_pretrained(path)


def test_a_tied_config_over_a_separate_head_is_refused_and_an_equal_one_loads(tmp_path):
  """transformers 4 tied them, transformers 5 keeps the head: logits 2.6 apart."""
  path = _llama_dir(tmp_path, tied=False)
  test_hf_parity._edit_config(path, lambda c: c.update(tie_word_embeddings=True))  # pylint: disable=protected-access
  with pytest.raises(hf_import.CheckpointError, match=r"sets tie_word_embeddings, but the "
                     r"checkpoint's lm_head.weight differs from 'model.embed_tokens.weight'"):
    models.from_pretrained(path)
  _edit(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  model = models.from_pretrained(path, dtype=jnp.float32)
  assert model.config.tie_embeddings


def test_swish_is_silu_and_other_activations_are_refused_naming_the_file(tmp_path):
  path = _llama_dir(tmp_path, tied=True)
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  silu = np.asarray(models.from_pretrained(path, dtype=jnp.float32)(tokens))
  test_hf_parity._edit_config(path, lambda c: c.update(hidden_act="swish"))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(models.from_pretrained(path, dtype=jnp.float32)(
      tokens)), silu)
  test_hf_parity._edit_config(path, lambda c: c.update(hidden_act="gelu"))  # pylint: disable=protected-access
  with pytest.raises(hf_import.CheckpointError, match=rf"{path}/config.json: llama hidden_act "
                                                       r"'gelu' unsupported"):
    models.from_pretrained(path)


def _reward_spec(path: pathlib.Path, head: str = "reward") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      kind="model", name="hf_rm", tokenizer=dict(path="byte"), checkpoint="", max_length=32,
      aggregation="mean", lam=0.0,
      model=dict(path=str(path), head=head, dtype="float32")))


def test_a_reward_spec_without_a_checkpoint_scores_with_the_directory_s_own_head(
    tmp_path, caplog):
  """Its head was loaded if it fitted, else silently fresh; and a head loaded right still
  got the warning that it was RANDOM."""
  path = _llama_dir(tmp_path, tied=False, reward=True, vocab_size=259)
  with caplog.at_level(logging.WARNING):
    reward = rewards.make_reward(_reward_spec(path), seed=0)
  assert "RANDOM" not in caplog.text
  own = models.from_pretrained(path, head="reward", dtype=jnp.float32)
  prompts, responses = ["ab", "a question"], ["cd", " an answer"]
  tokens, mask = rewards.text_encoder(tokenize.ByteTokenizer(),
                                      pipeline_lib.PipelineConfig(max_length=32))(
      [p + rewards.MODEL_SEPARATOR + r for p, r in zip(prompts, responses)])
  np.testing.assert_allclose(reward(prompts, responses), np.asarray(
      own(tokens, attention_mask=mask), np.float64).reshape(-1), rtol=1e-5, atol=1e-6)
  two = tmp_path / "two_labels"
  shutil.copytree(path, two)
  test_hf_parity._edit_config(two, lambda c: c.update(  # pylint: disable=protected-access
      id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1}))
  _edit(two, lambda t: t.update({"score.weight": np.concatenate([t["score.weight"]] * 2)}))
  with pytest.raises(hf_import.CheckpointError):  # a one-output head cannot take two labels
    rewards.make_reward(_reward_spec(two), seed=0)
  base = _llama_dir(tmp_path, tied=False, name="base", vocab_size=259)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    rewards.make_reward(_reward_spec(base), seed=0)
  assert "its reward head is RANDOM" in caplog.text


def test_a_prefjax_workdir_given_as_a_hugging_face_directory_names_its_export(tmp_path):
  """train_dpo --config.model.path=<an SFT workdir> said "model_type None is not supported"."""
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text('{"loop": {"num_steps": 10}}')  # prefjax's config
  with pytest.raises(hf_import.CheckpointError, match=r"is a prefjax run's workdir, not a "
                                                      r"Hugging Face model directory: rerun it "
                                                      r"with --config.export_hf=True"):
    hf_import.load_hf_checkpoint(tmp_path)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
  with pytest.raises(hf_import.CheckpointError, match=f"its export is {tmp_path / 'hf'}"):
    hf_import.load_hf_checkpoint(tmp_path)
