"""GGUF import: synthetic round trips through llama.cpp's layout, errors, and SmolLM2-135M."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gguf
from prefjax.models import decoder as dec
from prefjax.models import gguf_import, sampling

TINY = dec.DecoderConfig.tiny_llama(vocab_size=40, hidden_size=24, num_heads=6, num_kv_heads=2,
                                    head_dim=4, intermediate_size=32, rope_theta=1000.0,
                                    norm_eps=1e-6)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (``[out, in]``)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def random_model(config, seed=0) -> dec.Decoder:
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: dec.Decoder(config, rngs=nnx.Rngs(0), dtype=jnp.float32)))
  flat = nnx.to_flat_state(state)
  for key, var in flat:
    scale = 1.0 if str(key[-1]) in ("embedding", "scale") else 1 / np.sqrt(var.shape[0])
    offset = 1.0 if str(key[-1]) == "scale" else 0.0
    var.set_value(jnp.asarray(offset + scale * rng.standard_normal(var.shape), jnp.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def write_gguf(path, model: dec.Decoder, *, arch="llama", drop=(), extra=(), ffn=None):
  """Writes ``model`` as llama.cpp would: [out, in] matrices, permuted q/k, F32."""
  c = model.config
  p = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}
  w = gguf.GGUFWriter(str(path), arch=arch)
  w.add_block_count(c.num_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(ffn or c.intermediate_size)
  w.add_head_count(c.num_heads)
  w.add_head_count_kv(c.num_kv_heads)
  w.add_rope_freq_base(c.rope_theta)
  w.add_rope_dimension_count(c.head_dim)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  tensors = {"token_embd.weight": p["embed/embedding"],
             "output_norm.weight": p["final_norm/scale"]}
  if not c.tie_embeddings:
    tensors["output.weight"] = p["lm_head/kernel"].T
  for i in range(c.num_layers):
    pre = f"layers/{i}"
    tensors.update({
        f"blk.{i}.attn_norm.weight": p[f"{pre}/input_norm/scale"],
        f"blk.{i}.ffn_norm.weight": p[f"{pre}/post_attn_norm/scale"],
        f"blk.{i}.attn_q.weight": llama_cpp_permute(p[f"{pre}/attn/q_proj/kernel"].T,
                                                    c.num_heads),
        f"blk.{i}.attn_k.weight": llama_cpp_permute(p[f"{pre}/attn/k_proj/kernel"].T,
                                                    c.num_kv_heads),
        f"blk.{i}.attn_v.weight": p[f"{pre}/attn/v_proj/kernel"].T,
        f"blk.{i}.attn_output.weight": p[f"{pre}/attn/o_proj/kernel"].T,
        f"blk.{i}.ffn_gate.weight": p[f"{pre}/mlp/gate_proj/kernel"].T,
        f"blk.{i}.ffn_up.weight": p[f"{pre}/mlp/up_proj/kernel"].T,
        f"blk.{i}.ffn_down.weight": p[f"{pre}/mlp/down_proj/kernel"].T,
    })
  tensors.update(dict(extra))
  for name, value in tensors.items():
    if name not in drop:
      w.add_tensor(name, np.ascontiguousarray(value, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
  permuted = llama_cpp_permute(w, 2)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(permuted, 2), w)
  # Head 0's rows go from [0..3 | 4..7] (rotate-half) to interleaved pairs (0,4),(1,5),...
  np.testing.assert_array_equal(permuted[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_reproduces_logits(tmp_path, tied):
  model = random_model(TINY.replace(tie_embeddings=tied))
  path = write_gguf(tmp_path / "tiny.gguf", model)
  loaded = gguf_import.load_gguf(path, dtype=jnp.float32)
  assert loaded.config == TINY.replace(tie_embeddings=tied, bos_id=1, eos_id=2)
  tokens = jnp.asarray([[3, 17, 8, 39, 0, 21, 5]], jnp.int32)
  forward = jax.jit(lambda m, t: m(t))
  np.testing.assert_allclose(np.asarray(forward(loaded, tokens)),
                             np.asarray(forward(model, tokens)), atol=1e-5, rtol=1e-5)
  meta = gguf_import.gguf_metadata(path)
  assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="gpt2"), "architecture 'gpt2' is not supported"),
    (dict(drop=("blk.1.ffn_up.weight",)), "layers/1/mlp/up_proj/kernel"),
    (dict(ffn=48), "'layers/0/mlp/(gate|up|down)_proj/kernel' has shape"),
    (dict(extra=(("blk.0.attn_q.bias", np.zeros(24)),)), "'blk.0.attn_q.bias'"),
    (dict(extra=(("rope_freqs.weight", np.ones(4)),)), "Llama 3.1/3.2 rope scaling"),
])
def test_bad_files_raise_naming_the_problem(tmp_path, kwargs, message):
  path = write_gguf(tmp_path / "bad.gguf", random_model(TINY), **kwargs)
  with pytest.raises(gguf_import.GGUFImportError, match=message):
    gguf_import.load_gguf(path)


@pytest.mark.parametrize("key", ["llama.rope.scaling.factor", "llama.rope.scale_linear"])
def test_a_rope_scaling_factor_without_a_type_is_refused(tmp_path, key):
  """llama.cpp reads a factor with no scaling type as linear scaling; loading it as plain
  RoPE would move every logit (by ~0.3 on a tiny model, a helper measured)."""
  meta = gguf_import.gguf_metadata(write_gguf(tmp_path / "m.gguf", random_model(TINY)))
  vocab = TINY.vocab_size
  assert gguf_import.config_from_metadata({**meta, key: 1.0}, vocab_size=vocab).rope_theta == (
      TINY.rope_theta)
  with pytest.raises(gguf_import.GGUFImportError, match=rf"{key}=2.0 \(rope scaling\)"):
    gguf_import.config_from_metadata({**meta, key: 2.0}, vocab_size=vocab)


def test_partial_rotary_is_refused(tmp_path):
  """A file whose rope.dimension_count is below the head width rotates part of each head;
  the decoder rotates all of it, so loading it would move every logit."""
  meta = gguf_import.gguf_metadata(write_gguf(tmp_path / "m.gguf", random_model(TINY)))
  head_dim = gguf_import.config_from_metadata(meta, vocab_size=TINY.vocab_size).head_dim
  with pytest.raises(gguf_import.GGUFImportError,
                     match=rf"rope.dimension_count={head_dim // 2} rotates part of each "
                           rf"{head_dim}-wide head"):
    gguf_import.config_from_metadata({**meta, "llama.attention.key_length": head_dim,
                                      "llama.rope.dimension_count": head_dim // 2},
                                     vocab_size=TINY.vocab_size)


def test_damaged_files_raise_naming_the_file_and_tensor(tmp_path):
  path = write_gguf(tmp_path / "tiny.gguf", random_model(TINY))
  whole = path.read_bytes()
  cut = tmp_path / "cut.gguf"
  for size in (len(whole) - 100, 60):  # the last tensor loses 25 values; inside the metadata
    cut.write_bytes(whole[:size])
    with pytest.raises(gguf_import.GGUFImportError,
                       match=rf"{cut}: not a readable GGUF file \(cut short\?\): "):
      gguf_import.load_gguf(cut)
  nan_path = write_gguf(tmp_path / "nan.gguf", random_model(TINY),
                        extra=(("output_norm.weight", np.full(TINY.hidden_size, np.nan)),))
  with pytest.raises(gguf_import.GGUFImportError, match="'output_norm.weight' contains NaN"):
    gguf_import.load_gguf(nan_path)


# --- the real SmolLM2-135M-Instruct (Q4_1) -------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
  from transformers import AutoTokenizer
  model = gguf_import.load_gguf(smollm2_gguf, dtype=jnp.float32)
  tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent),
                                            gguf_file=smollm2_gguf.name)
  return model, tokenizer, gguf_import.gguf_metadata(smollm2_gguf)


def test_smollm2_config(smollm2):
  model, _, meta = smollm2
  assert model.config == dec.DecoderConfig.smollm2_135m()
  assert meta["tokenizer.ggml.bos_token_id"] == 1
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == 134_515_008


def test_smollm2_greedy_continues_capital_of_france_with_paris(smollm2):
  model, tokenizer, meta = smollm2
  ids = tokenizer("The capital of France is")["input_ids"]
  # The file says not to add BOS (SmolLM2 was trained without it); the tokenizer agrees.
  assert meta["tokenizer.ggml.add_bos_token"] is False
  assert ids[0] != model.config.bos_id and tokenizer.decode(ids) == "The capital of France is"
  prompt = jnp.asarray([[model.config.pad_id] * 2 + ids], jnp.int32)  # left-padded
  mask = jnp.asarray([[0, 0] + [1] * len(ids)], jnp.int32)
  gen = sampling.generate(model, prompt, mask, rng=jax.random.key(0), max_new_tokens=3,
                          temperature=0.0, eos_id=model.config.eos_id,
                          pad_id=model.config.pad_id)
  text = tokenizer.decode(np.asarray(gen.tokens[0]))
  assert text.startswith(" Paris"), text
  assert float(gen.logps[0, 0]) > np.log(0.3)  # the model is confident, not lucky
