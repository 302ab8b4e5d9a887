"""``Decoder.hidden_states(select=...)``: the last block computed at the pooled slots
only gives the full forward's states there, and the reward models that use it give
the same rewards and gradients as pooling the full forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax.models import decoder, heads

VOCAB = 64
CONFIGS = {
    "llama_gqa": decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB, num_layers=3),
    "gpt2": decoder.DecoderConfig.tiny_gpt2(vocab_size=VOCAB, num_layers=2),
    "one_layer": decoder.DecoderConfig.tiny_llama(vocab_size=VOCAB, num_layers=1),
}


def _padded():
  tokens = np.random.RandomState(0).randint(1, VOCAB, (3, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 7:] = 0   # right padded
  mask[2, :4] = 0   # left padded
  return dict(tokens=tokens, attention_mask=mask)


def _packed(shared_prompt: bool):
  """Two rows of 16 slots. Shared prompt: (prompt, chosen, rejected) triples whose
  responses see their prompt (``prefix_ids``) and continue its positions."""
  rng = np.random.RandomState(1)
  layout = [[(3, 4, 2), (2, 3, 1)], [(5, 2, 3)]] if shared_prompt else [[(5,), (6,), (3,)],
                                                                         [(9,), (4,)]]
  tokens, segment_ids, prefix_ids, positions = (np.zeros((2, 16), np.int32) for _ in range(4))
  for r, groups in enumerate(layout):
    slot, segment = 0, 0
    for group in groups:
      prompt_segment, prompt_len = segment + 1, group[0]
      for i, length in enumerate(group):
        segment += 1
        span = slice(slot, slot + length)
        tokens[r, span] = rng.randint(1, VOCAB, length)
        segment_ids[r, span] = segment
        prefix_ids[r, span] = prompt_segment if shared_prompt else segment
        positions[r, span] = np.arange(length) + (prompt_len if i > 0 and shared_prompt else 0)
        slot += length
  batch = dict(tokens=tokens, segment_ids=segment_ids, positions=positions, num_segments=7)
  if shared_prompt:
    batch["prefix_ids"] = prefix_ids
  return batch


BATCHES = {"padded": _padded, "packed": lambda: _packed(False),
           "shared_prompt": lambda: _packed(True)}


def _model(name: str, **flags) -> heads.RewardModel:
  trunk = decoder.Decoder(CONFIGS[name], rngs=nnx.Rngs(0), dtype=jnp.float32, **flags)
  return heads.RewardModel(trunk, rngs=nnx.Rngs(1))


def _full_forward_reward(model: heads.RewardModel, batch) -> jax.Array:
  """The reward by pooling every slot's final state (the path ``select`` replaces)."""
  kwargs = {k: v for k, v in batch.items() if k not in ("tokens", "num_segments")}
  hidden = model.trunk.hidden_states(batch["tokens"], **kwargs)
  if "segment_ids" not in batch:
    feats = heads.pool_padded(hidden, batch["attention_mask"], model.pooling)
    return model.head(feats)[..., 0]
  feats = heads.pool_packed(hidden, batch["segment_ids"], batch["num_segments"], model.pooling)
  present = jnp.asarray(np.stack([np.isin(np.arange(batch["num_segments"] + 1), row[row > 0])
                                  for row in batch["segment_ids"]]))
  return jnp.where(present, model.head(feats)[..., 0], 0.0)


def _reward(model, batch):
  kwargs = {k: v for k, v in batch.items() if k != "tokens"}
  return model(batch["tokens"], **kwargs)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", list(BATCHES))
