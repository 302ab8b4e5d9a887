"""Parity of HF checkpoint import/export against Hugging Face PyTorch models (CPU, float32).

Tiny random Llama (GQA; tied and untied), GPT-2 and BERT models are created with
``transformers``, saved to a temporary directory, loaded with
``prefjax.models.from_pretrained`` and compared on the same tokens: padded
(right and left), unpadded and packed. Then prefjax's ``save_pretrained`` is
checked both ways (round trip and loading in PyTorch), and the loader's errors.
"""

import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from prefjax import experiment, models
from prefjax.models import decoder, encoder, hf_import

ATOL = 1e-4
VOCAB = 61


def _llama_config(tied: bool) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied,
      attn_implementation="eager")


def _gpt2_config(tied: bool = True) -> transformers.GPT2Config:
  return transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
      tie_word_embeddings=tied, attn_implementation="eager")


def _bert_config() -> transformers.BertConfig:
  return transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")


_HF_BUILDERS = {
    "llama_untied": lambda: transformers.LlamaForCausalLM(_llama_config(tied=False)),
    "llama_tied": lambda: transformers.LlamaForCausalLM(_llama_config(tied=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(_gpt2_config()),
    "gpt2_untied": lambda: transformers.GPT2LMHeadModel(_gpt2_config(tied=False)),
    "bert": lambda: transformers.BertModel(_bert_config()),
}


def _randomize_norms(module: torch.nn.Module, seed: int) -> None:
  """HF initialises norms to (1, 0); perturb them so a swapped norm would be caught."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "norm" in name.lower() or ".ln_" in name or name.startswith("ln_f"):
        p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def load_pair(tmp_path_factory):
  """``load_pair(name) -> (torch model, prefjax model, checkpoint dir)``, built once per name."""
  cache = {}

  def load(name: str):
    if name not in cache:
      torch.manual_seed(0)
      hf_model = _HF_BUILDERS[name]().eval()
      _randomize_norms(hf_model, seed=1)
      path = tmp_path_factory.mktemp(name)
      hf_model.save_pretrained(path)
      cache[name] = hf_model, models.from_pretrained(path, dtype=jnp.float32), path
    return cache[name]

  return load


ALL = sorted(_HF_BUILDERS)
DECODERS = [n for n in ALL if n != "bert"]


def _tokens(n: int, t: int, seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randint(1, VOCAB, (n, t)).astype(np.int32)


def _torch_out(hf_model, tokens, mask, position_ids=None) -> np.ndarray:
  kwargs = {"input_ids": torch.tensor(tokens, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long)}
  if position_ids is not None:
    kwargs["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
  with torch.no_grad():
    out = hf_model(**kwargs)
  return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).numpy()


@nnx.jit
def _forward(model, tokens, attention_mask, segment_ids, positions):
  kwargs = dict(attention_mask=attention_mask, segment_ids=segment_ids, positions=positions)
  if isinstance(model, encoder.Encoder):
    return model.hidden_states(tokens, **kwargs)
  return model(tokens, **kwargs)


def _ours_out(model, tokens, *, attention_mask=None, segment_ids=None,
              positions=None) -> np.ndarray:
  return np.asarray(_forward(model, tokens, attention_mask, segment_ids, positions))


def _assert_close_on(mask, ours, ref):
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_loaded_model_type(load_pair, name):
  _, ours, _ = load_pair(name)
  expected = encoder.Encoder if name == "bert" else decoder.Decoder
  assert isinstance(ours, expected)
  if name.startswith("llama"):
    assert ours.config.num_kv_heads == 2 and ours.config.rope_theta == 500.0
    assert ours.config.tie_embeddings == (name == "llama_tied")


@pytest.mark.parametrize("name", ALL)
def test_unpadded_and_right_padded_match_torch(load_pair, name):
  hf_model, ours, _ = load_pair(name)
  tokens = _tokens(3, 9, seed=2)
  full = np.ones_like(tokens)
  _assert_close_on(full, _ours_out(ours, tokens, attention_mask=full),
                   _torch_out(hf_model, tokens, full))
  mask = full.copy()
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  _assert_close_on(mask, _ours_out(ours, tokens, attention_mask=mask),
                   _torch_out(hf_model, tokens, mask))


@pytest.mark.parametrize("name", DECODERS)
def test_left_padded_decoder_matches_torch(load_pair, name):
  hf_model, ours, _ = load_pair(name)
  tokens = _tokens(3, 9, seed=3)
  mask = np.ones_like(tokens)
  mask[0, :3] = 0
  mask[2, :6] = 0
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  _assert_close_on(mask, _ours_out(ours, tokens, attention_mask=mask),
                   _torch_out(hf_model, tokens, mask, positions))


@pytest.mark.parametrize("name", ALL)
def test_packed_equals_per_sequence_torch(load_pair, name):
  hf_model, ours, _ = load_pair(name)
  lengths = ((5, 3), (7,))
  seqs = [[_tokens(1, n, seed=10 + 3 * r + j)[0] for j, n in enumerate(row)]
          for r, row in enumerate(lengths)]
  width = 10
  tokens = np.zeros((2, width), np.int32)
  seg_ids = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for r, row in enumerate(seqs):
    start = 0
    for s, seq in enumerate(row):
      tokens[r, start:start + len(seq)] = seq
      seg_ids[r, start:start + len(seq)] = s + 1
      positions[r, start:start + len(seq)] = np.arange(len(seq))
      start += len(seq)
  packed = _ours_out(ours, tokens, segment_ids=seg_ids, positions=positions)
  for r, row in enumerate(seqs):
    start = 0
    for seq in row:
      ref = _torch_out(hf_model, seq[None], np.ones((1, len(seq)), np.int64))[0]
      np.testing.assert_allclose(packed[r, start:start + len(seq)], ref, atol=ATOL, rtol=0)
      start += len(seq)


def test_sharded_index_checkpoint_loads(load_pair, tmp_path):
  hf_model, ours, _ = load_pair("llama_untied")
  hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  resharded = models.from_pretrained(tmp_path, dtype=jnp.float32)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                            nnx.to_flat_state(nnx.state(resharded, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


@pytest.mark.parametrize("name", DECODERS)
def test_save_pretrained_round_trip_and_torch_load(load_pair, name, tmp_path):
  _, ours, _ = load_pair(name)
  models.save_pretrained(ours, tmp_path)
  back = models.from_pretrained(tmp_path, dtype=jnp.float32)
  assert back.config == ours.config
  before = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
  after = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
  assert before.keys() == after.keys()
  for p in before:
    np.testing.assert_array_equal(np.asarray(before[p].get_value()),
                                  np.asarray(after[p].get_value()), err_msg=str(p))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  tokens = _tokens(3, 9, seed=2)
  mask = np.ones_like(tokens)
  mask[1, 5:] = 0
  _assert_close_on(mask, _ours_out(ours, tokens, attention_mask=mask),
                   _torch_out(hf_model, tokens, mask))


def _rope(theta: float) -> dict:
  return {"rope_parameters": {"rope_theta": theta, "rope_type": "default"}}  # transformers 5


_VARIANTS = {  # settings other than the defaults above, each read, run and written back
    "llama_head_dim16_biases_untied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**_llama_config(tied=False).to_dict(), "head_dim": 16,
                                    "attention_bias": True, "mlp_bias": True,
                                    "rms_norm_eps": 1e-2, **_rope(777.0)})),
    "llama_mqa_tied": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**_llama_config(tied=True).to_dict(), "num_key_value_heads": 1,
                                    "rms_norm_eps": 3e-3, **_rope(50.0)})),
    "llama_head_dim12": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**_llama_config(tied=False).to_dict(), "head_dim": 12,
                                    "rms_norm_eps": 1e-6, **_rope(1e6)})),
    "gpt2_untied_inner_tanh_gelu": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**_gpt2_config(tied=False).to_dict(), "n_inner": 40,
                                   "layer_norm_epsilon": 1e-2,
                                   "activation_function": "gelu_pytorch_tanh"})),
}


def _variant(name: str) -> torch.nn.Module:
  """HF's init leaves attention near uniform, where rope barely matters (theta 500 against
  1e6 moved logits by 8e-4): queries and keys are scaled 16x, so a wrong theta moves them
  by 2e-4 to 0.2."""
  torch.manual_seed(0)
  hf_model = _VARIANTS[name]().eval()
  _randomize_norms(hf_model, seed=1)
  with torch.no_grad():
    for param_name, param in hf_model.named_parameters():
      if any(k in param_name for k in ("q_proj", "k_proj", "c_attn")):
        param.mul_(16.0)
  return hf_model


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_non_default_decoder_settings_match_torch_both_ways(name, tmp_path):
  """Head dims apart from width / heads, biases, MQA, norm eps, rope theta, MLP width and
  activation: read from HF, run, and written back for HF to run."""
  hf_model = _variant(name)
  hf_model.save_pretrained(tmp_path / "hf")
  ours = models.from_pretrained(tmp_path / "hf", dtype=jnp.float32)
  tokens, mask = _tokens(3, 9, seed=2), np.ones((3, 9), np.int32)
  mask[1, 5:] = 0
  logits = _ours_out(ours, tokens, attention_mask=mask)
  _assert_close_on(mask, logits, _torch_out(hf_model, tokens, mask))
  models.save_pretrained(ours, tmp_path / "back")
  back = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "back", attn_implementation="eager").eval()
  _assert_close_on(mask, logits, _torch_out(back, tokens, mask))


def test_native_decoder_configs_save_as_hf(tmp_path):
  """Configs built in prefjax (not read from HF) map onto HF architectures and back."""
  for i, cfg in enumerate([decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB),
                           decoder.DecoderConfig.tiny_gpt2(vocab_size=VOCAB),
                           decoder.DecoderConfig.smollm2_135m()]):
    hf = hf_import.decoder_config_to_hf(cfg)
    assert hf_import._decoder_config_from_hf(hf) == cfg, hf
    hf_cfg = transformers.AutoConfig.for_model(**hf)
    assert hf_cfg.model_type == hf["model_type"]
  with pytest.raises(hf_import.CheckpointError, match="neither the Llama nor the GPT-2"):
    hf_import.decoder_config_to_hf(decoder.DecoderConfig.tiny_llama(norm="layer"))


def test_encoder_save_pretrained_loads_in_torch(load_pair, tmp_path):
  _, ours, _ = load_pair("bert")
  models.save_pretrained(ours, tmp_path)
  hf_model = transformers.BertModel.from_pretrained(
      tmp_path, add_pooling_layer=False, attn_implementation="eager").eval()
  tokens = _tokens(3, 9, seed=2)
  mask = np.ones_like(tokens)
  mask[0, 4:] = 0
  _assert_close_on(mask, _ours_out(ours, tokens, attention_mask=mask),
                   _torch_out(hf_model, tokens, mask))


def test_an_encoder_without_token_types_exports_one_zero_token_type(tmp_path):
  """type_vocab_size=0 was written as is, and transformers' BERT could not run it."""
  ours = encoder.Encoder(encoder.EncoderConfig.tiny(type_vocab_size=0), rngs=nnx.Rngs(0))
  models.save_pretrained(ours, tmp_path)
  hf_model = transformers.BertModel.from_pretrained(
      tmp_path, add_pooling_layer=False, attn_implementation="eager").eval()
  assert hf_model.config.type_vocab_size == 1
  tokens = _tokens(2, 7, seed=3)
  mask = np.ones_like(tokens)
  mask[1, 5:] = 0
  _assert_close_on(mask, _ours_out(ours, tokens, attention_mask=mask),
                   _torch_out(hf_model, tokens, mask))


# -- errors ---------------------------------------------------------------------


@pytest.fixture
def bert_dir(load_pair, tmp_path) -> pathlib.Path:
  """A private copy of the tiny HF BERT checkpoint, free to corrupt."""
  _, _, source = load_pair("bert")
  for f in source.iterdir():
    shutil.copy(f, tmp_path / f.name)
  return tmp_path


def _edit_tensors(path: pathlib.Path, edit) -> None:
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},  # transformers 4
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},  # 5
    # transformers 5 writes rope_parameters and lets a rope_scaling beside it win: this
    # one loaded as plain RoPE (logits 6.8 off on 30 tokens).
    {**_rope(1e4), "rope_scaling": {"type": "linear", "factor": 4.0}},
    # transformers reads "type" in rope_parameters too (its old spelling).
    {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 1e4}},
])
def test_rope_scaling_in_either_config_key_is_refused(rope):
  with pytest.raises(hf_import.CheckpointError, match=r"rope scaling type '\w+' is not supported"):
    hf_import._rope_theta(rope)  # pylint: disable=protected-access
  assert hf_import._rope_theta(_rope(5e5)) == 5e5  # pylint: disable=protected-access


