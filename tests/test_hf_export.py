"""``hf_export.save_pretrained`` of reward models and trunks, loaded by PyTorch ``transformers``.

Each export is loaded with ``transformers`` (``AutoModelForSequenceClassification``,
``AutoModel``) and scored on the same right-padded tokens as the prefjax model
it came from, and loaded back with ``from_pretrained``.
"""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prefjax import models
from prefjax.data import tokenize
from prefjax.models import decoder, encoder, heads, hf_export, hf_import

ATOL = 1e-4
VOCAB = 61
PAD, EOS = 0, 2


def _llama(**overrides) -> decoder.Decoder:
  cfg = decoder.DecoderConfig.tiny_llama(
      vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=48, max_position_embeddings=64, pad_id=PAD, eos_id=EOS, bos_id=1)
  return decoder.Decoder(cfg.replace(**overrides), rngs=nnx.Rngs(0), dtype=jnp.float32)


def _gpt2(**overrides) -> decoder.Decoder:
  cfg = decoder.DecoderConfig.tiny_gpt2(vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, bos_id=1)
  return decoder.Decoder(cfg.replace(**overrides), rngs=nnx.Rngs(1), dtype=jnp.float32)


def _perturb_norms(model: nnx.Module) -> None:
  """Norm scales start at one; move them so that a dropped or swapped norm shows."""
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and any("norm" in str(p) for p in path):
      var.set_value(var.get_value() + 0.1 * np.cos(np.arange(var.size)).reshape(var.shape))


def _reward_model(trunk, head="reward", seed=3):
  model = heads.attach_head(trunk, head, rngs=nnx.Rngs(seed))
  _perturb_norms(model)
  return model