def test_selected_slots_equal_the_full_forward(config, layout):
  model, batch = _model(config), BATCHES[layout]()
  if layout == "padded":
    select = np.stack([heads.pooled_slots(batch["tokens"], batch["attention_mask"], None,
                                          None, "last")] * 2, axis=1)
    select[:, 1] = [3, 0, 9]  # any slot, not only the pooled one
  else:
    select = np.asarray(heads.pooled_slots(None, None, batch["segment_ids"],
                                           batch["num_segments"], "last"))
  kwargs = {k: v for k, v in batch.items() if k not in ("tokens", "num_segments")}
  full = jax.jit(lambda m, t: m.hidden_states(t, **kwargs))
  part = jax.jit(lambda m, t, s: m.hidden_states(t, select=s, **kwargs))
  expected = np.take_along_axis(np.asarray(full(model.trunk, batch["tokens"])),
                                select[..., None], axis=1)
  got = np.asarray(part(model.trunk, batch["tokens"], select))
  assert got.shape == select.shape + (CONFIGS[config].hidden_size,)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,flags", [
    ("padded", {}), ("packed", {}), ("shared_prompt", {}),
    ("shared_prompt", {"scan_layers": True}), ("packed", {"remat": True})],
    ids=["padded", "packed", "shared_prompt", "shared_prompt_scanned", "packed_remat"])
def test_reward_and_gradient_equal_pooling_the_full_forward(layout, flags):
  model, batch = _model("llama_gqa", **flags), BATCHES[layout]()
  rng = np.random.RandomState(2)
  weights = rng.normal(size=np.shape(_reward(model, batch))).astype(np.float32)

  def loss(fn, model):
    return jnp.sum(fn(model, batch) * weights)
  value_and_grad = lambda fn: nnx.jit(nnx.value_and_grad(functools.partial(loss, fn)))
  value, grads = value_and_grad(_reward)(model)
  ref_value, ref_grads = value_and_grad(_full_forward_reward)(model)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-5)
  flat, ref_flat = jax.tree.leaves(nnx.state(grads)), jax.tree.leaves(nnx.state(ref_grads))
  assert len(flat) == len(ref_flat)
  scale = max(float(np.max(np.abs(g))) for g in ref_flat)
  for g, ref in zip(flat, ref_flat):
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=0, atol=1e-5 * scale)
  # The last block's MLP gets gradient only through the pooled slots: never zero.
  last_mlp = nnx.state(grads)["trunk"]["layers"][2]["mlp"]["down_proj"]["kernel"]
  assert float(jnp.max(jnp.abs(last_mlp[...]))) > 1e-4 * scale


def test_cls_pooling_selects_the_first_slot():
  trunk = decoder.Decoder(CONFIGS["llama_gqa"], rngs=nnx.Rngs(0), dtype=jnp.float32)
  model = heads.RewardModel(trunk, pooling="cls", rngs=nnx.Rngs(1))
  for batch in (_padded(), _packed(False)):
    np.testing.assert_allclose(np.asarray(_reward(model, batch)),
                               np.asarray(_full_forward_reward(model, batch)),
                               rtol=1e-5, atol=1e-5)


def test_skipping_the_eos_reads_an_empty_shared_prompt_response_at_its_prompt_end():
  """Hugging Face reward heads skip a trailing EOS (``last_skips_id``). A shared-prompt
  response that is only its EOS used to read slot 0 of its row (0.114 against 0.327)."""
  eos = VOCAB - 1
  batch = _packed(True)
  tokens, segment_ids, prefix_ids = (batch[k] for k in ("tokens", "segment_ids", "prefix_ids"))
  responses = [(r, s) for r in range(2) for s in np.unique(segment_ids[r])
               if s and prefix_ids[r][segment_ids[r] == s][0] != s]
  for r, s in responses:  # every response ends in EOS; the 1-token one is only EOS
    tokens[r, np.flatnonzero(segment_ids[r] == s)[-1]] = eos
  model = _model("llama_gqa")
  model.last_skips_id = eos
  shared = _reward(model, batch)
  assert any((segment_ids[r] == s).sum() == 1 for r, s in responses)
  for r, s in responses:
    prompt = tokens[r][segment_ids[r] == prefix_ids[r][segment_ids[r] == s][0]]
    sequence = np.concatenate([prompt, tokens[r][segment_ids[r] == s]])[None]
    alone = model(sequence, attention_mask=np.ones_like(sequence))
    np.testing.assert_allclose(float(shared[r, s]), float(alone[0]), rtol=1e-5, atol=1e-5)