@pytest.mark.parametrize("rope", [
    {"rope_theta": 2e4},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}},
    # A rope_scaling beside rope_parameters replaces it whole (theta 1e4, not 5e4: the
    # logits were 0.11 off).
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4},
     "rope_scaling": {"rope_type": "default"}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e4},
     "rope_scaling": {"rope_type": "default", "rope_theta": 3e4}},
    {"rope_theta": 2e4, "rope_scaling": {"type": "default"}},
])
def test_rope_theta_is_the_one_transformers_reads(rope):
  import copy  # pylint: disable=import-outside-toplevel
  theirs = transformers.LlamaConfig(**copy.deepcopy(rope)).rope_parameters["rope_theta"]
  assert hf_import._rope_theta(rope) == theirs  # pylint: disable=protected-access


def test_unsupported_model_type_is_named(bert_dir):
  path = bert_dir
  config = json.loads((path / "config.json").read_text())
  config["model_type"] = "mamba"
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_import.CheckpointError, match=r"model_type 'mamba' is not supported"):
    models.from_pretrained(path)


def test_missing_tensor_is_named(bert_dir):
  path = bert_dir
  _edit_tensors(path, lambda t: t.pop("encoder.layer.0.attention.self.key.weight"))
  with pytest.raises(hf_import.CheckpointError,
                     match=r"'encoder\.layer\.0\.attention\.self\.key\.weight' is missing"):
    models.from_pretrained(path)