def _batch(end_id: int = EOS):
  """Right-padded rows whose last real token is EOS, as the pipeline's responses end."""
  tokens = np.random.RandomState(0).randint(3, VOCAB, (3, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  tokens[0, -1], tokens[1, 5], tokens[2, 2] = end_id, end_id, end_id
  return np.where(mask > 0, tokens, PAD), mask


def _ours(model, tokens, mask) -> np.ndarray:
  out = nnx.jit(lambda m, t, k: m(t, attention_mask=k))(model, tokens, mask)
  return np.asarray(out).reshape(tokens.shape[0], -1)


def _torch_scores(path, tokens, mask) -> np.ndarray:
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, attn_implementation="eager").eval()
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("build", [_llama, lambda: _llama(tie_embeddings=True), _gpt2,
                                   lambda: _gpt2(tie_embeddings=False)],
                         ids=["llama_untied", "llama_tied", "gpt2", "gpt2_untied"])
def test_a_reward_model_exports_as_a_sequence_classifier_that_scores_the_same(build, tmp_path):
  model = _reward_model(build())
  tokens, mask = _batch()
  ours = _ours(model, tokens, mask)
  assert np.abs(ours).min() > 1e-3  # a zero head would not pass by accident
  hf_export.save_pretrained(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"][0].endswith("ForSequenceClassification")
  assert config["id2label"] == {"0": "reward"} and config["pad_token_id"] == PAD
  np.testing.assert_allclose(_torch_scores(tmp_path, tokens, mask), ours, atol=ATOL, rtol=0)
  back = models.from_pretrained(tmp_path, head="reward", dtype=jnp.float32)
  np.testing.assert_allclose(_ours(back, tokens, mask), ours, atol=1e-6, rtol=0)


def test_named_objectives_and_head_ensembles_export_one_label_each(tmp_path):
  tokens, mask = _batch()
  multi = _reward_model(_llama(), head="multi:helpful,harmless")
  hf_export.save_pretrained(multi, tmp_path / "multi")
  config = json.loads((tmp_path / "multi" / "config.json").read_text())
  assert config["id2label"] == {"0": "helpful", "1": "harmless"}
  np.testing.assert_allclose(_torch_scores(tmp_path / "multi", tokens, mask),
                             _ours(multi, tokens, mask), atol=ATOL, rtol=0)
  back = models.from_pretrained(tmp_path / "multi", head="multi:helpful,harmless")
  np.testing.assert_allclose(_ours(back, tokens, mask), _ours(multi, tokens, mask), atol=1e-6)

  ensemble = _reward_model(_llama(), head="reward_ensemble:3")
  hf_export.save_pretrained(ensemble, tmp_path / "heads")
  scores = _torch_scores(tmp_path / "heads", tokens, mask)
  assert scores.shape == (3, 3)
  np.testing.assert_allclose(scores, _ours(ensemble, tokens, mask), atol=ATOL, rtol=0)


def test_a_deep_ensemble_exports_one_directory_per_member(tmp_path):
  def build(rngs):
    return heads.attach_head(_llama(), "reward", rngs=rngs)
  ensemble = heads.DeepEnsemble(build, seeds=[5, 6])
  tokens, mask = _batch()
  ours = _ours(ensemble, tokens, mask)
  assert not np.allclose(ours[:, 0], ours[:, 1])
  hf_export.save_pretrained(ensemble, tmp_path)
  for k in range(2):
    np.testing.assert_allclose(_torch_scores(tmp_path / f"member_{k}", tokens, mask)[:, 0],
                               ours[:, k], atol=ATOL, rtol=0)


def test_a_pad_that_is_the_eos_is_marked_so_prefjax_reloads_scores_as_trained(tmp_path, caplog):
  model = _reward_model(_llama(pad_id=EOS))
  tokens, mask = _batch()
  tokens = np.where(mask > 0, tokens, EOS)
  ours = _ours(model, tokens, mask)
  with caplog.at_level(logging.WARNING):
    hf_export.save_pretrained(model, tmp_path)
  assert "would score the token before it" in caplog.text
  config = json.loads((tmp_path / "config.json").read_text())
  assert config[hf_import.SCORE_TOKEN_KEY] == "last_real" and config["pad_token_id"] == EOS
  back = models.from_pretrained(tmp_path, head="reward", dtype=jnp.float32)
  assert back.last_skips_id is None
  np.testing.assert_allclose(_ours(back, tokens, mask), ours, atol=1e-6, rtol=0)
  # transformers reads the token before the final EOS, which the model never scored.
  model.last_skips_id = EOS
  np.testing.assert_allclose(_torch_scores(tmp_path, tokens, mask),
                             _ours(model, tokens, mask), atol=ATOL, rtol=0)
  assert not np.allclose(_ours(model, tokens, mask), ours, atol=ATOL)


def test_a_reward_model_read_from_hf_keeps_hf_s_scoring_rule(tmp_path):
  model = _reward_model(_llama(pad_id=EOS))
  model.last_skips_id = EOS  # as hf_import.load_score_head sets it
  hf_export.save_pretrained(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert hf_import.SCORE_TOKEN_KEY not in config and config["pad_token_id"] == EOS
  tokens, mask = _batch()
  tokens = np.where(mask > 0, tokens, EOS)
  np.testing.assert_allclose(_torch_scores(tmp_path, tokens, mask),
                             _ours(model, tokens, mask), atol=ATOL, rtol=0)


def test_a_head_bias_is_written_for_prefjax_and_shifts_transformers_scores(tmp_path, caplog):
  model = _reward_model(_llama())
  model.head.bias[...] = jnp.array([0.75])
  tokens, mask = _batch()
  ours = _ours(model, tokens, mask)
  with caplog.at_level(logging.WARNING):
    hf_export.save_pretrained(model, tmp_path)
  assert "bias [0.75] is not zero" in caplog.text
  np.testing.assert_allclose(_torch_scores(tmp_path, tokens, mask), ours - 0.75, atol=ATOL)
  back = models.from_pretrained(tmp_path, head="reward", dtype=jnp.float32)
  np.testing.assert_allclose(_ours(back, tokens, mask), ours, atol=1e-6, rtol=0)


def test_a_value_model_exports_its_trunk_for_transformers_and_its_head_for_prefjax(
    tmp_path, caplog):
  value = heads.attach_head(_llama(), "value", rngs=nnx.Rngs(0))  # drops the untied LM head
  _perturb_norms(value)
  assert not hasattr(value.trunk, "lm_head")
  with caplog.at_level(logging.WARNING):
    hf_export.save_pretrained(value, tmp_path)
  assert ("ValueModel(Decoder) has no Hugging Face form: transformers loads its trunk "
          "(LlamaModel); the head is in prefjax_head.safetensors") in caplog.text
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == ["LlamaModel"] and config[hf_import.HEAD_KEY] == "value"
  tokens, mask = _batch()
  hf_model = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(value.trunk.hidden_states(tokens, attention_mask=mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
  back = models.from_pretrained(tmp_path, head="value", dtype=jnp.float32)
  np.testing.assert_allclose(back(tokens, attention_mask=mask), value(tokens, attention_mask=mask),
                             atol=1e-6, rtol=0)
  assert hf_import.saved_head(tmp_path) == ("value", None)
  with pytest.raises(hf_import.CheckpointError, match=r"holds a 'value' head"):
    models.from_pretrained(tmp_path, head="reward")  # [D, 1] fits a reward head too


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_an_encoder_reward_model_reloads_with_its_head_and_pooling(pooling, tmp_path):
  """Its head went unsaved: a reload scored with a fresh random head, without a word."""
  trunk = encoder.Encoder(encoder.EncoderConfig.tiny(vocab_size=VOCAB), rngs=nnx.Rngs(0))
  rm = heads.attach_head(trunk, "multi:helpful,harmless", rngs=nnx.Rngs(1), pooling=pooling)
  _perturb_norms(rm)
  hf_export.save_pretrained(rm, tmp_path)
  assert hf_import.saved_head(tmp_path) == ("multi:helpful,harmless", pooling)
  back = models.from_pretrained(tmp_path, head="multi:helpful,harmless")
  assert back.pooling == pooling
  tokens, mask = _batch()
  np.testing.assert_allclose(_ours(back, tokens, mask), _ours(rm, tokens, mask), atol=1e-6)
  # Another head, even one whose shapes fit (two members read as the two objectives).
  for head in ("reward_ensemble:3", "reward_ensemble:2"):
    with pytest.raises(hf_import.CheckpointError,
                       match=r"holds a 'multi:helpful,harmless' head with pooling "
                             rf"'{pooling}'; the requested model has '{head}'"):
      models.from_pretrained(tmp_path, head=head)


def test_a_gpt2_tokenizer_export_pads_apart_from_its_eos_so_transformers_scores_as_trained(
    gpt2_bpe_dir, tmp_path):
  """GPT-2's pad id is its EOS id: transformers skipped the final EOS the model scores
  (0.381 against -0.053), and batched pipelines refused a tokenizer without a pad token."""
  tok = tokenize.load_tokenizer(gpt2_bpe_dir)
  assert tok.pad_id == tok.eos_id
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=tok.vocab_size, num_layers=1,
                                         hidden_size=32, num_heads=4, num_kv_heads=2,
                                         intermediate_size=48)
  rm = _reward_model(decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  hf_export.save_pretrained(rm, tmp_path, tokenizer=tok)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["pad_token_id"] == tok.vocab_size != tok.eos_id
  assert config["vocab_size"] == tok.vocab_size + 1 and config["problem_type"] == "regression"
  texts = ["Human: hi\n\nAssistant: hello there", "Human: and?\n\nAssistant: no"]
  ids = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts]  # as the pipeline does
  length = max(map(len, ids))
  tokens = np.array([i + [tok.pad_id] * (length - len(i)) for i in ids], np.int32)
  mask = np.array([[1] * len(i) + [0] * (length - len(i)) for i in ids], np.int32)
  ours = _ours(rm, tokens, mask)[:, 0]
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  encoded = hf_tok(texts, padding=True, return_tensors="pt")
  assert encoded["input_ids"][0, :len(ids[0])].tolist() == ids[0]
  np.testing.assert_allclose(_torch_scores(tmp_path, encoded["input_ids"].numpy(),
                                           encoded["attention_mask"].numpy())[:, 0],
                             ours, atol=ATOL, rtol=0)
  pipe = transformers.pipeline("text-classification", model=str(tmp_path), batch_size=2)
  np.testing.assert_allclose([r["score"] for r in pipe(texts)], ours, atol=ATOL)
  reloaded = tokenize.load_tokenizer(tmp_path)  # prefjax reads the export's tokenizer too
  assert reloaded.encode(texts[0]) == tok.encode(texts[0]) and reloaded.pad_id == tok.vocab_size
  back = models.from_pretrained(tmp_path, head="reward", dtype=jnp.float32)
  padded = np.where(mask > 0, tokens, reloaded.pad_id)
  np.testing.assert_allclose(_ours(back, padded, mask)[:, 0], ours, atol=1e-6)


@pytest.mark.parametrize("add_bos", [True, False])
def test_a_policy_export_s_tokenizer_encodes_prompts_as_the_pipeline_did(gpt2_bpe_dir, tmp_path,
                                                                        add_bos):
  """The exported tokenizer of a policy adds the BOS the policy was trained with (GPT-2's
  own adds none), and nothing after the text: a prompt for generate."""
  tok = tokenize.load_tokenizer(gpt2_bpe_dir)
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=tok.vocab_size, num_layers=1,
                                         hidden_size=32, num_heads=4, num_kv_heads=2,
                                         intermediate_size=48)
  policy = decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  hf_export.save_pretrained(policy, tmp_path, tokenizer=tok, add_bos=add_bos)
  text = "Human: hi\n\nAssistant:"
  expected = ([tok.bos_id] if add_bos else []) + tok.encode(text)
  assert transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == expected
  assert tok.hf(text)["input_ids"] == tok.encode(text)  # the original is left as it was
  assert tokenize.load_tokenizer(tmp_path).encode(text) == tok.encode(text)


@pytest.mark.parametrize("skips", ["zero", "eos"])
def test_a_classifier_read_from_hf_exports_a_tokenizer_padding_with_the_id_it_skips(
    gpt2_bpe_dir, tmp_path, skips):
  """A GPT-2 classifier whose config pads with id 0 read with GPT-2's tokenizer (pad = EOS):
  the export said pad 0 while its tokenizer padded with the EOS, so transformers scored a
  shorter row at a padding slot (-0.152 against -0.115). With pad = EOS the saved copy
  needs a pad token too (GPT-2's tokenizer has none)."""
  tok = tokenize.load_tokenizer(gpt2_bpe_dir)
  skips_id = 0 if skips == "zero" else tok.eos_id
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2,
                                n_positions=64, num_labels=1, pad_token_id=skips_id)
  transformers.GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path / "src")
  rm = models.from_pretrained(tmp_path / "src", head="reward", dtype=jnp.float32)
  assert rm.last_skips_id == skips_id
  texts = ["hello world", "a much longer text than the first one here"]
  ids = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts]
  length = max(map(len, ids))
  tokens = np.array([i + [tok.pad_id] * (length - len(i)) for i in ids], np.int32)
  mask = np.array([[1] * len(i) + [0] * (length - len(i)) for i in ids], np.int32)
  ours = _ours(rm, tokens, mask)[:, 0]
  hf_export.save_pretrained(rm, tmp_path / "out", tokenizer=tok)
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert hf_tok.pad_token_id == skips_id
  encoded = hf_tok(texts, padding=True, return_tensors="pt")
  np.testing.assert_allclose(_torch_scores(tmp_path / "out", encoded["input_ids"].numpy(),
                                           encoded["attention_mask"].numpy())[:, 0],
                             ours, atol=ATOL, rtol=0)