def test_wrong_shape_names_tensor_and_both_shapes(bert_dir):
  path = bert_dir
  _edit_tensors(path, lambda t: t.update(
      {"encoder.layer.0.intermediate.dense.weight": np.zeros((17, 32), np.float32)}))
  with pytest.raises(hf_import.CheckpointError) as info:
    models.from_pretrained(path)
  msg = str(info.value)
  assert "'encoder.layer.0.intermediate.dense.weight'" in msg
  assert "(32, 17)" in msg and "(32, 64)" in msg and "layers/0/mlp/up_proj/kernel" in msg


def test_nan_tensor_is_rejected(bert_dir):
  path = bert_dir
  def poison(t):
    t["embeddings.LayerNorm.bias"] = np.full((32,), np.nan, np.float32)
  _edit_tensors(path, poison)
  with pytest.raises(hf_import.CheckpointError, match=r"'embeddings\.LayerNorm\.bias'.*NaN"):
    models.from_pretrained(path)


def test_unused_tensors_are_reported(bert_dir, caplog):
  path = bert_dir
  _edit_tensors(path, lambda t: t.update({"classifier.weight": np.ones((2, 32), np.float32),
                                          "embeddings.position_ids": np.arange(64)[None]}))
  with caplog.at_level(logging.INFO):
    _, report = hf_import.load_hf_checkpoint(path, dtype=jnp.float32)
  # HF's pooler and our extra classifier are unused; the position_ids buffer is known.
  assert report.unused == ["classifier.weight", "pooler.dense.bias", "pooler.dense.weight"]
  assert report.model_type == "bert"
  # Only the classifier is a surprise: the pooler, in every BERT directory, is an INFO line
  # (MiniLM's warned 5 times in one reproduce run).
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warned) == 1 and "['classifier.weight']" in warned[0], warned
  assert any("bert base model's pooler" in r.getMessage() for r in caplog.records)


def test_bert_prefix_and_old_layernorm_names(bert_dir):
  path = bert_dir
  plain = models.from_pretrained(path, dtype=jnp.float32)
  def rename(t):
    for name in list(t):
      new = "bert." + name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
          "LayerNorm.bias", "LayerNorm.beta")
      t[new] = t.pop(name)
  _edit_tensors(path, rename)
  prefixed = models.from_pretrained(path, dtype=jnp.float32)
  tokens = _tokens(3, 9, seed=8)
  np.testing.assert_array_equal(_ours_out(plain, tokens), _ours_out(prefixed, tokens))


def _edit_config(path: pathlib.Path, edit) -> None:
  config = json.loads((path / "config.json").read_text())
  edit(config)
  (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(num_hidden_layers=1),
     r"config.json gives 1 layers but the checkpoint also has tensors of layer\(s\) \[1\]"),
    (lambda c: c.pop("num_hidden_layers"), r"config.json: missing field 'num_hidden_layers'"),
    (lambda c: c.update(vocab_size="61"),
     r"config.json gives the model's vocab_size as '61'; a size must be a positive integer"),
])
def test_a_config_that_does_not_describe_the_checkpoint_is_named(bert_dir, edit, match):
  _edit_config(bert_dir, edit)  # fewer layers used to load a truncated model with a warning
  with pytest.raises(hf_import.CheckpointError, match=match):
    models.from_pretrained(bert_dir)