def test_a_foreign_reward_checkpoint_is_read_as_one_reward(tmp_path):
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, num_labels=1, pad_token_id=0)
  transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "one")
  assert hf_import.saved_head(tmp_path / "one") == ("reward", "last")
  config.num_labels = 2
  transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
  assert hf_import.saved_head(tmp_path / "two") == ("multi:LABEL_0,LABEL_1", "last")
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
  assert hf_import.saved_head(tmp_path / "lm") == (None, None)


def test_a_gpt2_style_decoder_whose_heads_do_not_split_its_width_is_refused(tmp_path):
  """GPT-2's c_attn holds n_embd per projection: such an export loaded nowhere."""
  model = _gpt2(head_dim=16)
  assert model.config.head_dim * model.config.num_heads != model.config.hidden_size
  with pytest.raises(hf_import.CheckpointError, match=r"head_dim=16 x num_heads=.* has no "
                                                      r"Hugging Face form"):
    hf_export.save_pretrained(model, tmp_path)


@pytest.mark.parametrize("add_bos", [True, False])
def test_the_hf_scorer_adds_bos_as_the_exported_tokenizer_does(gpt2_bpe_dir, tmp_path, add_bos):
  """eval_rm's hf: scorer prepended BOS whatever the model was trained with; it now follows
  the directory's tokenizer unless eval's pipeline says otherwise."""
  import ml_collections
  from prefjax.evals import hf_scorer
  tok = tokenize.load_tokenizer(gpt2_bpe_dir)
  assert not tok.adds_bos()  # GPT-2's own tokenizer adds no BOS
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=tok.vocab_size, num_layers=1,
                                         hidden_size=32, num_heads=4, num_kv_heads=2,
                                         intermediate_size=48)
  rm = _reward_model(decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  hf_export.save_pretrained(rm, tmp_path, tokenizer=tok, add_bos=add_bos)
  exported = tokenize.load_tokenizer(tmp_path)
  assert exported.adds_bos() == add_bos
  eval_cfg = ml_collections.ConfigDict({"batch_size": 4, "pipeline": {"max_length": 64}})
  pcfg = hf_scorer.hf_pipeline(eval_cfg, exported)
  assert (pcfg.add_bos, pcfg.max_length, pcfg.batch_size) == (add_bos, 64, 4)
  eval_cfg.pipeline.add_bos = not add_bos
  assert hf_scorer.hf_pipeline(eval_cfg, exported).add_bos == (not add_bos)


def test_a_chat_reward_model_s_exported_tokenizer_ends_texts_with_the_turn_end(
    smollm2_gguf, tmp_path):
  """Chat-style responses end with the template's turn-end token where it is not EOS
  (Gemma's ``<end_of_turn>``); the exported tokenizer appends that token, not EOS."""
  from prefjax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  from tests.test_tokenize import GEMMA_LIKE, _retemplated  # pylint: disable=import-outside-toplevel
  tok = _retemplated(tokenize.load_tokenizer(smollm2_gguf), GEMMA_LIKE)
  turn_end = tok.turn_end_id()
  assert turn_end is not None and turn_end != tok.eos_id
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=tok.vocab_size, num_layers=1, hidden_size=16,
                                         num_heads=2, num_kv_heads=1, intermediate_size=16)
  rm = _reward_model(decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  for style, end in (("chat", turn_end), ("raw", tok.eos_id)):
    fields = pipeline_lib.PipelineConfig(prompt_style=style, add_bos=False).text_fields()
    hf_export.save_pretrained(rm, tmp_path / style, tokenizer=tok, add_bos=False, pipeline=fields)
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / style)("Paris")["input_ids"]
    assert ids == tok.encode("Paris") + [end]