def test_unreadable_checkpoint_files_are_named(bert_dir):
  (bert_dir / "config.json").write_text("{bad")
  with pytest.raises(hf_import.CheckpointError, match=r"config.json: not valid JSON"):
    models.from_pretrained(bert_dir)
  weights = bert_dir / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  with pytest.raises(hf_import.CheckpointError,
                     match=r"model.safetensors: not a readable safetensors file"):
    hf_import.SafetensorsReader(bert_dir)


def test_an_index_naming_the_wrong_shard_is_named(load_pair, tmp_path):
  _, _, source = load_pair("llama_untied")
  shutil.copy(source / "config.json", tmp_path)
  tensors = load_file(str(source / "model.safetensors"))
  names = sorted(tensors)
  save_file({n: tensors[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
  save_file({n: tensors[n] for n in names[3:]}, str(tmp_path / "b.safetensors"))
  weight_map = {n: "a.safetensors" for n in names}  # wrong for names[3:]
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(hf_import.CheckpointError,
                     match=r"a.safetensors: cannot read tensor '([^']+)': File does not "
                           r"contain tensor \1"):
    models.from_pretrained(tmp_path)


def test_missing_directory_files_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_import.SafetensorsReader(tmp_path)


# -- HF reward models (sequence classification) -----------------------------------


@pytest.fixture(scope="module")
def llama_reward_dir(tmp_path_factory):
  config = _llama_config(tied=False)
  config.pad_token_id = 0
  config.num_labels = 1
  torch.manual_seed(2)
  hf_model = transformers.LlamaForSequenceClassification(config).eval()
  path = tmp_path_factory.mktemp("llama_rm")
  hf_model.save_pretrained(path)
  return hf_model, path


def test_sequence_classification_reward_matches_torch(llama_reward_dir):
  hf_model, path = llama_reward_dir
  rm = models.from_pretrained(path, head="reward", dtype=jnp.float32)
  assert isinstance(rm, models.RewardModel) and rm.pooling == "last"
  _assert_rewards_match_torch(rm, hf_model)


def test_binaries_build_a_reward_checkpoint_with_its_own_head(llama_reward_dir):
  # train_rm's model.path and eval_rm's hf: scorer build through make_model, which
  # used to attach a fresh head to the trunk.
  hf_model, path = llama_reward_dir
  rm = experiment.make_model({"path": str(path), "head": "reward", "dtype": "float32"},
                             vocab_size=VOCAB, seed=0)
  _assert_rewards_match_torch(rm, hf_model)


def test_a_reward_checkpoint_whose_pad_is_eos_skips_the_trailing_eos_as_hf_does(tmp_path):
  config = _llama_config(tied=False)
  config.pad_token_id = config.eos_token_id = 5
  config.num_labels = 1
  torch.manual_seed(3)
  hf_model = transformers.LlamaForSequenceClassification(config).eval()
  hf_model.save_pretrained(tmp_path)
  rm = models.from_pretrained(tmp_path, head="reward", dtype=jnp.float32)
  tokens = np.where(_tokens(3, 9, seed=10) == 5, 6, _tokens(3, 9, seed=10))
  tokens[:, -1] = tokens[1, 5] = tokens[2, 1] = 5  # each row's last real token is EOS,
  # as the pipeline's responses end (rows 1 and 2 are padded after it)
  _assert_rewards_match_torch(rm, hf_model, tokens=tokens, pad_id=5)
  rm.last_skips_id = None  # scoring the EOS itself differs from HF
  assert not np.allclose(_rewards(rm, tokens, np.ones_like(tokens)),
                         _rewards(hf_model, tokens, np.ones_like(tokens)), atol=ATOL)


def test_a_tokenizer_larger_than_the_pretrained_vocabulary_is_refused(llama_reward_dir, caplog):
  _, path = llama_reward_dir
  cfg = {"path": str(path), "head": "reward", "dtype": "float32"}
  with pytest.raises(ValueError, match=rf"the tokenizer has 259 ids but the model at {path} "
                                       rf"embeds only {VOCAB}"):
    experiment.make_model(cfg, vocab_size=259, seed=0)  # the byte tokenizer
  experiment.make_model(cfg, vocab_size=VOCAB // 2 - 1, seed=0)
  assert any("is it the model's own tokenizer?" in r.getMessage() for r in caplog.records)


def _rewards(model, tokens, mask):
  if isinstance(model, torch.nn.Module):
    with torch.no_grad():
      return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  return np.asarray(nnx.jit(lambda m, t, k: m(t, attention_mask=k))(model, tokens, mask))


def _assert_rewards_match_torch(rm, hf_model, *, tokens=None, pad_id=0):
  if tokens is None:  # ids >= 1: 0 is the pad id HF uses to find the last token
    tokens = _tokens(3, 9, seed=9)
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0
  mask[2, 2:] = 0
  tokens = np.where(mask > 0, tokens, pad_id)
  ref = _rewards(hf_model, tokens, mask)
  np.testing.assert_allclose(_rewards(rm, tokens, mask), ref, atol=ATOL, rtol=0)
  assert np.abs(ref).min() > 1e-3  # a zero head would not pass by accident


def test_sequence_classification_head_shape_mismatch_is_named(llama_reward_dir, caplog):
  _, path = llama_reward_dir
  with pytest.raises(hf_import.CheckpointError, match=r"'score\.weight' has shape \(1, 32\)"):
    models.from_pretrained(path, head="reward_ensemble:3")
  # The binaries' make_model keeps fresh heads instead: an ensemble on the RM's trunk.
  fresh = models.from_pretrained(path, head="reward_ensemble:3", seed=4, score_head="if_fits")
  built = experiment.make_model({"path": str(path), "head": "reward_ensemble:3"},
                                vocab_size=VOCAB, seed=4)
  np.testing.assert_array_equal(built.head.kernel[...], fresh.head.kernel[...])
  assert "the 'reward_ensemble:3' head keeps its fresh initialisation" in caplog.text
  with pytest.raises(ValueError, match="unknown head spec 'rm'"):
    models.from_pretrained(path, head="rm")


def test_gguf_path_dispatches_to_load_gguf(monkeypatch, tmp_path):
  from prefjax.models import gguf_import  # pylint: disable=g-import-not-at-top
  calls = []
  trunk = nnx.eval_shape(lambda: decoder.Decoder(
      decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB), rngs=nnx.Rngs(0)))
  def fake_load(path, *, dtype=None, param_dtype=jnp.float32):
    calls.append((pathlib.Path(path).name, dtype))
    return trunk
  monkeypatch.setattr(gguf_import, "load_gguf", fake_load)
  model = models.from_pretrained(tmp_path / "m.gguf", head="value", dtype=jnp.bfloat16)
  assert calls == [("m.gguf", jnp.bfloat16)]
  assert isinstance(model, models.ValueModel) and model.trunk is trunk


def test_from_pretrained_attaches_requested_head(bert_dir):
  model = models.from_pretrained(bert_dir, head="multi:helpful,harmless", pooling="cls", seed=1)
  assert isinstance(model, models.MultiObjectiveRewardModel)
  assert model.pooling == "cls" and model.names == ("helpful", "harmless")
  assert isinstance(model.trunk, encoder.Encoder)
  with pytest.raises(ValueError, match="pooling='last' is for causal decoders"):
    models.from_pretrained(bert_dir, head="reward", pooling="last")
